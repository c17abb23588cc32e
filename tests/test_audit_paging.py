"""GET /audit: newest first, keyset paging with `before`, filters, the matching count, each entry's cost in
epsilon at the site's reporting delta, and the export of the filtered log."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PROJECT, Deployment, deploy, make_database
from veil.executor import audit
from veil.executor.store import open_store, write
from veil.query.accounting import epsilon_of

BULK = 260
"""Entries written straight into the log, so that it holds more than two pages of 100."""


@pytest.fixture(scope="module")
def site(site_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment whose log holds two query releases, BULK other entries, and a steward's cap change last."""
    state = tmp_path_factory.mktemp("paging")
    url, drop = make_database("sqlite", state)
    d = deploy(site_config, url, state, {"encounters": 5.0})
    try:
        with d.http("researcher") as http:
            for sql in ["SELECT COUNT(*) FROM encounters", "SELECT AVG(hemoglobin_g_dl) FROM encounters"]:
                response = http.post("/query", json={"sql": sql, "epsilon": 0.3})
                assert response.status_code == 200, response.text
        with write(d.engine) as conn:
            for i in range(BULK):
                audit.append(conn, principal=f"user{i % 7}", role="researcher", project=f"proj{i % 3}",
                             action="datasets" if i % 2 else "mock", decision="refused" if i % 5 == 0 else "listed",
                             dataset="patients" if i % 4 == 0 else None, reason=f"bulk {i}")
        with d.http("steward") as http:
            cap = http.put("/budgets/encounters/cap", json={"epsilon": 40.0, "reason": "the last change"})
            assert cap.status_code == 200, cap.text
        yield d
    finally:
        d.stop()
        drop()


def everything(d: Deployment) -> list[audit.AuditEntry]:
    return audit.entries(d.engine)


def get(d: Deployment, **params: Any) -> tuple[list[dict[str, Any]], int]:
    with d.http("steward") as http:
        response = http.get("/audit", params=params)
    assert response.status_code == 200, response.text
    return response.json(), int(response.headers["X-Total-Count"])


def test_newest_first_with_the_count(site: Deployment) -> None:
    log = everything(site)
    assert len(log) > 250
    page, total = get(site)
    assert total == len(log) and len(page) == 100  # the default page
    assert page[0]["action"] == "cap" and page[0]["reason"].endswith("the last change") and page[0]["seq"] == log[-1].seq
    assert [e["seq"] for e in page] == sorted((e["seq"] for e in page), reverse=True)


def test_paging_back_reaches_the_oldest_without_gaps_or_repeats(site: Deployment) -> None:
    seen: list[int] = []
    before: int | None = None
    while True:
        page, total = get(site, limit=73, **({} if before is None else {"before": before}))
        assert total == len(everything(site))
        if not page:
            break
        assert len(page) <= 73
        seen += [e["seq"] for e in page]
        before = page[-1]["seq"]
    assert seen == list(range(everything(site)[-1].seq, 0, -1))


def test_filters_and_their_count(site: Deployment) -> None:
    log = everything(site)
    filters = {"project": "proj1", "action": "datasets", "decision": "refused"}
    expected = [e.seq for e in reversed(log) if all(getattr(e, k) == v for k, v in filters.items())]
    page, total = get(site, limit=1000, **filters)
    assert total == len(expected) > 0 and [e["seq"] for e in page] == expected
    page, total = get(site, dataset="patients", limit=5)
    assert total == sum(e.dataset == "patients" for e in log) and len(page) == 5
    assert all(e["dataset"] == "patients" for e in page)
    first, _ = get(site, dataset="patients", limit=5, before=page[-1]["seq"])
    assert first[0]["seq"] < page[-1]["seq"] and all(e["dataset"] == "patients" for e in first)
    assert get(site, project="nobody") == ([], 0)
    page, total = get(site, since=log[-3].seq)
    assert total == 2 and [e["seq"] for e in page] == [log[-1].seq, log[-2].seq]


def test_each_entry_shows_its_cost_in_epsilon_at_the_reporting_delta(site: Deployment) -> None:
    page, total = get(site, action="query", decision="released")
    assert total == 2 and len(page) == 2
    delta = site.catalog.reporting_delta
    for entry in page:
        assert entry["project"] == PROJECT and entry["rho"] > 0 and entry["epsilon"] == 0
        assert entry["epsilon_at_reporting_delta"] > 0
        assert entry["epsilon_at_reporting_delta"] == pytest.approx(epsilon_of(entry["rho"], delta), rel=1e-12)
        assert entry["epsilon_at_reporting_delta"] <= 0.3 * (1 + 1e-9)  # what was asked for, at most
    free, _ = get(site, action="cap")
    assert free[0]["epsilon_at_reporting_delta"] == 0
    with site.http("researcher") as http:  # a receipt shows the same figure
        receipt = http.get(f"/receipts/{page[0]['hash']}").json()
    assert receipt["epsilon_at_reporting_delta"] == page[0]["epsilon_at_reporting_delta"]


def test_paging_is_checked(site: Deployment) -> None:
    with site.http("steward") as http:
        for params in ({"limit": 0}, {"limit": 1001}, {"before": 0}, {"project": ""}):
            response = http.get("/audit", params=params)
            assert response.status_code == 422 and response.json()["code"] == "malformed_request", params
    with site.http("researcher") as http:
        assert http.get("/audit").status_code == 403
        assert http.get("/audit/export").status_code == 403


def test_export_of_the_filtered_log(site: Deployment) -> None:
    log = everything(site)
    with site.http("steward") as http:
        jsonl = http.get("/audit/export", params={"format": "jsonl", "decision": "released"})
        text = http.get("/audit/export", params={"format": "csv", "project": "proj2", "action": "mock"}).text
        assert http.get("/audit/export", params={"format": "xml"}).status_code == 422
    assert jsonl.status_code == 200 and "attachment" in jsonl.headers["content-disposition"]
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [e["seq"] for e in lines] == [e.seq for e in log if e.decision == "released"]  # oldest first
    assert all(e["epsilon_at_reporting_delta"] > 0 for e in lines)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["seq"]) for r in rows] == [e.seq for e in log if e.project == "proj2" and e.action == "mock"]
    assert rows and rows[0]["hash"] == next(e.hash for e in log if e.seq == int(rows[0]["seq"]))


def test_steward_client_pages_and_exports(site: Deployment) -> None:
    client = site.client("steward")
    page, total = client.audit_page(limit=10, action="datasets")
    assert len(page) == 10 and total == sum(e.action == "datasets" for e in everything(site))
    older = client.audit(limit=10, action="datasets", before=page[-1].seq)
    assert older[0].seq < page[-1].seq
    assert client.audit_export("csv", decision="changed").startswith("seq,ts,principal")
    with site.http("steward") as http:
        assert http.get("/audit/verify").json()["ok"]


def test_csv_export_quotes_what_a_spreadsheet_would_run(tmp_path: Path) -> None:
    """A name or a reason written by someone outside the site opens as text, not as a formula."""
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with write(engine) as conn:
            audit.append(conn, principal='=HYPERLINK("http://evil.example","x")', role="researcher",
                         action="application", decision="submitted", reason="+1 more budget", rho=0.0)
        [row] = list(csv.DictReader(io.StringIO(audit.export_text(audit.entries(engine), "csv"))))
    finally:
        engine.dispose()
    assert row["principal"] == '\'=HYPERLINK("http://evil.example","x")' and row["reason"] == "'+1 more budget"
    assert row["rho"] == "0.0" and row["decision"] == "submitted"
