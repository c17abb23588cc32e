"""The PySyft 0.10 bridge (`veil syft serve`, veil_syft/): a real executor, the bridge and a PySyft data scientist
over syft's own in-memory transport (a mock Google Drive service, no network), in the bridge's environment
(.venv-syft, scripts/setup-syft.sh), driven by tests/syft_driver.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Deployment, write_study

ROOT = Path(__file__).resolve().parent.parent
SYFT_PYTHON = Path(os.environ.get("VEIL_SYFT_VENV") or ROOT / ".venv-syft") / "bin" / "python"

needs_syft = pytest.mark.skipif(not SYFT_PYTHON.exists(),
                                reason=f"the PySyft bridge's environment ({SYFT_PYTHON.parent.parent}) is absent: run "
                                       "scripts/setup-syft.sh (scripts/test.sh does)")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, site_config: Path) -> dict:
    """One executor (study1 granted epsilon 5 on encounters), one bridge, one data scientist; what they saw."""
    from conftest import deploy, make_database

    root = tmp_path_factory.mktemp("syft")
    url, drop = make_database("sqlite", root)
    d = deploy(site_config, url, root, {"encounters": 5.0})
    token = root / "bridge.token"
    token.write_text(d.tokens["researcher"])
    with d.http("steward") as http:  # the steward's DP synthetic mock: the one syft publishes for patients
        chosen = http.put("/datasets/patients/mock", json={"kind": "synthetic", "epsilon": 1.0, "rows": 50})
        assert chosen.status_code == 200, chosen.text
    for who in ("outsider", "steward"):
        (root / f"{who}.token").write_text(d.tokens[who])
    out = root / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PRE_SYNC": "true"}
    done = subprocess.run([str(SYFT_PYTHON), str(ROOT / "tests" / "syft_driver.py"), d.url, str(token),
                           d.catalog.site, str(root / "work"), str(out), str(root / "outsider.token"),
                           str(root / "steward.token")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    seen = json.loads(out.read_text())
    yield {"seen": seen, "deployment": d, "root": root}
    d.stop()
    drop()


def _audit(d: Deployment, **filters: str) -> list[dict]:
    with d.http("steward") as http:
        return http.get("/audit", params={"limit": 1000, **filters}).json()


@needs_syft
def test_data_scientist_lists_datasets_and_reads_the_mock(run: dict) -> None:
    seen = run["seen"]
    assert {"encounters", "patients"} <= set(seen["datasets"]) and seen["published_again"] == []
    assert "Veil level L2" in seen["summary"] and "Only DP releases leave the site" in seen["summary"]
    assert seen["mock_rows"] > 0 and "patient_id" in seen["mock_columns"]
    assert seen["mock_metadata"]["level"] == "L2" and seen["mock_metadata"]["columns"]
    assert seen["ds_private_files"] == []  # the private part is never a file syft syncs
    patients = seen["patients"]
    assert patients["mock"]["kind"] == "synthetic" and patients["rows"] == 50
    assert "DP synthetic rows chosen by the steward" in patients["summary"] and "Veil level L1" in patients["summary"]


@needs_syft
def test_dp_count_job_returns_a_release_with_a_verifiable_receipt(run: dict) -> None:
    seen, d, root = run["seen"], run["deployment"], run["root"]
    assert [o["status"] for o in seen["pass1"]] == ["waiting"]  # no release before the steward approves
    assert [o["status"] for o in seen["pass2"]] == ["released"] and seen["ds_status"] == "done"
    release = seen["release"]
    assert release["kind"] == "release" and release["dataset"] == "encounters" and release["rows"][0]["n"] > 0
    assert release["cost"]["rho"] > 0 and release["receipt"] == seen["pass2"][0]["receipt"]
    study = write_study(root, {d.catalog.site: d})
    check = subprocess.run([sys.executable, "-m", "veil.cli", "receipts", "verify",
                            str(root / "work" / "receipt.ipynb"), "--study", str(study)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all 1 recorded releases are confirmed" in check.stdout


@needs_syft
def test_charged_exactly_once_however_often_processed(run: dict) -> None:
    seen, d = run["seen"], run["deployment"]
    receipt = seen["release"]["receipt"]
    assert [o["receipt"] for o in seen["pass3"] + seen["pass4"]] == [receipt, receipt]
    assert seen["release_after_reruns"] == seen["release"]
    released = [e for e in _audit(d, action="query", decision="released", project="study1")
                if e["dataset"] == "encounters"]
    assert [e["hash"] for e in released] == [receipt]
    assert d.spent("encounters")["rho"] == pytest.approx(seen["release"]["cost"]["rho"])


@needs_syft
def test_without_a_grant_the_job_waits_for_a_veil_application(run: dict) -> None:
    seen, d = run["seen"], run["deployment"]
    [first], [second], [third] = seen["pass8"], seen["pass9"], seen["pass10"]
    assert first["status"] == second["status"] == "waiting" and "application #" in first["message"]
    app = seen["application"]
    assert app["project"] == "other_project" and app["request"]["datasets"] == ["encounters"] \
        and "PySyft job" in app["request"]["purpose"]
    assert seen["review"]["status"] == "approved", seen["review"]
    assert third["status"] == "released" and seen["no_grant_status"] == "done"
    refused = [e for e in _audit(d, action="query", decision="refused") if e["project"] == "other_project"]
    assert len(refused) == 1  # one no_grant refusal, then the bridge asked the application, not the query


@needs_syft
def test_job_reading_private_data_is_refused_and_audited(run: dict) -> None:
    seen, d = run["seen"], run["deployment"]
    [outcome] = seen["pass5"]
    assert outcome["status"] == "refused" and "only a Veil query" in outcome["message"]
    assert seen["peek_status"] == "rejected" and "not_a_veil_request" in seen["peek_reason"]
    entries = {e["hash"]: e for e in _audit(d, action="bridge", decision="refused")}
    entry = entries[outcome["receipt"]]
    assert "peek" not in (entry["query"] or "") and "pandas" in entry["reason"]
    assert entry["principal"] == "alice" and entry["project"] == "study1"
    # approved in syft before the bridge saw it: syft's approval bypasses nothing
    [outcome2] = seen["pass6"]
    assert outcome2["status"] == "refused" and seen["peek2_status"] == "failed"
    assert seen["peek2_refusal"]["receipt"] == outcome2["receipt"] in {
        e["hash"] for e in _audit(d, action="bridge", decision="refused")}
    # rows asked for as a declared request: sent to the site, which refuses and audits it itself
    [outcome3] = seen["pass7"]
    assert outcome3["status"] == "refused" and seen["rows_status"] == "failed" and outcome3["receipt"]
    site_refusals = {e["hash"]: e for e in _audit(d, action="query", decision="refused")}
    assert outcome3["receipt"] in site_refusals and seen["rows_refusal"]["receipt"] == outcome3["receipt"]
    assert d.spent("encounters")["rho"] == pytest.approx(seen["release"]["cost"]["rho"])  # refusals charge nothing


@needs_syft
def test_training_job_returns_a_dp_model_with_a_verifiable_receipt(run: dict) -> None:
    """A declared DP-SGD request: started once at the site (after the Veil application its use needs, where it
    needs one), followed while it trains, answered with the weights, the job's DP figures and a receipt that
    names the weights' digest; processed again, the same model and no second job."""
    seen, d, root = run["seen"], run["deployment"], run["root"]
    statuses = [p[0]["status"] for p in seen["train_passes"]]
    assert statuses[-1] == "released" and set(statuses[:-1]) <= {"waiting", "training"}, seen["train_passes"]
    info = seen["train_job"]
    assert info["state"] == "done" and 0 < info["epsilon"] <= 1.0 and info["evaluation"]["receipt"] == info["receipt"]
    assert seen["train_status"] == "done" and seen["train_weights"] > 100
    assert [o["receipt"] for o in seen["train_again"]] == [info["receipt"]]
    with d.http() as http:
        assert [j["id"] for j in http.get("/jobs").json()] == [info["id"]]  # one job, however often processed
    study = write_study(root, {d.catalog.site: d})
    check = subprocess.run([sys.executable, "-m", "veil.cli", "receipts", "verify", str(root / "work" / "train_receipt.ipynb"),
                            "--study", str(study)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "all 1 recorded releases are confirmed" in check.stdout, check.stdout + check.stderr
    # a receipt whose weights digest is not the site's is not confirmed
    forged = json.loads((root / "work" / "train_receipt.ipynb").read_text())
    forged["cells"][0]["outputs"][0]["metadata"]["veil"]["releases"][0]["weights_sha256"] = "0" * 64
    (root / "forged.ipynb").write_text(json.dumps(forged))
    check = subprocess.run([sys.executable, "-m", "veil.cli", "receipts", "verify", str(root / "forged.ipynb"),
                            "--study", str(study)], capture_output=True, text=True, timeout=120)
    assert check.returncode != 0 and "records a different release" in check.stdout
    train = [e for e in _audit(d, action="train", project="study1") if e["dataset"] == "patients"]
    assert [e["decision"] for e in train] == ["settled", "reserved"]  # newest first: one job, reserved and settled


@needs_syft
def test_an_executor_that_does_not_answer_leaves_the_job_waiting(run: dict) -> None:
    [outcome] = run["seen"]["executor_down"]
    assert outcome["status"] == "waiting" and "did not answer (ConnectError)" in outcome["message"]


def test_training_requests_are_read_without_running_anything() -> None:
    """veil_request.json with kind 'training' becomes the executor's TrainRequest body; what it lacks or adds is
    refused with what is accepted."""
    from veil_syft.requests import NotAVeilRequest, TrainingRequest, _from_mapping

    data = {"kind": "training", "dataset": "patients", "features": ["age"], "label": "sex", "epsilon": 1.0,
            "delta": 1e-5, "epochs": 3, "batch_size": 32, "learning_rate": 0.5, "holdout": 0.3}
    request = _from_mapping(data, "veil_request.json")
    assert isinstance(request, TrainingRequest) and request.epsilon == 1.0
    assert request.body() == {"dataset": "patients", "features": ["age"], "label": "sex", "holdout": 0.3,
                              "train": {"epsilon": 1.0, "delta": 1e-5, "epochs": 3, "batch_size": 32,
                                        "learning_rate": 0.5}}
    with pytest.raises(NotAVeilRequest, match="without epochs.*accepts only a Veil query or training request"):
        _from_mapping({k: v for k, v in data.items() if k != "epochs"}, "veil_request.json")
    with pytest.raises(NotAVeilRequest, match="does not know for training: \\['script'\\]"):
        _from_mapping({**data, "script": "import os"}, "veil_request.json")
    with pytest.raises(NotAVeilRequest, match="kind 'shell'"):
        _from_mapping({**data, "kind": "shell"}, "veil_request.json")


def test_veil_syft_serve_says_how_to_install_the_bridge(tmp_path: Path, site_config: Path) -> None:
    env = {**os.environ, "VEIL_SYFT_VENV": str(tmp_path / "missing")}
    done = subprocess.run([sys.executable, "-m", "veil.cli", "syft", "serve", "--site-config", str(site_config),
                           "--token-file", str(tmp_path / "t")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "scripts/setup-syft.sh" in done.stderr


@needs_syft
def test_pysyft_notebook_runs_as_written(deployer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """notebooks/pysyft/07-pysyft.ipynb runs on a plain kernel of .venv-syft (not the `veil` kernel, so it lives
    outside the tutorials that `veil demo --headless` runs): its cells run here in order, in that environment."""
    import nbformat

    d = deployer(grants={"encounters": 5.0})
    token = tmp_path / "bridge.token"
    token.write_text(d.tokens["researcher"])
    nb = nbformat.read(ROOT / "notebooks" / "pysyft" / "07-pysyft.ipynb", as_version=4)
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VEIL_EXECUTOR_URL": d.url, "VEIL_BRIDGE_TOKEN_FILE": str(token),
           "VEIL_SITE": d.catalog.site}
    done = subprocess.run([str(SYFT_PYTHON), str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "published: ['patients', 'encounters']" in done.stdout or "published: ['encounters', 'patients']" \
        in done.stdout
    assert "status='released'" in done.stdout and "rejected - not_a_veil_request" in done.stdout
    assert "released - DP-SGD model (done)" in done.stdout and "model epsilon:" in done.stdout
    assert d.spent("encounters")["rho"] > 0


def test_bridge_refusals_are_audited_and_charge_nothing(deployer) -> None:  # type: ignore[no-untyped-def]
    """POST /bridge/refusals (the executor's side of the bridge, no PySyft needed): a valid token records a refusal
    under its own name; no token records nothing; nothing is charged."""
    d = deployer(grants={"encounters": 5.0})
    body = {"job": "syft-abc12345", "submitter": "analyst@university.example", "code": "not_a_veil_request",
            "message": "main.py imports pandas", "dataset": "encounters"}
    with d.http() as http:
        answer = http.post("/bridge/refusals", json=body)
        assert answer.status_code == 201, answer.text
        assert answer.json()["code"] == "not_a_veil_request" and answer.json()["receipt"]
        assert http.post("/bridge/refusals", json={**body, "message": "two\nlines"}).status_code == 422
    with d.http(None) as anonymous:
        assert anonymous.post("/bridge/refusals", json=body).status_code == 401
    [entry] = [e for e in _audit(d, action="bridge") if e["hash"] == answer.json()["receipt"]]
    assert (entry["principal"], entry["project"], entry["decision"], entry["dataset"], entry["rho"]) == \
        ("alice", "study1", "refused", "encounters", 0.0)
    assert "pysyft job syft-abc12345 from analyst@university.example" in entry["reason"]
    assert d.spent("encounters")["rho"] == 0.0


def test_the_bridge_reaches_the_site_over_http_only() -> None:
    """veil_syft/ imports no Veil module (least of all the executor) and no torch: the standard library, httpx,
    PySyft's syft_rds and itself."""
    import ast

    allowed = {"httpx", "syft_rds", "veil_syft"}
    for path in (ROOT / "veil_syft").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{path.name} imports {name}"
