"""Standing DP counts on a real executor (issue 18): approval charges the whole horizon to the dataset's cap once
and gives no grant; each window is released once, in order, across restarts and a kill -9, by the scheduler
and at start-up; the released counts hold their stated intervals against the true truncated counts; specs
the site cannot count are refused at filing, charging nothing; stewards stop them, researchers may not."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import tomli_w
from sqlalchemy import func, select

from conftest import BACKENDS, Deployment, deploy, make_database
from veil.executor import audit, standing
from veil.executor.store import applications, caps, standing_queries, standing_windows
from veil.local import LocalExecutor
from veil.query import continual
from veil.query.accounting import rho_for_epsilon
from veil.query.standing import release_time
from veil.wire import StandingQuery

REGIONS = ["north", "south", "east"]
TODAY = datetime.now(UTC).date()
START = TODAY - timedelta(days=7 * 5 + 2)  # windows 0..4 (weekly) have closed; 5.. have not
HORIZON, K = 8, 2
SQL = "SELECT region, COUNT(*) AS n FROM cases WHERE age >= 18 GROUP BY region"


def write_data(directory: Path, seed: int = 7) -> pl.DataFrame:
    """~400 patients with 1 to 6 visits each, from two weeks before the start to past the horizon."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for patient in range(400):
        for _ in range(int(rng.integers(1, 7))):
            rows.append({"patient_id": patient, "onset": START + timedelta(days=int(rng.integers(-14, 7 * 10))),
                         "region": REGIONS[int(rng.integers(0, 3))], "age": int(rng.integers(0, 100)),
                         "note": f"n{int(rng.integers(0, 5))}"})
    frame = pl.DataFrame(rows, schema={"patient_id": pl.Int64, "onset": pl.Date, "region": pl.String,
                                       "age": pl.Int64, "note": pl.String})
    frame.write_parquet(directory / "cases.parquet")
    frame.write_parquet(directory / "archive.parquet")
    frame.write_parquet(directory / "vault.parquet")
    return frame


def _dataset(path: str) -> dict[str, Any]:
    return {"title": "Cases", "description": "Notified cases", "path": path, "level": "L1",
            "privacy_unit": "patient_id", "max_rows_per_unit": 10, "max_rows": 100_000, "lifetime_epsilon": 10.0,
            "columns": {"patient_id": {"dtype": "Int64"}, "onset": {"dtype": "Date"},
                        "region": {"dtype": "String", "categories": REGIONS},
                        "age": {"dtype": "Int64", "bounds": [0, 100]}, "note": {"dtype": "String"}}}


def write_config(directory: Path, check_seconds: float) -> Path:
    path = directory / f"site-{check_seconds:g}.toml"
    path.write_text(tomli_w.dumps({
        "site": {"name": "clinic", "reporting_delta": 1e-6, "default_l1_epsilon": 1.0,
                 "standing_check_seconds": check_seconds},
        "datasets": {"cases": _dataset("cases.parquet"), "archive": _dataset("archive.parquet"),
                     "vault": {**_dataset("vault.parquet"), "sharing": "enclave"}}}))
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A site whose scheduler waits an hour (releases come at start-up, or from the test's own clock)."""
    root = tmp_path_factory.mktemp("standing")
    write_data(root)
    url, drop = make_database(request.param, root)
    d = deploy(write_config(root, 3600), url, root, grants={})
    d.root = root  # type: ignore[attr-defined]
    yield d
    d.stop()
    drop()


def spec(name: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "sql": SQL, "time_column": "onset", "start": START.isoformat(), "window_days": 7,
            "horizon": HORIZON, "max_windows": K, "confidence": 0.9999, **changes}


def apply(d: Deployment, body: dict[str, Any], epsilon: float = 0.5, who: str = "researcher",
          dataset: str = "cases", **fields: Any) -> Any:
    with d.http(who) as http:
        return http.post("/applications", json={
            "purpose": "Weekly surveillance of notified cases", "datasets": [dataset], "epsilon": epsilon,
            "duration_days": 365, "uses": ["surveillance"], "standing": body, **fields})


def cap_rho(d: Deployment, dataset: str = "cases") -> float:
    with d.engine.connect() as conn:
        return float(conn.execute(select(caps.c.rho_spent).where(caps.c.dataset == dataset)).scalar_one())


def counts(d: Deployment) -> tuple[int, int]:
    with d.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(applications)).scalar_one(),
                conn.execute(select(func.count()).select_from(standing_queries)).scalar_one())


def listed(d: Deployment, standing_id: int, who: str = "researcher") -> dict[str, Any]:
    with d.http(who) as http:
        answer = http.get(f"/standing/{standing_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def released(d: Deployment, standing_id: int, after: int = -1) -> list[dict[str, Any]]:
    with d.http() as http:
        answer = http.get(f"/standing/{standing_id}/windows", params={"after": after})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def consistent(d: Deployment, standing_id: int) -> int:
    """The row, its windows and the audit log agree: windows 0..n-1 each once; n. (Read while nothing is being
    released for it: the three reads are separate.)"""
    with d.engine.connect() as conn:
        n = conn.execute(select(standing_queries.c.windows_released).where(standing_queries.c.id == standing_id)
                         ).scalar_one()
        stored = list(conn.execute(select(standing_windows.c.window).where(standing_windows.c.standing_id ==
                                                                           standing_id)
                                   .order_by(standing_windows.c.window)).scalars())
    logged = [e for e in audit.matching(d.engine, action="standing_release")
              if (e.reason or "").startswith(f"standing query {standing_id} ")]
    assert stored == list(range(n)), stored
    assert [int((e.reason or "").split(": window ")[1].split(" ")[0]) for e in logged] == list(range(n))
    assert audit.verify(d.engine).ok, audit.verify(d.engine).problems
    return int(n)


def restart(d: Deployment, config: Path | None = None) -> None:
    """Stop the executor (if it still runs) and start it again on the same database and port."""
    old = d.executor
    old.stop()
    d.executor = LocalExecutor(config or old.site_config, d.database_url, port=old.port, log=old.log)
    d.executor.start()


def steward(d: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    token = d.root / "steward.token"  # type: ignore[attr-defined]
    token.write_text(d.tokens["steward"])
    return subprocess.run([sys.executable, "-m", "veil.cli", "steward", *args, "--site", d.url, "--token-file",
                           str(token)], capture_output=True, text=True, timeout=120)


def truth(frame: pl.DataFrame, first: date = START) -> dict[tuple[int, str], int]:
    """The true counts, computed plainly: each patient's distinct (window, region) cells among adults, the first
    K of them in (window, region) order."""
    cells = (frame.filter(pl.col("age") >= 18)
             .with_columns(window=(pl.col("onset") - pl.lit(first)).dt.total_days() // 7)
             .filter((pl.col("window") >= 0) & (pl.col("window") < HORIZON))
             .select("patient_id", "window", "region").unique().sort("patient_id", "window", "region"))
    found: dict[tuple[int, str], int] = {}
    for _, group in cells.group_by("patient_id"):
        for window, region in group.select("window", "region").rows()[:K]:
            found[(window, region)] = found.get((window, region), 0) + 1
    return found


# ---------------------------------------------------------------- charging and releasing


def test_approval_charges_the_cap_once_and_windows_are_released_once_across_restarts(clinic: Deployment) -> None:
    d = clinic
    before = cap_rho(d)
    answer = apply(d, spec("flu"), epsilon=1.0)
    assert answer.status_code == 201 and answer.json()["status"] == "approved", answer.text  # L1: within the share
    plan = continual.plan_counter(HORIZON, K, rho_for_epsilon(1.0, 1e-6), confidence=0.9999)
    assert cap_rho(d) == pytest.approx(before + plan.rho, rel=1e-12)  # exactly the certified rho, once
    with d.http() as http:
        (info,) = [s for s in http.get("/standing").json() if s["spec"]["name"] == "flu"]
        assert http.get("/grants").json() == []  # no grant was given
    assert info["rho"] == pytest.approx(plan.rho) and info["noise_scale"] == pytest.approx(plan.scale)
    assert info["status"] == "active" and info["windows_released"] == 0 and info["next_window"] == 0
    charge = audit.find(d.engine, info["receipt"])
    assert charge is not None and charge.action == "standing" and charge.rho == pytest.approx(plan.rho)
    assert f"standing query {info['id']} 'flu'" in (charge.reason or "")
    with d.http("steward") as http:
        (budget,) = [b for b in http.get("/budgets").json() if b["dataset"] == "cases"]
    assert budget["spent_rho"] == pytest.approx(cap_rho(d))
    assert consistent(d, info["id"]) == 0

    restart(d)  # the site was down while windows 0..4 closed: it releases them at start, in order, once each
    assert consistent(d, info["id"]) == 5
    first = released(d, info["id"])
    assert [w["window"] for w in first] == [0, 1, 2, 3, 4]
    assert [w["start"] for w in first] == [(START + timedelta(days=7 * w)).isoformat() for w in range(5)]
    assert all(len(w["cells"]) == 3 and {c["key"]["region"] for c in w["cells"]} == set(REGIONS) for w in first)
    assert released(d, info["id"], after=2) == first[3:]
    after = listed(d, info["id"])
    assert after["windows_released"] == 5 and after["next_window"] == 5
    assert after["next_release_at"] == release_time(StandingQuery(**spec("flu")), 5).isoformat()
    assert cap_rho(d) == pytest.approx(before + plan.rho, rel=1e-12)  # nothing charged for releasing


def test_released_counts_hold_their_intervals_until_the_horizon_ends(clinic: Deployment) -> None:
    d = clinic
    (info,) = [s for s in standing.listing(d.engine, _steward()) if s.spec.name == "flu"]
    spent = cap_rho(d)
    end = release_time(info.spec, HORIZON - 1)
    assert standing.release_due(d.engine, d.catalog, end - timedelta(seconds=1)) == HORIZON - 1 - 5
    assert standing.release_due(d.engine, d.catalog, end) == 1
    assert standing.release_due(d.engine, d.catalog, end + timedelta(days=30)) == 0  # finished: nothing more
    assert consistent(d, info.id) == HORIZON and cap_rho(d) == spent  # charged up front only
    final = listed(d, info.id)
    assert final["status"] == "finished" and final["next_window"] is None and final["next_release_at"] is None
    true = truth(pl.read_parquet(d.root / "cases.parquet"))  # type: ignore[attr-defined]
    missed = []
    for w in released(d, info.id):
        assert w["total_nodes"] == len(continual.prefix(HORIZON, info.levels, w["window"] + 1))
        for cell in w["cells"]:
            region = cell["key"]["region"]
            count = true.get((w["window"], region), 0)
            total = sum(true.get((v, region), 0) for v in range(w["window"] + 1))
            missed += [(w["window"], region, "count")] * (abs(cell["count"] - count) >= cell["count_accuracy"])
            missed += [(w["window"], region, "total")] * (abs(cell["total"] - total) >= cell["total_accuracy"])
    assert not missed, missed  # 48 intervals at 99.99%
    assert sum(true.values()) <= K * 400 and max(true.values()) > 0


def _steward() -> Any:
    from veil.executor.auth import Principal

    return Principal("carol", "steward")


def test_a_second_approval_the_cap_cannot_afford_is_refused_and_changes_nothing(clinic: Deployment) -> None:
    d = clinic
    held = apply(d, spec("big"), epsilon=10.0)  # the whole cap, of which some is spent
    assert held.status_code == 201 and held.json()["status"] == "pending", held.text  # above the project share
    assert "standing query 'big'" in held.json()["needs"]
    before, rows = cap_rho(d), counts(d)
    with d.http("steward") as http:
        refused = http.post(f"/applications/{held.json()['id']}/reviews",
                            json={"decision": "approve", "comment": "ok", "version": 1})
    assert refused.status_code == 409 and refused.json()["code"] == "cap_exceeded", refused.text
    assert "rho" in refused.json()["message"] and "left" in refused.json()["message"]  # the figures, for a steward
    assert cap_rho(d) == before and counts(d) == rows and audit.verify(d.engine).ok
    with d.http("steward") as http:
        assert http.get(f"/applications/{held.json()['id']}").json()["status"] == "pending"


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("changes", "status", "code"), [
    ({"sql": "SELECT region, COUNT(*), SUM(age) FROM cases GROUP BY region"}, 400, "standing_count_only"),
    ({"sql": "SELECT COUNT(age) FROM cases"}, 400, "standing_count_only"),
    ({"sql": "SELECT AVG(age) FROM cases"}, 400, "standing_count_only"),
    ({"sql": "DELETE FROM cases"}, 400, "unsupported_query"),
    ({"sql": "SELECT note, COUNT(*) FROM cases GROUP BY note"}, 400, "no_public_keys"),
    ({"sql": "SELECT COUNT(*) FROM cases WHERE weight > 3"}, 400, "unknown_column"),
    ({"sql": "SELECT COUNT(*) FROM archive"}, 400, "standing_dataset_mismatch"),
    ({"time_column": "age"}, 400, "not_a_date"),
    ({"time_column": "when"}, 400, "unknown_column"),
    ({"levels": 15}, 400, "invalid_levels"),  # more levels than a tree over the horizon has
])
def test_a_spec_the_site_cannot_count_is_refused_at_filing(clinic: Deployment, changes: dict[str, Any], status: int,
                                                           code: str) -> None:
    before, rows = cap_rho(clinic), counts(clinic)
    answer = apply(clinic, spec("bad", **changes))
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert answer.json()["hint"]
    assert cap_rho(clinic) == before and counts(clinic) == rows


def test_levels_choose_the_tree_or_windows_alone(clinic: Deployment) -> None:
    """levels=1 releases each window alone: one node per window, at a smaller scale than the full tree's."""
    made = apply(clinic, spec("alone", levels=1, start=(TODAY + timedelta(days=30)).isoformat()), epsilon=0.2)
    assert made.json()["status"] == "approved", made.text
    tree = continual.plan_counter(HORIZON, K, rho_for_epsilon(0.2, 1e-6))
    (info,) = [s for s in standing.listing(clinic.engine, _steward()) if s.spec.name == "alone"]
    assert info.levels == 1 and info.noise_scale < tree.scale
    assert info.noise_scale == continual.plan_counter(HORIZON, K, rho_for_epsilon(0.2, 1e-6), levels=1).scale
    with clinic.http("steward") as http:  # the module's other tests count the releases of their own queries
        assert http.post(f"/standing/{info.id}/stop", json={"reason": "test done"}).status_code == 200


def test_uses_and_standing_must_match_and_an_enclave_counts_nothing(clinic: Deployment) -> None:
    before, rows = cap_rho(clinic), counts(clinic)
    mismatch = apply(clinic, spec("x"), uses=["query"])
    assert mismatch.status_code == 422 and "surveillance" in mismatch.json()["message"], mismatch.text
    with clinic.http() as http:
        bare = http.post("/applications", json={"purpose": "Weekly surveillance of cases", "datasets": ["cases"],
                                                "epsilon": 0.5, "duration_days": 30, "uses": ["surveillance"]})
    assert bare.status_code == 422 and "standing query" in bare.json()["message"], bare.text
    with clinic.http("steward") as http:
        direct = http.post("/grants", json={"project": "study1", "datasets": ["cases"], "epsilon": 0.5,
                                            "duration_days": 30, "uses": ["surveillance"], "reference": "minutes 4"})
    assert direct.status_code == 422 and direct.json()["code"] == "surveillance_needs_application", direct.text
    enclave = apply(clinic, spec("x", sql="SELECT COUNT(*) FROM vault"), dataset="vault")
    assert enclave.status_code == 403 and enclave.json()["code"] == "enclave_dataset", enclave.text
    assert cap_rho(clinic) == before and counts(clinic) == rows


def test_who_sees_and_who_stops_a_standing_query(clinic: Deployment) -> None:
    d = clinic
    made = apply(d, spec("rsv", start=(TODAY + timedelta(days=3)).isoformat()), epsilon=0.3)
    assert made.json()["status"] == "approved", made.text
    (info,) = [s for s in standing.listing(d.engine, _steward()) if s.spec.name == "rsv"]
    spent = cap_rho(d)
    with d.http("outsider") as http:
        assert all(s["project"] == "other_project" for s in http.get("/standing").json())
        unseen = http.get(f"/standing/{info.id}")
        assert unseen.status_code == 404 and unseen.json()["code"] == "unknown_standing_query"
        assert http.get(f"/standing/{info.id}/windows").status_code == 404
    with d.http() as http:
        refused = http.post(f"/standing/{info.id}/stop", json={"reason": "done with it"})
    assert refused.status_code == 403, refused.text
    listing = steward(d, "standing")
    assert listing.returncode == 0 and f"standing query {info.id} 'rsv' [active] project study1 on cases: 0 of " \
        f"{HORIZON} windows released; next: window 0 at {TODAY + timedelta(days=10)}T00:00 UTC" in listing.stdout, listing
    done = steward(d, "standing", "stop", str(info.id), "--reason", "the study ended")
    assert done.returncode == 0 and "[stopped]" in done.stdout and "nothing is refunded" in done.stdout, done
    assert "the study ended" in listed(d, info.id)["status_reason"]
    with d.http("steward") as http:
        again = http.post(f"/standing/{info.id}/stop", json={"reason": "twice"})
        assert again.status_code == 409 and again.json()["code"] == "standing_not_active"
    assert cap_rho(d) == spent and audit.verify(d.engine).ok  # nothing refunded
    assert standing.release_due(d.engine, d.catalog, datetime.now(UTC) + timedelta(days=400)) == 0


def test_a_suspended_dataset_holds_windows_back_and_retiring_stops_them(clinic: Deployment) -> None:
    d = clinic
    held = apply(d, spec("covid"), epsilon=0.2)
    on_archive = apply(d, spec("old", sql="SELECT COUNT(*) FROM archive"), epsilon=0.2, dataset="archive")
    assert held.json()["status"] == on_archive.json()["status"] == "approved", held.text + on_archive.text
    ids = {s.spec.name: s.id for s in standing.listing(d.engine, _steward())}
    now = datetime.now(UTC)
    with d.http("steward") as http:
        assert http.post("/datasets/cases/transitions", json={"to": "suspended", "reason": "audit"}).status_code == 201
        assert standing.release_due(d.engine, d.catalog, now) == 5  # archive's only: cases holds its windows
        assert consistent(d, ids["covid"]) == 0 and consistent(d, ids["old"]) == 5
        assert http.post("/datasets/cases/transitions", json={"to": "active", "reason": "resumed"}).status_code == 201
        assert standing.release_due(d.engine, d.catalog, now) == 5
        assert consistent(d, ids["covid"]) == 5
        retired = http.post("/datasets/archive/transitions", json={"to": "retired", "reason": "replaced"})
        assert retired.status_code == 201 and retired.json()["status"] == "done", retired.text
    gone = listed(d, ids["old"])
    assert gone["status"] == "stopped" and "retired" in gone["status_reason"]
    assert standing.release_due(d.engine, d.catalog, now + timedelta(days=400)) == 3  # covid's 5..7 only


def test_the_scheduler_releases_due_windows_and_a_kill_leaves_a_consistent_state(clinic: Deployment) -> None:
    d = clinic
    (flu,) = [s for s in standing.listing(d.engine, _steward()) if s.spec.name == "flu"]
    finished = released(d, flu.id)
    restart(d, write_config(d.root, 1))  # type: ignore[attr-defined]  # a scheduler that checks every second
    assert released(d, flu.id) == finished and consistent(d, flu.id) == HORIZON  # a restart releases nothing again
    made = apply(d, spec("measles"), epsilon=0.2)
    assert made.json()["status"] == "approved", made.text
    (info,) = [s for s in standing.listing(d.engine, _steward()) if s.spec.name == "measles"]
    deadline = time.monotonic() + 30
    while listed(d, info.id)["windows_released"] < 5 and time.monotonic() < deadline:  # no restart needed
        time.sleep(0.2)
    assert consistent(d, info.id) == 5
    windows = released(d, info.id)
    many = spec("mumps", start=(TODAY - timedelta(days=7 * 40 + 2)).isoformat(), horizon=52)
    assert apply(d, many, epsilon=0.2).json()["status"] == "approved"  # 40 windows due at once
    (second,) = [s for s in standing.listing(d.engine, _steward()) if s.spec.name == "mumps"]
    time.sleep(1.0)  # the scheduler's next round is releasing them
    d.executor.kill()  # kill -9 mid-run (or just before or after): the state is consistent either way
    print(f"killed after {consistent(d, second.id)} of 40 windows")
    restart(d)
    assert consistent(d, second.id) == 40  # whatever the kill cut short was released at start, each window once
    assert released(d, info.id) == windows and consistent(d, info.id) == 5
