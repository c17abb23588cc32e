"""The lab extension's server side (jupyter_server extension `veil.lab`) in a real Jupyter server against
three real executors: budgets that move with a live release, datasets and mock rows, receipts, the
steward desk (approve, revoke, cap, audit), refusals passed through, an unreachable executor shown as
such, and no executor token ever in a response."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from conftest import Deployment, write_study
from veil.kernel.sdk import Site as ResearcherSite
from veil.kernel.study import load_study
from veil.local import free_port
from veil.wire import ApplicationRequest, ReviewRequest, StandingInfo, StandingQuery

JUPYTER_TOKEN = "lab-test-token"


def write_steward(directory: Path, sites: dict[str, Deployment], urls: dict[str, str] | None = None) -> Path:
    """A steward's config: every site's URL and a file with the steward's token there."""
    for name, d in sites.items():
        (directory / f"{name}-steward.token").write_text(d.tokens["steward"] + "\n")
    path = directory / "steward.toml"
    path.write_text(tomli_w.dumps({"sites": {name: {"url": (urls or {}).get(name, d.url),
                                                    "token_file": f"{name}-steward.token"}
                                             for name, d in sites.items()}}))
    return path


class Lab:
    """A running Jupyter server with the veil.lab extension, and an HTTP client with its token."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.port = root, free_port()
        self.log = (root / f"jupyter-{self.port}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={JUPYTER_TOKEN}", f"--ServerApp.root_dir={root}",
             "--ServerApp.jpserver_extensions={'veil.lab': True}"],
            env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/veil/api/",
                                 headers={"Authorization": f"token {JUPYTER_TOKEN}"}, timeout=60)
        self.bodies: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/api/status", timeout=2,
                             headers={"Authorization": f"token {JUPYTER_TOKEN}"}).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"the Jupyter server did not start; see {self.log.name}")

    def get(self, path: str, expect: int = 200, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        self.bodies.append(response.text)
        assert response.status_code == expect, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any], expect: int = 200) -> Any:
        response = self.http.post(path, json=body)
        self.bodies.append(response.text)
        assert response.status_code == expect, response.text
        return response.json()

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def lab(sites: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    server = Lab(root, {"VEIL_STUDY": str(write_study(root, sites)), "VEIL_STEWARD": str(write_steward(root, sites))})
    yield server
    server.stop()
    tokens = {t for d in sites.values() for t in d.tokens.values()}
    assert not any(t in body for t in tokens for body in server.bodies)  # credentials never reach the browser


def test_the_budget_moves_by_the_cost_of_a_live_release(lab: Lab, sites: dict[str, Deployment]) -> None:
    before = lab.get("budget")
    assert before["project"] == "study1" and set(before["sites"]) == set(sites)
    assert all(s["status"] == "ok" for s in before["sites"].values())
    study = load_study(lab.root / "study.toml")
    result = study.sites["north"].datasets["patients"].sql("SELECT COUNT(*) AS n FROM patients").release(epsilon=0.3)
    after = lab.get("budget")

    def grant(state: dict[str, Any], site: str) -> dict[str, Any]:
        return next(g for g in state["sites"][site]["grants"] if g["dataset"] == "patients")
    assert grant(after, "north")["rho_spent"] - grant(before, "north")["rho_spent"] == pytest.approx(result.cost["north"]["rho"])
    assert grant(after, "central") == grant(before, "central")
    verified = lab.post("receipts/verify", {"releases": [
        result.provenance[0], {**result.provenance[0], "receipt": "ab" * 32}]})["results"]
    assert [r["ok"] for r in verified] == [True, False] and "does not know receipt" in verified[1]["detail"]


def test_datasets_and_mock_rows(lab: Lab) -> None:
    listing = lab.get("datasets")["sites"]
    encounters = next(d for d in listing["valley"]["datasets"] if d["name"] == "encounters")
    assert encounters["level"] in ("L1", "L2", "L3") and {c["name"] for c in encounters["columns"]} >= {"department"}
    mock = lab.get("datasets/valley/encounters/mock", rows=5)
    assert len(mock["rows"]) == 5 and "department" in mock["columns"]
    missing = lab.get("datasets/valley/no_such/mock", expect=400)
    assert missing["code"] == "bad_request"


def test_a_steward_approves_revokes_and_caps_from_the_desk(lab: Lab, sites: dict[str, Deployment]) -> None:
    assert lab.get("steward") == {"enabled": True, "sites": sorted(sites)}
    signed_in = lab.get("steward/whoami")["sites"]  # who the desk acts as at each site
    assert set(signed_in) == set(sites) and all(s["status"] == "ok" for s in signed_in.values())
    assert signed_in["central"]["whoami"]["principal"] == "carol" and signed_in["central"]["whoami"]["role"] == "steward"
    applicant = ResearcherSite("central", sites["central"].url, sites["central"].tokens["outsider"])
    app = applicant.apply("Length of stay by department, for bed planning", ["encounters"], epsilon=1.5,
                          duration_days=30)
    pending = lab.get("steward/applications", status="pending")["sites"]["central"]["applications"]
    assert [a["id"] for a in pending] == [app.id] and pending[0]["rule"]["reviewers"] >= 1

    stale = lab.post(f"steward/applications/central/{app.id}/reviews",
                     {"decision": "approve", "comment": "ok", "version": 2}, expect=409)
    assert stale["code"] and stale["message"]  # the executor's refusal, passed through
    approved = lab.post(f"steward/applications/central/{app.id}/reviews",
                        {"decision": "approve", "comment": "bed planning: fine", "version": 1})
    assert approved["status"] == "approved"
    budgets = lab.get("steward/budgets")["sites"]["central"]["budgets"]
    grant = next(g for b in budgets for g in b["grants"] if g["project"] == "other_project")
    assert grant["epsilon"] == 1.5 and grant["status"] == "active"

    revoked = lab.post(f"steward/grants/central/{grant['id']}/revoke", {"reason": "project ended"})
    assert revoked["status"] == "revoked"
    cap = lab.post("steward/budgets/central/encounters/cap", {"epsilon": 90.0, "reason": "annual review"})
    assert cap["cap_epsilon"] == 90.0
    load_study(lab.root / "study.toml").sites["central"].datasets["patients"].sql(
        "SELECT COUNT(*) AS n FROM patients").release(epsilon=0.2)  # something spent on central's patients
    below = lab.post("steward/budgets/central/patients/cap", {"epsilon": 0.01, "reason": "oops"}, expect=409)
    assert "spent" in below["message"]

    entries = lab.get("steward/audit", site="central", since=0, limit=500)["entries"]
    assert any("project ended" in (e["reason"] or "") for e in entries)
    assert [e["seq"] for e in entries] == sorted((e["seq"] for e in entries), reverse=True)  # newest first
    page = lab.get("steward/audit", site="central", limit=2)
    assert page == {"entries": entries[:2], "total": len(entries)}
    assert lab.get("steward/audit", site="central", limit=2, before=entries[1]["seq"])["entries"] == entries[2:4]
    cap_change = lab.get("steward/audit", site="central", action="cap", decision="changed")
    assert cap_change["total"] == 1 and "annual review" in cap_change["entries"][0]["reason"]
    release = lab.get("steward/audit", site="central", action="query", decision="released")["entries"][0]
    assert release["epsilon_at_reporting_delta"] > 0 and release["epsilon"] == 0
    export = lab.get("steward/audit/export", site="central", format="csv", action="cap", decision="changed")
    assert export["filename"] == "central-audit.csv" and len(export["content"].splitlines()) == 2
    assert lab.get("steward/audit/verify", site="central")["ok"] is True


def test_standing_queries_per_site_with_their_next_release(lab: Lab, sites: dict[str, Deployment]) -> None:
    assert lab.get("standing") == {"project": "study1", "sites": {name: {"status": "ok", "standing": []} for name in sites}}
    start = datetime.now(UTC).date()
    spec = StandingQuery(name="visits_weekly", sql="SELECT COUNT(*) FROM encounters", time_column="encounter_date",
                         start=start, horizon=8, max_windows=2)
    applicant = ResearcherSite("north", sites["north"].url, sites["north"].tokens["researcher"])
    filed = applicant.client.apply(ApplicationRequest(
        purpose="Weekly visits, for surveillance", datasets=["encounters"], epsilon=1.0, duration_days=90,
        uses=["surveillance"], standing=spec))
    if filed.status == "pending":  # encounters is L2: a steward approves it
        sites["north"].client("steward").review(filed.id, ReviewRequest(decision="approve", comment="ok", version=1))
    listing = lab.get("standing")
    assert listing["sites"]["central"] == listing["sites"]["valley"] == {"status": "ok", "standing": []}
    [info] = listing["sites"]["north"]["standing"]
    assert StandingInfo.model_validate(info).spec == spec  # the wire's shape, as the panel reads it
    assert info["status"] == "active" and info["epsilon"] == pytest.approx(1.0) and info["epsilon"] <= 1.0 and info["rho"] > 0
    assert info["windows_released"] == 0 and info["next_window"] == 0
    first_release = datetime.fromisoformat(f"{start + timedelta(days=7)}T00:00:00+00:00")  # window 0 ends
    assert datetime.fromisoformat(info["next_release_at"]) == first_release


def test_a_request_without_jupyters_token_is_refused(lab: Lab) -> None:
    response = httpx.get(f"http://127.0.0.1:{lab.port}/veil/api/budget", timeout=10)
    assert response.status_code == 403


def test_an_unreachable_executor_and_no_steward_config(sites: dict[str, Deployment], tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = Lab(tmp_path, {"VEIL_STUDY": str(write_study(tmp_path, sites, {"valley": dead})), "VEIL_STEWARD": ""})
    try:
        state = server.get("budget")["sites"]
        assert state["valley"]["status"] == "unreachable" and "could not be reached" in state["valley"]["error"]
        assert state["north"]["status"] == state["central"]["status"] == "ok"
        standing = server.get("standing")["sites"]  # one site down does not blank the others
        assert standing["valley"]["status"] == "unreachable" and "could not be reached" in standing["valley"]["error"]
        assert standing["north"]["status"] == standing["central"]["status"] == "ok"
        assert server.get("steward") == {"enabled": False, "sites": []}
        assert server.get("steward/whoami", expect=503)["code"] == "no_config"
        off = server.get("steward/budgets", expect=503)
        assert off["code"] == "no_config" and "VEIL_STEWARD" in off["message"]
    finally:
        server.stop()
