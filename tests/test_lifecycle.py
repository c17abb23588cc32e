"""A dataset's lifecycle on a real executor: draft -> active -> suspended -> active -> retired -> destroyed, each
change under its level's review rule (L3: both offices), audited, refused uses saying since when and why,
destruction leaving no copy on disk and recording what it deleted, and a deletion cut short finished at start."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from conftest import BACKENDS, Deployment, add_stewards, deploy, make_database
from veil.executor import audit, ledger
from veil.executor.synth import synthesize

QUERY = {"sql": "SELECT COUNT(*) AS n FROM encounters", "epsilon": 0.1}


@pytest.fixture(params=BACKENDS)
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """A site of its own data (destroyed by the test): patients a draft L1 dataset, encounters L3."""
    synthesize(tmp_path / "data", sites=1, patients=300, seed=3)
    config = tmp_path / "data" / "north" / "site.toml"
    raw = tomllib.loads(config.read_text())
    raw["datasets"]["patients"]["state"] = "draft"
    raw["datasets"]["encounters"]["level"] = "L3"
    config.write_text(tomli_w.dumps(raw))
    url, drop = make_database(request.param, tmp_path)
    d = deploy(config, url, tmp_path, {"encounters": 5.0})
    add_stewards(d, tmp_path, {"erin": "data_center", "frank": "data_committee"})
    yield d
    d.stop()
    drop()


def steward(d: Deployment, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli", "steward", *args, "--site", d.url, "--token-file",
                           str(d.token_dir / f"{who}.token")],  # type: ignore[attr-defined]
                          capture_output=True, text=True, timeout=120)


def move(d: Deployment, who: str, dataset: str, to: str, reason: str) -> dict:
    with d.http(who) as http:
        answer = http.post(f"/datasets/{dataset}/transitions", json={"to": to, "reason": reason})
    assert answer.status_code == 201, answer.text
    return answer.json()


def review(d: Deployment, who: str, request_id: int, decision: str = "approve") -> dict:
    with d.http(who) as http:
        answer = http.post(f"/dataset-transitions/{request_id}/reviews",
                           json={"decision": decision, "comment": f"{who}: checked the minutes"})
    return {**answer.json(), "http": answer.status_code}


def test_a_dataset_from_draft_to_destroyed(site: Deployment) -> None:
    d = site
    # a draft serves nothing and is not even listed to researchers; one steward activates an L1 dataset
    with d.http() as http:
        assert [x["name"] for x in http.get("/datasets").json()] == ["encounters"]
    assert d.client("steward").dataset_state("patients").state == "draft"
    assert move(d, "steward", "patients", "active", "data dictionary checked")["status"] == "done"
    with d.http() as http:
        assert http.post("/query", json={"sql": "SELECT COUNT(*) AS n FROM patients", "epsilon": 0.1}
                         ).status_code == 200

    # an incident: one steward suspends at once; uses are refused with since when, by whom and why
    done = steward(d, "erin", "dataset", "suspend", "encounters", "--reason", "incident 42: wrong extract")
    assert done.returncode == 0 and "[done]" in done.stdout, done.stdout + done.stderr
    with d.http() as http:
        refused = http.post("/query", json=QUERY)
    assert refused.status_code == 409 and refused.json()["code"] == "dataset_suspended", refused.text
    assert "by erin (incident 42: wrong extract)" in refused.json()["message"]
    with d.http() as http:  # still listed, with its state, so that a researcher's panel can say why
        assert {x["name"]: x["state"] for x in http.get("/datasets").json()} == {
            "patients": "active", "encounters": "suspended"}
        assert http.get("/datasets/encounters").json()["state"] == "suspended"

    # resuming reopens access: L3 needs both offices, and nobody reviews their own request
    asked = move(d, "erin", "encounters", "active", "extract fixed")
    assert asked["status"] == "pending" and "data_committee" in asked["needs"]
    assert review(d, "erin", asked["id"])["code"] == "own_request"
    with d.http("frank") as http:  # one request at a time per dataset
        second = http.post("/datasets/encounters/transitions", json={"to": "retired", "reason": "meanwhile"})
    assert second.status_code == 409 and second.json()["code"] == "transition_pending", second.text
    assert f"request {asked['id']}" in second.json()["message"]
    assert review(d, "steward", asked["id"])["code"] == "cannot_review"  # carol holds no office
    with d.http() as http:
        assert http.post("/query", json=QUERY).status_code == 409  # still suspended while pending
    assert review(d, "frank", asked["id"])["http"] == 200
    with d.http() as http:
        assert http.post("/query", json=QUERY).status_code == 200

    # retiring revokes every grant and refuses new applications; a rejected request changes nothing
    asked = move(d, "frank", "encounters", "retired", "study period over")
    assert review(d, "erin", asked["id"], "reject")["status"] == "rejected"
    assert d.client("steward").dataset_state("encounters").state == "active"
    asked = move(d, "frank", "encounters", "retired", "study period over, minutes 2026-7")
    assert review(d, "erin", asked["id"])["status"] == "done"
    assert all(g.status == "revoked" for g in ledger.list_grants(d.engine, None, 1e-6) if g.dataset == "encounters")
    with d.http() as http:
        refused = http.post("/query", json=QUERY)
        applied = http.post("/applications", json={"purpose": "More readmission analyses", "datasets": ["encounters"], "epsilon": 1.0,
                                                   "duration_days": 30})
    assert refused.status_code == 410 and "retired since" in refused.json()["message"], refused.text
    assert applied.status_code == 410 and applied.json()["code"] == "dataset_retired", applied.text

    # destruction: both offices; every copy's digest recorded, then no copy left on disk
    path = d.catalog.dataset("encounters").path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    asked = move(d, "erin", "encounters", "destroyed", "retention period over")
    assert asked["status"] == "pending" and path.exists()
    destroyed = review(d, "frank", asked["id"])
    assert destroyed["status"] == "done" and not path.exists(), destroyed
    assert {"what": str(path), "sha256": digest, "bytes": destroyed["deleted"][0]["bytes"]} in destroyed["deleted"]
    entry = next(e for e in reversed(audit.entries(d.engine)) if e.action == "dataset")
    assert entry.decision == "destroyed" and digest in (entry.reason or "") and "approved by frank" in entry.reason
    assert audit.verify(d.engine).ok
    shown = steward(d, "steward", "dataset", "state", "encounters")
    assert "encounters: destroyed" in shown.stdout, shown.stdout + shown.stderr
    assert "destroyed" in steward(d, "steward", "dataset", "requests", "--all").stdout

    # the executor starts without the file; a copy that reappeared (a deletion cut short) is deleted at start
    d.executor.stop()
    shutil.copy(d.catalog.dataset("patients").path, path)
    d.executor.start()
    assert not path.exists()
    with d.http() as http:
        assert [x["name"] for x in http.get("/datasets").json()] == ["patients"]
    with d.http("steward") as http:
        again = http.post("/datasets/encounters/transitions", json={"to": "active", "reason": "undo"})
    assert again.status_code == 409 and again.json()["code"] == "bad_transition", again.text
