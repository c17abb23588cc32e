"""Run in the bridge's environment (.venv-syft) by tests/test_syft_bridge.py: a Veil site's bridge and a PySyft
data scientist over syft's own in-memory transport (mock Google Drive service; no network), against a real
executor. Writes what each side saw to a JSON file for the test to check.

usage: syft_driver.py EXECUTOR_URL TOKEN_FILE SITE WORKDIR OUT_JSON OTHER_PROJECT_TOKEN_FILE STEWARD_TOKEN_FILE
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
from syft_rds import SyftRDSClient

from veil_syft.api import ExecutorAPI
from veil_syft.bridge import MODEL_FOLDER, OUTPUT_FOLDER, REFUSAL_FOLDER, Bridge

DO, DS = "steward@north.example", "analyst@university.example"
COUNT = 'release = study.dataset("encounters").sql("SELECT COUNT(*) AS n FROM encounters").release(epsilon=0.5)\n' \
        "print(release.rows)\n"
TRAIN = {"kind": "training", "dataset": "patients", "features": ["age", "enrolled_year", "region"], "label": "sex",
         "epsilon": 1.0, "delta": 1e-5, "epochs": 2, "batch_size": 64, "learning_rate": 0.5, "optimizer": "sgd"}
PEEK = 'import pandas as pd\n\ndf = pd.read_parquet("/data/north/encounters.parquet")\nprint(df.head())\n'


def job(ds: SyftRDSClient, name: str) -> object:
    return next(j for j in ds.jobs if j.name == name)


def submit_script(ds: SyftRDSClient, folder: Path, script: str, name: str) -> None:
    """The data scientist submits `script` as job `name` (its main.py in `folder`), the PySyft way."""
    folder.mkdir()
    (folder / "main.py").write_text(script)
    ds.submit_python_job(user=DO, code_path=str(folder / "main.py"), job_name=name, force_submission=True)


def outputs(ds: SyftRDSClient, name: str) -> dict[str, Path]:
    return {p.name: p for p in job(ds, name).output_paths}


def main(url: str, token_file: str, site: str, workdir: str, out: str, other_token: str, steward_token: str) -> None:
    root = Path(workdir)
    seen: dict[str, object] = {}
    ds, do = SyftRDSClient.pair_with_mock_drive_service_connection(
        email1=DO, email2=DS, base_path1=str(root / "do"), base_path2=str(root / "ds"), use_in_memory_cache=False)
    bridge = Bridge(do, ExecutorAPI(url, Path(token_file).read_text().strip()), site, root / "bridge-state")
    seen["published"] = bridge.publish()
    seen["published_again"] = bridge.publish()  # already there: nothing new

    # the data scientist: list the datasets and read the mock
    ds.sync()
    datasets = {d.name: d for d in ds.datasets.get_all()}
    seen["datasets"] = sorted(datasets)
    enc = datasets["encounters"]
    seen["summary"] = enc.summary
    mock_csv = next(p for p in enc.mock_files if p.suffix == ".csv")
    with mock_csv.open() as f:
        rows = list(csv.DictReader(f))
    seen["mock_columns"], seen["mock_rows"] = list(rows[0]), len(rows)
    seen["mock_metadata"] = json.loads(next(p for p in enc.mock_files if p.name == "veil_metadata.json").read_text())
    try:
        private = [str(p) for p in enc.private_dir.rglob("*")] if enc.private_dir.exists() else []
    except Exception:  # the data scientist has no private part at all
        private = []
    seen["ds_private_files"] = private

    pat = datasets["patients"]
    with next(p for p in pat.mock_files if p.suffix == ".csv").open() as f:
        seen["patients"] = {"summary": pat.summary, "rows": len(list(csv.DictReader(f))), "mock": json.loads(
            next(p for p in pat.mock_files if p.name == "veil_metadata.json").read_text())["mock"]}

    # a DP count job, the PySyft way
    submit_script(ds, root / "count_job", COUNT, "dp_count")
    seen["pass1"] = [o.__dict__ for o in bridge.process()]  # pending: waits for the steward's approval
    job(do, "dp_count").approve(reason="looks fine")  # the steward approves in syft
    seen["pass2"] = [o.__dict__ for o in bridge.process()]
    ds.sync()
    seen["ds_status"] = job(ds, "dp_count").status
    release_dir = outputs(ds, "dp_count")[OUTPUT_FOLDER]
    seen["release"] = json.loads((release_dir / "release.json").read_text())
    shutil.copy(release_dir / "receipt.ipynb", root / "receipt.ipynb")

    # processed twice more: a re-run with the bridge's record, and one without it (the executor's request_id)
    job(do, "dp_count").rerun()
    seen["pass3"] = [o.__dict__ for o in bridge.process()]
    for record in (root / "bridge-state" / "releases").iterdir():
        record.unlink()
    job(do, "dp_count").rerun()
    seen["pass4"] = [o.__dict__ for o in bridge.process()]
    ds.sync()
    seen["release_after_reruns"] = json.loads((outputs(ds, "dp_count")[OUTPUT_FOLDER] / "release.json").read_text())

    # a job that tries to read the private data
    submit_script(ds, root / "peek_job", PEEK, "peek")
    seen["pass5"] = [o.__dict__ for o in bridge.process()]
    ds.sync()
    seen["peek_status"] = job(ds, "peek").status
    seen["peek_reason"] = job(ds, "peek").review_reason

    # the same job approved in syft before the bridge saw it: still refused, with the refusal as its output
    submit_script(ds, root / "peek2_job", PEEK, "peek_approved")
    job(do, "peek_approved").approve()
    seen["pass6"] = [o.__dict__ for o in bridge.process()]
    ds.sync()
    seen["peek2_status"] = job(ds, "peek_approved").status
    refusal_dir = outputs(ds, "peek_approved").get(REFUSAL_FOLDER)
    seen["peek2_refusal"] = json.loads((refusal_dir / "refusal.json").read_text()) if refusal_dir else None
    # row-level SQL as a declared request: the site itself refuses it (not a DP aggregate) and audits it
    rows_job = root / "rows_job"
    rows_job.mkdir()
    (rows_job / "veil_request.json").write_text(json.dumps(
        {"kind": "query", "sql": "SELECT patient_id, icd10 FROM encounters", "epsilon": 0.5}))
    (rows_job / "main.py").write_text("# the declared request is what the site runs\n")
    ds.submit_python_job(user=DO, code_path=str(rows_job), job_name="rows", entrypoint="main.py",
                         force_submission=True)
    job(do, "rows").approve()
    seen["pass7"] = [o.__dict__ for o in bridge.process()]
    ds.sync()
    seen["rows_status"] = job(ds, "rows").status
    seen["rows_refusal"] = json.loads((outputs(ds, "rows")[REFUSAL_FOLDER] / "refusal.json").read_text())
    # a project without a grant: the bridge files a Veil application; the job waits for the stewards, not syft
    other = Bridge(do, ExecutorAPI(url, Path(other_token).read_text().strip()), site, root / "other-state")
    submit_script(ds, root / "ask_job", COUNT, "no_grant")
    job(do, "no_grant").approve()
    seen["pass8"] = [o.__dict__ for o in other.process()]
    seen["pass9"] = [o.__dict__ for o in other.process()]  # still waiting: no second application, no new refusal
    steward = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {Path(steward_token).read_text().strip()}"})
    [app] = [a for a in steward.get("/applications").json() if a["project"] == "other_project"]
    seen["application"] = app
    review = steward.post(f"/applications/{app['id']}/reviews",
                          json={"decision": "approve", "comment": "a DP count is fine", "version": app["version"]})
    seen["review"] = review.json()
    seen["pass10"] = [o.__dict__ for o in other.process()]
    ds.sync()
    seen["no_grant_status"] = job(ds, "no_grant").status

    # a DP-SGD job declared in veil_request.json: started once, followed, answered with the DP model
    train = root / "train_job"
    train.mkdir()
    (train / "veil_request.json").write_text(json.dumps(TRAIN))
    (train / "main.py").write_text("# the declared request is what the site runs\n")
    ds.submit_python_job(user=DO, code_path=str(train), job_name="train", entrypoint="main.py", force_submission=True)
    job(do, "train").approve()
    passes: list[list[dict]] = []
    deadline = time.monotonic() + 300
    while not passes or passes[-1][0]["status"] in ("waiting", "training"):
        assert time.monotonic() < deadline, passes[-3:]
        passes.append([o.__dict__ for o in bridge.process()])
        time.sleep(0.5)
    seen["train_passes"] = passes
    ds.sync()
    seen["train_status"] = job(ds, "train").status
    model_dir = outputs(ds, "train").get(MODEL_FOLDER)
    if model_dir is not None:  # else the test shows the passes
        seen["train_job"] = json.loads((model_dir / "job.json").read_text())
        seen["train_weights"] = (model_dir / "model.safetensors").stat().st_size
        shutil.copy(model_dir / "receipt.ipynb", root / "train_receipt.ipynb")
        job(do, "train").rerun()  # processed again: the same model, no second job
        seen["train_again"] = [o.__dict__ for o in bridge.process()]

    # the executor does not answer (restarting, say): the job waits for the next pass, the bridge goes on
    down = Bridge(do, ExecutorAPI("http://127.0.0.1:9", "veil_0_x"), site, root / "down-state")
    submit_script(ds, root / "late_job", COUNT, "late")
    job(do, "late").approve()
    seen["executor_down"] = [o.__dict__ for o in down.process()]
    Path(out).write_text(json.dumps(seen, indent=2, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:8])
