"""Data stewards' governance end to end against a real executor: applications reviewed under each
level's rule (API, SDK and `veil steward` CLI), grants that expire and are revoked, caps, the audit log,
and every bad input refused with a precise, audited error that changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from sqlalchemy import Engine, select

from conftest import BACKENDS, Deployment, add_stewards, deploy, make_database
from veil.cli import main as veil
from veil.errors import CatalogError
from veil.executor import audit, ledger
from veil.executor.auth import create_token
from veil.executor.catalog import load_catalog
from veil.executor.store import applications, caps, grants, reviews
from veil.kernel.errors import VeilPolicyError
from veil.kernel.sdk import Site as ResearcherSite

SQL_PATIENTS = "SELECT COUNT(*) FROM patients"
SQL_REGISTRY = "SELECT COUNT(*) FROM registry"
SQL_ENCOUNTERS = "SELECT COUNT(*) FROM encounters"


def governance_catalog(site_config: Path, directory: Path, levels: dict[str, dict[str, Any]] | None = None) -> Path:
    """The north site plus `registry`, an L3 copy of its patients (lifetime epsilon 10), with `levels`
    overriding its review rules."""
    config = tomllib.loads(site_config.read_text())
    for table in config["datasets"].values():
        table["path"] = str(site_config.parent / table["path"])
    config["datasets"]["registry"] = {**config["datasets"]["patients"], "level": "L3"}
    config["levels"] = levels or {}
    path = directory / "site.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def gov(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Deployment]:
    """A site with L1, L2 and L3 data, no grants but study1's, and stewards holding each office."""
    state = tmp_path_factory.mktemp("gov")
    catalog = governance_catalog(site_config, state, {"L2": {"training": False}})
    url, drop = make_database(request.param, state)
    d = deploy(catalog, url, state, grants={})
    d.tokens["alice_steward"] = create_token(d.engine, "alice", "steward", None, "data_committee")
    add_stewards(d, state, {"erin": "data_center", "frank": "data_committee", "grace": "data_center"})
    yield d
    d.stop()
    drop()


def apply(d: Deployment, who: str = "researcher", **fields: Any) -> dict[str, Any]:
    body = {"purpose": "Incidence of rare diseases by region", "datasets": ["encounters"], "epsilon": 2.0,
            "duration_days": 30, **fields}
    with d.http(who) as http:
        response = http.post("/applications", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def review(d: Deployment, who: str, app: dict[str, Any], decision: str = "approve", version: int | None = None,
           existing: str | None = None) -> Any:
    """`existing`: what approving does to a grant the project already holds (add, replace or keep)."""
    with d.http(who) as http:
        return http.post(f"/applications/{app['id']}/reviews",
                         json={"decision": decision, "comment": f"{decision} by {who}",
                               "version": version or app["version"],
                               **({"on_existing_grant": existing} if existing else {})})


def query(d: Deployment, sql: str, who: str = "researcher", epsilon: float = 0.2) -> Any:
    with d.http(who) as http:
        return http.post("/query", json={"sql": sql, "epsilon": epsilon})


def steward_cli(d: Deployment, who: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`veil steward ...` as `who`, in this process; returns (exit code, what it printed)."""
    token = d.token_dir / f"{who}.token"  # type: ignore[attr-defined]
    code = veil(["steward", args[0], *args[1:], "--site", d.url, "--token-file", str(token)]
                if args[0] != "grant" else
                ["steward", "grant", args[1], *args[2:], "--site", d.url, "--token-file", str(token)])
    out = capsys.readouterr()
    return code, out.out + out.err


def state(engine: Engine) -> tuple[list[Any], ...]:
    """Everything a refusal must leave unchanged (the audit log aside, which records the refusal)."""
    with engine.connect() as conn:
        return tuple(sorted(map(tuple, conn.execute(select(t)).all()))
                     for t in (applications, reviews, grants, caps))


def assert_refused(d: Deployment, response: Any, status: int, code: str, before: tuple[list[Any], ...]) -> None:
    """Refused with this status and code, recorded in the audit log, and nothing else changed."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert body["hint"]
    entry = audit.find(d.engine, body["receipt"])
    assert entry is not None and entry.decision == "refused" and entry.reason.startswith(code)
    assert state(d.engine) == before


# ------------------------------------------------------------------ the three paths


def test_l1_application_is_approved_by_the_rule_at_once(gov: Deployment) -> None:
    app = apply(gov, datasets=["patients"], epsilon=2.5, purpose="Age distribution of enrolled patients")
    assert app["status"] == "approved" and app["needs"] is None and app["rule"]["reviewers"] == 0
    grant = next(g for g in gov.client().grants() if g.dataset == "patients")
    assert grant.application_id == app["id"] and grant.status == "active" and grant.expires_at
    assert grant.epsilon == 2.5  # the most the L1 rule approves alone: a quarter of the cap
    decisions = [(e.action, e.decision, e.principal) for e in audit.entries(gov.engine)
                 if e.reason and f"application {app['id']}" in e.reason]
    assert ("application", "submitted", "alice") in decisions
    assert ("grant", "granted", "site-policy") in decisions
    assert ("application", "approved", "site-policy") in decisions


def test_l2_path_through_the_api(gov: Deployment) -> None:
    assert query(gov, SQL_ENCOUNTERS, who="outsider").json()["code"] == "unknown_dataset"
    app = apply(gov, who="outsider", datasets=["encounters"], epsilon=1.5)
    assert app["status"] == "pending" and app["needs"] == "1 more approving reviewer"
    with gov.http("steward") as http:
        pending = http.get("/applications", params={"status": "pending"}).json()
    assert app["id"] in [a["id"] for a in pending]
    with gov.http("outsider") as http:  # a researcher sees their own project's applications only
        assert [a["project"] for a in http.get("/applications").json()] == ["other_project"] * len(
            http.get("/applications").json())
    decided = review(gov, "steward", app).json()
    assert decided["status"] == "approved" and decided["reviews"][0]["reviewer"] == "carol"
    released = query(gov, SQL_ENCOUNTERS, who="outsider")
    assert released.status_code == 200, released.text
    grant = next(g for g in ledger.list_grants(gov.engine, "other_project", 1e-6) if g.dataset == "encounters")
    assert grant.epsilon == 1.5 and grant.rho_spent > 0 and grant.application_id == app["id"]


def test_l3_path_through_the_cli(gov: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    app = apply(gov, datasets=["registry"], epsilon=1.0, ethics_ref="IRB-2026-117",
                purpose="Registry-based survival analysis of rare diseases")
    assert app["status"] == "pending"
    assert app["needs"] == "2 more approving reviewers (from: data_center, data_committee)"
    code, out = steward_cli(gov, "erin", "applications", "--pending", "--details", capsys=capsys)
    assert code == 0 and f"#{app['id']} v1 [pending]" in out and "IRB-2026-117" in out

    code, out = steward_cli(gov, "erin", "review", str(app["id"]), "--approve", "--comment", "data ok",
                            capsys=capsys)
    assert code == 0 and "needs 1 more approving reviewer (from: data_committee)" in out
    for who, expected in [("steward", "reviewer_role"), ("grace", "reviewer_role"),
                          ("alice_steward", "self_review"), ("erin", "already_reviewed")]:
        before = state(gov.engine)
        code, out = steward_cli(gov, who, "review", str(app["id"]), "--approve", "--comment", "ok", capsys=capsys)
        assert code == 2 and f"[{expected}]" in out and "What to do:" in out, (who, out)
        assert state(gov.engine) == before
    assert query(gov, SQL_REGISTRY).json()["code"] == "unknown_dataset"

    code, out = steward_cli(gov, "frank", "review", str(app["id"]), "--approve", "--comment", "committee ok",
                            capsys=capsys)
    assert code == 0 and f"#{app['id']} v1 [approved]" in out
    refused = query(gov, SQL_REGISTRY, epsilon=0.6)  # L3 allows at most 0.5 per release
    assert refused.status_code == 403 and refused.json()["code"] == "epsilon_above_level"
    assert query(gov, SQL_REGISTRY, epsilon=0.4).status_code == 200

    code, out = steward_cli(gov, "steward", "grants", capsys=capsys)
    assert code == 0 and "study1 on registry [active" in out
    # three labels that cannot be misread: granted, spent, largest next release (not "remaining")
    registry = next(g for g in gov.client("steward").grants() if g.project == "study1" and g.dataset == "registry")
    assert (f"epsilon: granted {registry.epsilon:g}, spent {registry.epsilon_spent:.4g}, largest next release "
            f"{registry.largest_next_epsilon:.4g}") in out
    assert registry.epsilon_spent + registry.largest_next_epsilon > registry.epsilon  # epsilons do not add up
    assert "do not add up (rho does)" in out and "remaining" not in out
    code, out = steward_cli(gov, "steward", "budget", "registry", capsys=capsys)
    assert code == 0 and "registry (L3): lifetime cap epsilon 10" in out and "study1 on registry" in out
    assert re.search(r"lifetime cap epsilon 10, spent [0-9.]+, largest next release [0-9.]+\n", out), out
    assert "remaining" not in out


def test_the_cli_runs_as_a_command(gov: Deployment) -> None:
    token = gov.token_dir / "steward.token"  # type: ignore[attr-defined]
    done = subprocess.run([sys.executable, "-m", "veil.cli", "steward", "applications", "--site", gov.url,
                           "--token-file", str(token)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "[approved]" in done.stdout, done.stderr
    missing = subprocess.run([sys.executable, "-m", "veil.cli", "steward", "grants", "--site", gov.url,
                              "--token-file", "/nonexistent/token"], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "cannot read the token file" in missing.stderr


def test_sdk_applies_and_follows_its_application(gov: Deployment) -> None:
    site = ResearcherSite("north", gov.url, gov.tokens["outsider"])
    published = site.catalog()
    assert published["name"].to_list() == ["patients", "encounters", "registry"]
    assert published["level"].to_list() == ["L1", "L2", "L3"] and "columns" not in published.columns
    app = site.apply("Length of stay by department, for planning", ["encounters"], epsilon=0.5,
                     duration_days=10)
    assert app.status == "pending" and app.request.epsilon == 0.5
    amended = site.amend(app.id, epsilon=0.8)
    assert amended.version == 2 and amended.status == "pending" and amended.request.epsilon == 0.8
    assert [a.id for a in site.applications()][0] == app.id
    assert site.withdraw(app.id).status == "withdrawn"
    with pytest.raises(VeilPolicyError, match="not_pending"):
        site.withdraw(app.id)
    site.client.close()


# ------------------------------------------------------------------ bad input


def test_bad_applications_are_refused(gov: Deployment) -> None:
    before = state(gov.engine)
    with gov.http() as http:
        no_ethics = http.post("/applications", json={"purpose": "Survival analysis of registry patients",
                                                     "datasets": ["registry"], "epsilon": 1, "duration_days": 30})
        assert_refused(gov, no_ethics, 422, "ethics_required", before)
        training = http.post("/applications", json={"purpose": "A diagnosis model from encounters",
                                                    "datasets": ["encounters"], "epsilon": 1, "duration_days": 30,
                                                    "uses": ["query", "training"]})
        assert_refused(gov, training, 422, "training_not_allowed", before)
        unknown = http.post("/applications", json={"purpose": "Something about genomes", "datasets": ["genomes"],
                                                   "epsilon": 1, "duration_days": 30})
        assert_refused(gov, unknown, 404, "unknown_dataset", before)
        short = http.post("/applications", json={"purpose": "x", "datasets": ["patients"], "epsilon": 1,
                                                 "duration_days": 30})
        assert_refused(gov, short, 422, "malformed_request", before)
    with gov.http("steward") as http:  # stewards review; they do not apply
        as_steward = http.post("/applications", json={"purpose": "Steward's own study of patients",
                                                      "datasets": ["patients"], "epsilon": 1, "duration_days": 3})
        assert_refused(gov, as_steward, 403, "forbidden", before)
    app = apply(gov)
    with gov.http("researcher") as http:  # researchers do not review
        before = state(gov.engine)
        assert_refused(gov, http.post(f"/applications/{app['id']}/reviews",
                                      json={"decision": "approve", "comment": "mine", "version": 1}),
                       403, "forbidden", before)


def test_unknown_level_in_a_catalog_is_refused(site_config: Path, tmp_path: Path) -> None:
    path = governance_catalog(site_config, tmp_path)
    path.write_text(path.read_text().replace('level = "L3"', 'level = "L4"'))
    with pytest.raises(CatalogError, match="unknown privacy level 'L4'"):
        load_catalog(path)
    path = governance_catalog(site_config, tmp_path, {"L9": {"reviewers": 3}})
    with pytest.raises(CatalogError, match=r"unknown level\(s\) \['L9'\]"):
        load_catalog(path)
    path = governance_catalog(site_config, tmp_path, {"L3": {"reviewers": 1}})
    with pytest.raises(CatalogError, match="reviewers must be at least"):
        load_catalog(path)


def test_changed_and_withdrawn_applications(gov: Deployment) -> None:
    app = apply(gov, purpose="Readmissions after discharge, by outcome")
    with gov.http() as http:
        changed = http.put(f"/applications/{app['id']}", json={**app["request"], "epsilon": 2.5})
    assert changed.status_code == 200 and changed.json()["version"] == 2
    before = state(gov.engine)
    assert_refused(gov, review(gov, "steward", app, version=1), 409, "application_changed", before)
    with gov.http() as http:
        assert_refused(gov, http.put(f"/applications/{app['id']}", json=changed.json()["request"]), 422,
                       "no_change", before)
        assert_refused(gov, http.post("/applications/999999/withdraw"), 404, "unknown_application", before)
    with gov.http("outsider") as http:  # another project's application is not yours to change
        assert_refused(gov, http.post(f"/applications/{app['id']}/withdraw"), 404, "unknown_application", before)
    with gov.http() as http:
        assert http.post(f"/applications/{app['id']}/withdraw").json()["status"] == "withdrawn"
    before = state(gov.engine)
    assert_refused(gov, review(gov, "steward", app, version=2), 409, "application_withdrawn", before)


def test_a_change_to_an_approved_application_needs_a_new_review(gov: Deployment) -> None:
    app = apply(gov, who="outsider", purpose="Outcomes by department over time", epsilon=1.0)
    approved = review(gov, "erin", app, existing="replace").json()  # other_project holds encounters already
    assert approved["status"] == "approved"
    with gov.http("outsider") as http:
        changed = http.put(f"/applications/{app['id']}", json={**app["request"], "epsilon": 3.0}).json()
    assert changed["status"] == "pending" and changed["version"] == 2 and changed["reviews"] == []
    grant = next(g for g in ledger.list_grants(gov.engine, "other_project", 1e-6) if g.dataset == "encounters")
    assert grant.epsilon == 1.0 and grant.status == "active"  # the approved budget stands until reviewed again
    assert review(gov, "frank", changed).json()["status"] == "approved"  # its own grant: the new version sets it
    grant = next(g for g in ledger.list_grants(gov.engine, "other_project", 1e-6) if g.dataset == "encounters")
    assert grant.epsilon == 3.0


def test_approving_above_the_remaining_cap_changes_nothing(gov: Deployment) -> None:
    app = apply(gov, datasets=["registry"], epsilon=50.0, ethics_ref="IRB-2026-200",
                purpose="A very expensive registry study")
    assert review(gov, "erin", app).json()["needs"] == "1 more approving reviewer (from: data_committee)"
    before = state(gov.engine)
    assert_refused(gov, review(gov, "frank", app), 409, "existing_grant", before)  # study1 holds registry
    assert_refused(gov, review(gov, "frank", app, existing="replace"), 409, "cap_exceeded", before)
    assert_refused(gov, review(gov, "frank", app, existing="add"), 409, "cap_exceeded", before)
    with gov.http("steward") as http:
        again = http.get(f"/applications/{app['id']}").json()
    assert again["status"] == "pending" and [r["reviewer"] for r in again["reviews"]] == ["erin"]


def test_two_reviewers_approving_at_once_grant_once(gov: Deployment) -> None:
    token = create_token(gov.engine, "heidi", "researcher", f"race_{uuid.uuid4().hex[:6]}")
    gov.tokens["heidi"] = token
    app = apply(gov, who="heidi", purpose="Two reviewers approving at the same moment")
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def approve(who: str) -> None:
        barrier.wait()
        results[who] = review(gov, who, app)

    threads = [threading.Thread(target=approve, args=(w,)) for w in ("steward", "erin")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results.values())
    assert codes == [200, 409], {w: r.text for w, r in results.items()}
    loser = next(r for r in results.values() if r.status_code == 409)
    assert loser.json()["code"] == "application_decided"
    granted = [e for e in audit.entries(gov.engine) if e.action == "grant" and e.decision == "granted"
               and f"(application {app['id']})" in (e.reason or "")]
    assert len(granted) == 1


def test_expired_and_revoked_grants_are_refused(gov: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    project = f"short_{uuid.uuid4().hex[:6]}"
    gov.tokens["ivan"] = create_token(gov.engine, "ivan", "researcher", project)
    app = apply(gov, who="ivan", duration_days=2.0 / 86400, purpose="A two-second study of encounters")
    assert review(gov, "steward", app).json()["status"] == "approved"
    time.sleep(2.5)
    before = state(gov.engine)
    assert_refused(gov, query(gov, SQL_ENCOUNTERS, who="ivan"), 403, "grant_expired", before)
    with gov.http("steward") as http:
        grant = next(g for g in http.get("/grants").json() if g["project"] == project)
    assert grant["status"] == "expired"

    app = apply(gov, who="ivan", datasets=["patients"], epsilon=1.0, purpose="Patients, to be revoked")
    assert query(gov, SQL_PATIENTS, who="ivan").status_code == 200
    grant = next(g for g in gov.client("steward").grants() if g.project == project and g.dataset == "patients")
    code, out = steward_cli(gov, "steward", "grant", "revoke", str(grant.id), "--reason", "protocol breach",
                            capsys=capsys)
    assert code == 0 and "[revoked until" in out
    before = state(gov.engine)
    assert_refused(gov, query(gov, SQL_PATIENTS, who="ivan"), 403, "grant_revoked", before)
    code, out = steward_cli(gov, "steward", "grant", "revoke", str(grant.id), "--reason", "again", capsys=capsys)
    assert code == 2 and "already revoked" in out
    assert state(gov.engine) == before


def test_caps_set_by_stewards(gov: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = steward_cli(gov, "steward", "budget", "encounters", "--cap", "25", "--reason", "new protocol",
                            capsys=capsys)
    assert code == 0 and "lifetime cap epsilon 25" in out
    ledger.sync_caps(gov.engine, gov.catalog)  # a restart re-reads the catalog: the steward's cap stands
    with gov.engine.connect() as conn:
        cap = conn.execute(select(caps).where(caps.c.dataset == "encounters")).mappings().one()
    assert cap["epsilon"] == 25 and cap["set_by"] == "carol"
    before = state(gov.engine)
    with gov.http("steward") as http:
        spent = next(b for b in http.get("/budgets").json() if b["dataset"] == "encounters")["spent_epsilon"]
        assert spent > 0
        assert_refused(gov, http.put("/budgets/encounters/cap", json={"epsilon": spent / 2}), 409,
                       "cap_below_spent", before)
        assert_refused(gov, http.put("/budgets/nothing/cap", json={"epsilon": 3}), 404, "unknown_dataset", before)
    with gov.http("researcher") as http:
        assert_refused(gov, http.get("/budgets"), 403, "forbidden", before)
    entries = [e for e in audit.entries(gov.engine) if e.action == "cap"]
    assert entries[-1].decision == "changed" and "new protocol" in (entries[-1].reason or "")


def test_audit_log_exports_and_verifies(gov: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    with gov.http("steward") as http:
        verdict = http.get("/audit/verify").json()
        log = http.get("/audit", params={"since": 3, "before": 9, "limit": 5}).json()  # newest first
    assert verdict["ok"], verdict["problems"]
    assert [e["seq"] for e in log] == [8, 7, 6, 5, 4]
    site_args = ["--site-config", str(gov.catalog.path), "--database-url", gov.database_url]
    assert veil(["audit", "export", "--format", "jsonl", "--out", str(tmp_path / "log.jsonl"), *site_args]) == 0
    assert "audit entries to" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == verdict["entries"] and lines[0]["seq"] == 1
    assert {"review", "application", "grant", "cap", "query"} <= {e["action"] for e in lines}
    assert veil(["audit", "export", "--format", "csv", "--since", "10", *site_args]) == 0
    csv_text = capsys.readouterr().out.splitlines()
    assert csv_text[0].startswith("seq,ts,principal") and csv_text[1].startswith("11,")
    assert veil(["audit", "verify", *site_args]) == 0


# ------------------------------------------------------------------ mocks


def test_steward_chooses_a_dp_synthetic_mock(gov: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    site = ResearcherSite("north", gov.url, gov.tokens["researcher"])
    assert site.client.mock("patients").kind == "schema"  # the free default
    with gov.http("steward") as http:
        spent_before = next(b for b in http.get("/budgets").json() if b["dataset"] == "patients")["spent_rho"]
    code, out = steward_cli(gov, "steward", "mock", "patients", "--synthetic", "--epsilon", "1.0", capsys=capsys)
    assert code == 0 and "synthetic rows" in out and "charged epsilon" in out, out
    mock = site.client.mock("patients")
    assert mock.kind == "synthetic" and 0 < mock.epsilon <= 1.0 and mock.rows >= 100 and mock.receipt
    entry = audit.find(gov.engine, mock.receipt)
    assert entry is not None and entry.action == "mock" and entry.decision == "released" and entry.project is None
    with gov.http("steward") as http:
        budget = next(b for b in http.get("/budgets").json() if b["dataset"] == "patients")
        assert budget["spent_rho"] == pytest.approx(spent_before + entry.rho)  # charged to the cap alone
        assert http.get("/audit/verify").json()["ok"]

    preview = site.datasets["patients"].mock(rows=5)  # mock mode serves the synthetic rows, schema intact
    assert preview.height == 5 and preview.schema == site.datasets["patients"].schema
    site.mode = "mock"
    before = state(gov.engine)
    result = site.datasets["patients"].sql("SELECT COUNT(*) FROM patients").release(epsilon=0.5)
    assert result.mock and result.df.height == 1, result.df
    assert state(gov.engine) == before  # nothing live was spent
    site.client.close()

    code, out = steward_cli(gov, "steward", "mock", "patients", "--schema", capsys=capsys)
    assert code == 0 and "schema rows" in out
    assert ResearcherSite("north", gov.url, gov.tokens["researcher"]).client.mock("patients").data is None


def test_a_synthetic_mock_beyond_the_cap_is_refused(gov: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    with gov.http("steward") as http:
        spent = next(b for b in http.get("/budgets").json() if b["dataset"] == "registry")["spent_epsilon"]
        assert http.put("/budgets/registry/cap", json={"epsilon": spent + 0.5}).status_code == 200
        before = state(gov.engine)
        too_much = http.put("/datasets/registry/mock", json={"kind": "synthetic", "epsilon": 2})
        assert_refused(gov, too_much, 409, "budget_exhausted", before)
        assert_refused(gov, http.put("/datasets/registry/mock", json={"kind": "synthetic"}), 422,
                       "malformed_request", before)
    with gov.http("researcher") as http:
        assert_refused(gov, http.put("/datasets/patients/mock", json={"kind": "schema"}), 403, "forbidden", before)


def test_a_level_floor_on_thresholded_group_counts(site_config: Path, tmp_path: Path) -> None:
    """The level's min_group_threshold raises OpenDP's threshold: no group below it is released."""
    from veil.executor.auth import Principal
    from veil.executor.site import Site
    from veil.executor.store import write
    from veil.wire import QueryRequest

    sql = ("SELECT encounter_date, COUNT(*) AS n FROM encounters WHERE encounter_date >= DATE '2024-01-01' "
           "GROUP BY encounter_date")
    thresholds = {}
    for floor in (0, 2000):
        directory = tmp_path / f"floor{floor}"
        directory.mkdir()
        site = Site.open(governance_catalog(site_config, directory, {"L2": {"min_group_threshold": floor}}),
                         f"sqlite:///{directory / 'state.db'}")
        with write(site.engine) as conn:
            ledger.set_grant(conn, site.catalog, "p1", site.catalog.dataset("encounters"), 5.0, by="carol")
        release = site.query(Principal("alice", "researcher", "p1"), QueryRequest(sql=sql, epsilon=0.5, delta=1e-8))
        assert all(row["n"] >= release.threshold for row in release.rows)
        thresholds[floor] = release.threshold
        site.engine.dispose()
    assert thresholds[0] < 2000 and thresholds[2000] == 2000
