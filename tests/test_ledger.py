"""The ledger under concurrency and crashes, against a real executor on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select

from conftest import BACKENDS, PROJECT, Deployment
from veil.executor import audit
from veil.executor.store import audit as audit_table
from veil.executor.store import grants

COUNT = {"sql": "SELECT COUNT(*) AS n FROM patients", "rho": 0.001}


def _grant_row(d: Deployment, dataset: str = "patients") -> dict:
    with d.engine.connect() as conn:
        return dict(conn.execute(select(grants).where(grants.c.project == PROJECT,
                                                      grants.c.dataset == dataset)).mappings().one())


def _affordable(total: float, spent: float, cost: float) -> int:
    """How many more releases of `cost` fit, with the same float additions the ledger makes."""
    n = 0
    while spent + cost <= total:
        spent += cost
        n += 1
    return n


def _burst(url: str, token: str, requests: int, workers: int) -> list[httpx.Response]:
    local = threading.local()

    def one(_: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        return local.client.post("/query", json=COUNT)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(requests)))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_clients_get_exactly_the_affordable_releases(deployer: Callable[..., Deployment],
                                                                backend: str, workers: int) -> None:
    """64 clients, one grant; with two worker processes the database alone keeps the count exact."""
    d = deployer(backend, grants={"patients": 2.0}, workers=workers)
    first = d.client().query(sql=COUNT["sql"], rho=COUNT["rho"])
    cost = first.cost.rho
    assert 0 < cost <= COUNT["rho"]
    row = _grant_row(d)
    affordable = _affordable(row["rho_total"], row["rho_spent"], cost)
    assert 20 < affordable < 100

    responses = _burst(d.url, d.tokens["researcher"], requests=affordable + 40, workers=64)

    released = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(released) == affordable
    assert {r.status_code for r in refused} == {409}
    assert {r.json()["code"] for r in refused} == {"budget_exhausted"}
    row = _grant_row(d)
    assert row["rho_spent"] <= row["rho_total"]
    assert row["rho_spent"] + cost > row["rho_total"]  # and nothing affordable was left unused
    assert audit.verify(d.engine).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_burst_leaves_ledger_and_audit_consistent(deployer: Callable[..., Deployment],
                                                              backend: str) -> None:
    d = deployer(backend, grants={"patients": 5.0}, workers=2)
    outcomes: list[httpx.Response | Exception] = []
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(base_url=d.url, headers={"Authorization": f"Bearer {d.tokens['researcher']}"},
                          timeout=30) as client:
            for _ in range(400):
                try:
                    response = client.post("/query", json=COUNT)
                except httpx.HTTPError as exc:
                    with lock:
                        outcomes.append(exc)
                    return
                with lock:
                    outcomes.append(response)

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if sum(isinstance(o, httpx.Response) and o.status_code == 200 for o in outcomes) >= 30:
                break
        time.sleep(0.01)
    d.executor.kill()
    for t in threads:
        t.join(timeout=60)

    receipts = [o.json()["receipt"] for o in outcomes if isinstance(o, httpx.Response) and o.status_code == 200]
    assert len(receipts) >= 30
    assert any(isinstance(o, Exception) for o in outcomes), "the kill should have cut requests in flight"
    result = audit.verify(d.engine)
    assert result.ok, result.problems
    with d.engine.connect() as conn:
        logged = {r.hash: r for r in conn.execute(select(audit_table)).all()}
    # every release a client received is in the log, charged; the ledger equals what the log records
    assert all(r in logged and logged[r].decision == "released" and logged[r].rho > 0 for r in receipts)
    released_in_log = [r for r in logged.values() if r.decision == "released" and r.dataset == "patients"]
    assert len(released_in_log) >= len(receipts)
    assert _grant_row(d)["rho_spent"] == pytest.approx(sum(r.rho for r in released_in_log), rel=1e-9)

    # the site comes back and keeps its chain and ledger (two workers each starting a Site: slow on a
    # loaded 2-core machine, so more time than a first start)
    d.executor.start(timeout=300)
    again = d.client().query(sql=COUNT["sql"], rho=COUNT["rho"])
    assert audit.find(d.engine, again.receipt) is not None
    assert audit.verify(d.engine).ok
