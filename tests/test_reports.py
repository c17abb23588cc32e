"""Usage and value reports against a real executor: a scripted history (an application and its approval,
releases, refusals, training jobs), whose report must agree exactly with the audit log; a researcher sees
their own project only; bad dates are refused with a hint; `veil steward report` in its three formats; and
`study.report()` from the SDK; the lab's steward desk passes it through."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from conftest import PROJECT, Deployment, add_stewards
from veil.cli import main as veil
from veil.executor import audit, ledger
from veil.executor.store import jobs
from veil.kernel.errors import VeilAuthError
from veil.kernel.sdk import Site as ResearcherSite
from veil.kernel.study import Study
from veil.query.accounting import epsilon_of
from veil.usage import CSV_COLUMNS, StudyUsage, UsageLine, UsageReport, window_codes
from veil.wire import AuditEntry, Federation, TrainRequest, TrainSpec

TODAY = datetime.now(UTC).date()
TOMORROW = (TODAY + timedelta(days=1)).isoformat()
LATER = (TODAY + timedelta(days=2)).isoformat()
ETHICS = "EK-2026-117"


def _query(d: Deployment, sql: str, epsilon: float, who: str = "researcher") -> dict[str, Any]:
    with d.http(who) as http:
        return http.post("/query", json={"sql": sql, "epsilon": epsilon}).json()  # type: ignore[no-any-return]


def _job(d: Deployment, request: TrainRequest, state: str, **values: Any) -> None:
    """A finished training job's row, as the trainer leaves it (the report reads jobs, never trains)."""
    now = audit.now()
    with d.engine.begin() as conn:
        conn.execute(insert(jobs).values(project=PROJECT, principal="alice", dataset="encounters",
                                         request=request.model_dump_json(), state=state, owner="", created_at=now,
                                         updated_at=now, **values))


@pytest.fixture(scope="module")
def history(site_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """study1 applies for encounters (L2, with an ethics reference), a steward approves; two releases there,
    one refused for its budget; one on patients (L1, the default grant); one by another project; two jobs."""
    from conftest import deploy, make_database

    state = tmp_path_factory.mktemp("reports")
    url, _ = make_database("sqlite", state)
    d = deploy(site_config, url, state, grants={})
    add_stewards(d, state, {})
    with d.http() as http:
        app = http.post("/applications", json={
            "purpose": "Rare disease incidence by region", "datasets": ["encounters"], "epsilon": 1.0,
            "duration_days": 30, "ethics_ref": ETHICS}).json()
    with d.http("steward") as http:
        http.post(f"/applications/{app['id']}/reviews",
                  json={"decision": "approve", "comment": "fine", "version": app["version"]}).raise_for_status()
    for epsilon in (0.3, 0.3):
        assert "receipt" in _query(d, "SELECT COUNT(*) FROM encounters", epsilon)
    assert _query(d, "SELECT COUNT(*) FROM encounters", 0.9)["code"] == "budget_exhausted"
    _query(d, "SELECT COUNT(*) FROM patients", 0.2)
    _query(d, "SELECT COUNT(*) FROM patients", 0.1, who="outsider")
    train = TrainRequest(dataset="encounters", features=["age"], label="sex", train=TrainSpec(epsilon=1.0, delta=1e-5, epochs=1,
                                                                                       batch_size=32, learning_rate=1.0))
    _job(d, train, "done", epsilon=0.8, rows=2900)
    _job(d, train.model_copy(update={"federated": Federation(study="rare", rounds=3)}), "done", epsilon=0.7,
         rows=2950, round=3)
    yield d
    d.stop()


def report(d: Deployment, who: str = "steward", **params: str) -> UsageReport:
    with d.http(who) as http:
        response = http.get("/report", params=params)
    assert response.status_code == 200, response.text
    return UsageReport.model_validate(response.json())


def line(found: UsageReport, dataset: str | None, project: str | None) -> UsageLine:
    return next(x for x in found.lines if (x.dataset, x.project) == (dataset, project))


def charges(d: Deployment, dataset: str, project: str) -> list[AuditEntry]:
    return [e for e in audit.entries(d.engine)
            if (e.dataset, e.project) == (dataset, project) and e.decision in audit.CHARGES]


def test_report_agrees_with_the_audit_log(history: Deployment) -> None:
    found = report(history)
    delta = history.catalog.reporting_delta
    for dataset, project, releases in (("encounters", PROJECT, 2), ("patients", PROJECT, 1),
                                       ("patients", "other_project", 1)):
        logged, mine = charges(history, dataset, project), line(found, dataset, project)
        assert mine.releases == releases == sum(e.decision == "released" for e in logged)
        assert [r.receipt for r in mine.receipts] == [e.hash for e in logged]
        assert mine.spent.rho == sum(e.rho for e in logged)
        assert mine.spent.epsilon == epsilon_of(sum(e.rho for e in logged), delta)
        assert [r.epsilon for r in mine.receipts] == [epsilon_of(e.rho, delta) for e in logged]
        assert mine.grant is not None and mine.grant.epsilon_spent == pytest.approx(mine.spent.epsilon)
    encounters = line(found, "encounters", PROJECT)
    (application,) = encounters.applications
    assert (application.status, application.ethics_ref) == ("approved", ETHICS)
    assert [(r.reviewer, r.decision) for r in application.reviews] == [("carol", "approve")]
    assert [(r.code, r.count) for r in encounters.refusals] == [("budget_exhausted", 1)]
    assert [(m.epsilon, m.rows) for m in encounters.models] == [(0.8, 2900)]
    assert [(s.study, s.round, s.rounds, s.epsilon, s.rows) for s in encounters.studies] == [("rare", 3, 3, 0.7, 2950)]
    budgets = {b.dataset: b for b in ledger.budgets(history.engine, history.catalog)}
    assert {b.dataset for b in found.budgets} == set(budgets)
    for timeline in found.timelines:  # the last point is what the cap has spent
        assert timeline.points[-1].epsilon == pytest.approx(budgets[timeline.dataset].spent_epsilon)
    assert found.audit_seq == audit.entries(history.engine)[-1].seq


def test_period_and_filters(history: Deployment) -> None:
    later = report(history, since=TOMORROW, until=LATER)
    assert all(x.releases == 0 and not x.receipts for x in later.lines)
    assert all(len(t.points) == 1 for t in later.timelines)  # the spending before the period, nothing during it
    assert report(history, until=TODAY.isoformat()).lines == []
    only = report(history, dataset="patients", project="other_project")
    assert [(x.dataset, x.project) for x in only.lines] == [("patients", "other_project")]
    for params, code in (({"since": "last week"}, "bad_date"), ({"since": TOMORROW, "until": TOMORROW}, "empty_period"),
                         ({"dataset": "nonexistent"}, "unknown_dataset")):
        with history.http("steward") as http:
            refusal = http.get("/report", params=params).json()
        assert refusal["code"] == code and refusal["hint"]


def test_researcher_sees_only_their_own_project(history: Deployment) -> None:
    mine = report(history, "researcher")
    assert {x.project for x in mine.lines} == {PROJECT}
    assert mine.budgets == [] and mine.anonymous_refusals == []
    with history.http() as http:
        response = http.get("/report", params={"project": "other_project"})
    assert response.status_code == 403
    refusal = response.json()
    assert refusal["code"] == "wrong_project" and refusal["hint"] and refusal["receipt"]
    entry = next(e for e in audit.entries(history.engine) if e.hash == refusal["receipt"])
    assert (entry.action, entry.decision, entry.project) == ("report", "refused", PROJECT)
    assert ("wrong_project", 1) in [(r.code, r.count) for r in line(report(history), None, PROJECT).refusals]


def test_steward_cli_formats(history: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(fmt: str) -> str:
        out = tmp_path / f"report.{fmt}"
        token = history.token_dir / "steward.token"  # type: ignore[attr-defined]
        assert veil(["steward", "report", "--since", TODAY.isoformat(), "--until", TOMORROW, "--format", fmt,
                     "--out", str(out), "--site", history.url, "--token-file", str(token)]) == 0
        return out.read_text()

    found = UsageReport.model_validate(json.loads(cli("json")))
    logged = charges(history, "encounters", PROJECT)
    assert line(found, "encounters", PROJECT).spent.rho == sum(e.rho for e in logged)
    rows = list(csv.DictReader(io.StringIO(cli("csv"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    row = next(r for r in rows if (r["dataset"], r["project"]) == ("encounters", PROJECT))
    assert row["receipts"].split() == [e.hash for e in logged] and row["releases"] == "2"
    text = cli("md")
    assert text.startswith("## Usage report: site north") and logged[0].hash in text and ETHICS in text
    token = history.token_dir / "steward.token"  # type: ignore[attr-defined]
    assert veil(["steward", "report", "--since", "yesterday", "--site", history.url, "--token-file", str(token)]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_study_report(history: Deployment) -> None:
    study = Study("rare", PROJECT, {"north": ResearcherSite("north", history.url, history.tokens["researcher"])}, [])
    found = study.report(until=TOMORROW)
    assert isinstance(found, StudyUsage) and set(found.reports) == {"north"}
    text = found._repr_markdown_()
    assert "Site north contributed to project study1, dataset encounters: 2 DP releases" in text
    assert all(e.hash in text for e in charges(history, "encounters", PROJECT))
    assert "other_project" not in text and "<table>" in found._repr_html_()
    with pytest.raises(VeilAuthError):
        study.sites["north"].client.report(project="other_project")


def test_the_lab_desk_proxies_the_report(history: Deployment, tmp_path: Path) -> None:
    from test_lab_server import Lab, write_steward

    lab = Lab(tmp_path, {"VEIL_STEWARD": str(write_steward(tmp_path, {"north": history}))})
    try:
        found = UsageReport.model_validate(lab.get("steward/report", site="north", project=PROJECT))
        assert {x.project for x in found.lines} == {PROJECT}
        assert line(found, "encounters", PROJECT).releases == 2
        assert lab.get("steward/report", expect=422, site="north", since="soon")["code"] == "bad_date"
    finally:
        lab.stop()
    assert not any(t in body for t in history.tokens.values() for body in lab.bodies)


def test_window_codes() -> None:
    reason = "7 refusals without an accountable token in 60 s (missing_token x5, rate_limited x2) from 1.2.3.4 x7"
    assert window_codes(reason) == [("missing_token", 5), ("rate_limited", 2)]

