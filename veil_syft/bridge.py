"""The bridge: a Veil site's datasets as syft datasets, and syft jobs answered only with DP releases.

It acts as the data owner's side of syft-rds (its `SyftRDSClient`), but it never runs a job's code: each job
is read statically (`veil_syft.requests`), sent to the executor as a DP query or a DP-SGD training job under
the project's grant, and answered with the release (or the DP model) and its receipt. Syft's approval is a precondition only: the executor still applies
Veil's levels, grants and budgets, and audits every release and refusal.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from veil_syft.api import ExecutorAPI, Refused
from veil_syft.requests import NotAVeilRequest, TrainingRequest, VeilRequest, read_request

NO_GRANT = ("no_grant", "unknown_dataset", "use_not_granted")  # an L2/L3 dataset is unknown without a grant
OUTPUT_FOLDER = "veil_release"
MODEL_FOLDER = "veil_model"
REFUSAL_FOLDER = "veil_refusal"
PRIVATE_NOTE = ("The private part of this dataset never leaves the Veil executor and is never a file syft can "
                "sync. Submit a Veil query (veil_request.json, or a script that only calls the Veil SDK): the "
                "site answers with a differentially private release and its receipt.\n")


@dataclass
class Outcome:
    job: str
    submitter: str
    status: str  # released, refused, waiting, training
    message: str
    receipt: str | None = None


def request_id(owner: str, submitter: str, name: str, submitted_at: str | None) -> str:
    """The job's idempotency key at the executor: the same job, however often processed, is one release."""
    digest = hashlib.sha256(f"{owner}|{submitter}|{name}|{submitted_at}".encode()).hexdigest()
    return f"syft-{digest[:40]}"


def mock_rows_from_metadata(info: dict[str, Any], rows: int = 20, seed: int = 0) -> dict[str, list[Any]]:
    """Rows made from public metadata alone (bounds, categories, types): no fact about any patient."""
    rng = random.Random(seed)
    out: dict[str, list[Any]] = {}
    for col in info["columns"]:
        dtype, bounds, cats = col["dtype"].lower(), col.get("bounds"), col.get("categories")
        if cats:
            out[col["name"]] = [rng.choice(cats) for _ in range(rows)]
        elif bounds and ("int" in dtype):
            out[col["name"]] = [rng.randint(int(bounds[0]), int(bounds[1])) for _ in range(rows)]
        elif bounds:
            out[col["name"]] = [round(rng.uniform(bounds[0], bounds[1]), 3) for _ in range(rows)]
        elif "date" in dtype:
            out[col["name"]] = [(date(2020, 1, 1) + timedelta(days=rng.randint(0, 1500))).isoformat()
                                for _ in range(rows)]
        elif "bool" in dtype:
            out[col["name"]] = [rng.random() < 0.5 for _ in range(rows)]
        elif "int" in dtype or "float" in dtype:
            out[col["name"]] = [rng.randint(0, 100) for _ in range(rows)]
        else:
            out[col["name"]] = [f"{col['name']}_{rng.randint(1, 9)}" for _ in range(rows)]
    return out


def describe(info: dict[str, Any], mock: dict[str, Any] | None) -> str:
    """The syft dataset's summary: privacy level and public metadata, in a sentence."""
    where = ("DP synthetic rows chosen by the steward" if mock and mock.get("kind") == "synthetic"
             else "rows made from public metadata only")
    return (f"{info['title']} (Veil level {info['level']}, {info.get('sharing', 'controlled')}): "
            f"{info['description']} Privacy unit {info['privacy_unit']}, at most {info['max_rows']} rows. "
            f"Mock: {where}. Only DP releases leave the site.")


class Bridge:
    """One Veil site as a syft datasite. `rds` is a data owner's `SyftRDSClient`; `api` reaches the executor
    with the project's researcher token; `state_dir` keeps the releases already made, by job."""

    def __init__(self, rds: Any, api: ExecutorAPI, site: str, state_dir: Path) -> None:
        self.rds, self.api, self.site = rds, api, site
        self.state_dir = Path(state_dir)
        for kind in ("releases", "applications", "trainings"):
            (self.state_dir / kind).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ datasets

    def publish(self, users: list[str] | str = "any") -> list[str]:
        """Publish each dataset the site serves (not enclave-only) that syft does not list yet."""
        existing = {d.name for d in self.rds.dataset_manager.get_all(datasite=self.rds.email)}
        published = []
        for info in self.api.datasets():
            if info["name"] in existing or info.get("state", "active") != "active" \
                    or info.get("sharing") == "enclave":
                continue
            self._publish_one(info, users)
            published.append(info["name"])
        return published

    def _publish_one(self, info: dict[str, Any], users: list[str] | str) -> None:
        try:
            mock: dict[str, Any] | None = self.api.mock(info["name"])
        except Refused:
            mock = None
        data = (mock or {}).get("data") or mock_rows_from_metadata(info)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            mock_dir, private_dir = root / "mock", root / "private"
            mock_dir.mkdir()
            private_dir.mkdir()
            names = list(data)
            with (mock_dir / f"{info['name']}.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(names)
                writer.writerows(zip(*(data[n] for n in names), strict=True))
            meta = {k: v for k, v in info.items() if k != "pricing"} | {"pricing": info.get("pricing")}
            meta["mock"] = {k: v for k, v in (mock or {}).items() if k != "data"} or {"kind": "schema"}
            (mock_dir / "veil_metadata.json").write_text(json.dumps(meta, indent=2, default=str))
            # the private part is a note only: the data stays in the executor and is never uploaded
            (private_dir / "README.md").write_text(PRIVATE_NOTE)
            readme = root / "README.md"
            readme.write_text(f"# {info['title']}\n\n{describe(info, mock)}\n\n{PRIVATE_NOTE}")
            self.rds.create_dataset(name=info["name"], mock_path=mock_dir, private_path=private_dir,
                                    summary=describe(info, mock), readme_path=readme,
                                    tags=["veil", info["level"]], users=users, upload_private=False)

    # ------------------------------------------------------------------ jobs

    def process(self) -> list[Outcome]:
        """One pass over syft's jobs: refuse what is not a Veil request (pending or approved), answer the
        approved Veil requests with their release, leave the others waiting for the steward's approval."""
        outcomes = []
        for job in self.rds.jobs:
            if job.status not in ("pending", "approved"):
                continue
            try:
                outcome = self.process_job(job)
            except httpx.TransportError as exc:  # the executor is restarting, say: the next pass asks again
                outcome = Outcome(job.name, job.submitted_by, "waiting", f"the site's executor did not answer "
                                  f"({type(exc).__name__}); the bridge asks again on its next pass")
            if outcome is not None:
                outcomes.append(outcome)
        self.rds.sync()
        return outcomes

    def process_job(self, job: Any) -> Outcome | None:
        key = request_id(job.datasite_owner_email, job.submitted_by, job.name, job.submitted_at)
        try:
            request = read_request(job.code_dir, job.job_metadata.entrypoint)
        except NotAVeilRequest as exc:
            return self._refuse(job, key, exc.code, str(exc), audit=True)
        if job.status == "pending":
            what = "a Veil training request" if isinstance(request, TrainingRequest) else "a Veil query"
            return Outcome(job.name, job.submitted_by, "waiting",
                           f"{what}: waiting for the steward's approval in syft (Veil's review still applies)")
        if isinstance(request, TrainingRequest):
            return self._train(job, key, request)
        return self._release(job, key, request)

    def _release(self, job: Any, key: str, request: VeilRequest) -> Outcome:
        done = self.state_dir / "releases" / f"{key}.json"
        if done.exists():  # processed before (a re-run, a re-sync): the same release, not a new charge
            release = json.loads(done.read_text())
        else:
            rid = key
            applied = self.state_dir / "applications" / f"{key}.json"
            if applied.exists():  # waiting for the stewards: ask the application, not the query (no new refusals)
                pending, approved = self._application_pending(job, key)
                if pending is not None:
                    return pending
                # the refused first attempt charged nothing, but the executor keeps its request_id as taken:
                # the attempt after the approval has its own (still one per job and application)
                rid = f"{key}-a{approved}"
            try:
                release = self.api.query(request.body(rid))
            except Refused as exc:
                found = re.search(r"\bFROM\s+\"?([A-Za-z_][A-Za-z0-9_]*)", request.sql, re.IGNORECASE)
                return self._site_refused(job, key, exc, "query", found.group(1) if found else None,
                                          request.loss.get("epsilon", 1.0), ["query"],
                                          request.purpose or f"PySyft job '{job.name}' from {job.submitted_by} "
                                          f"through the site's PySyft bridge: {request.sql}")
            done.write_text(json.dumps(release))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / OUTPUT_FOLDER
            folder.mkdir()
            (folder / "release.json").write_text(json.dumps(release, indent=2))
            (folder / "receipt.ipynb").write_text(json.dumps(receipt_notebook(release), indent=1))
            (folder / "README.txt").write_text(
                f"A differentially private release by Veil site '{release['site']}' ({request.source}).\n"
                f"Check it: veil receipts verify receipt.ipynb --study study.toml\n")
            self._deposit(job, folder)
        return Outcome(job.name, job.submitted_by, "released", "DP release", release["receipt"])

    def _site_refused(self, job: Any, key: str, exc: Refused, what: str, dataset: str | None, epsilon: float,
                      uses: list[str], purpose: str, delta: float | None = None) -> Outcome:
        """The executor refused the request: without a grant (for this use), file a Veil application once (the
        stewards review it by the dataset's level; syft's approval is no substitute) and keep the job waiting
        until it is approved; otherwise, or when it was applied for already, the site's refusal stands."""
        hint = f" ({exc.hint})" if exc.hint else ""
        message = f"the site refused the {what}: {exc.message}{hint}"
        record = self.state_dir / "applications" / f"{key}.json"
        if exc.code not in NO_GRANT or record.exists() or dataset is None:
            # the executor audits its refusals (and gives their receipt); one it did not, the bridge does
            return self._refuse(job, key, exc.code, message, audit=exc.receipt is None, receipt=exc.receipt)
        try:
            app = self.api.apply(purpose, dataset, epsilon, uses, delta)
        except Refused as refused:  # no such dataset at all, say (the executor audited it)
            return self._refuse(job, key, exc.code, f"{message}; and an application for it: {refused.message}",
                                audit=False, receipt=exc.receipt)
        record.write_text(json.dumps({"id": app["id"]}))
        return self._waiting_or_refused(job, key, app)

    def _application_pending(self, job: Any, key: str) -> tuple[Outcome | None, int | None]:
        """(the job's outcome while its Veil application is not approved, else None; the approved application's id)."""
        applied = self.state_dir / "applications" / f"{key}.json"
        if not applied.exists():
            return None, None
        app = self.api.application(json.loads(applied.read_text())["id"])
        if app["status"] != "approved":
            return self._waiting_or_refused(job, key, app), None
        return None, int(app["id"])

    # ------------------------------------------------------------------ training

    def _train(self, job: Any, key: str, request: TrainingRequest) -> Outcome:
        """Start the DP-SGD job once (its record is written before it is asked for, so a bridge that stops
        between the two never starts a second one), follow it, and deposit the DP model when it ends."""
        record = self.state_dir / "trainings" / f"{key}.json"
        if record.exists():
            started = json.loads(record.read_text())
            if "job" not in started:
                adopted = self._adopt(started["asked_at"], request)
                if adopted is None:
                    return self._refuse(job, key, "training_start_unknown", "the bridge stopped while it started "
                                        "this training job and cannot tell which site job it became; it was not "
                                        "started again so that nothing is charged twice: submit the job again",
                                        audit=True)
                started["job"] = adopted
                record.write_text(json.dumps(started))
            return self._follow(job, key, int(started["job"]), request)
        pending, approved = self._application_pending(job, key)
        if pending is not None:
            return pending
        record.write_text(json.dumps({"asked_at": datetime.now(UTC).isoformat()}))
        try:
            info = self.api.train(request.body())
        except Refused as exc:
            record.unlink()  # refused before anything was reserved: nothing to follow
            if approved is not None:  # approved, yet refused: the site's answer stands
                return self._refuse(job, key, exc.code, f"the site refused the training job: {exc.message}",
                                    audit=exc.receipt is None, receipt=exc.receipt)
            # the application covers the whole job: DP-SGD's epsilon and its two DP releases (the count of rows,
            # the held-out evaluation), each at most evaluation_epsilon (epsilons of zCDP releases are subadditive)
            evaluation = request.options.get("evaluation_epsilon") or self.api.default("TrainRequest",
                                                                                       "evaluation_epsilon")
            return self._site_refused(job, key, exc, "training job", request.dataset,
                                      request.epsilon + 2 * float(evaluation), ["training"],
                                      request.purpose or f"PySyft job '{job.name}' from {job.submitted_by} through "
                                      f"the site's PySyft bridge: DP-SGD on {request.dataset} predicting "
                                      f"{request.label} from {', '.join(request.features)}",
                                      delta=float(request.train["delta"]))
        record.write_text(json.dumps({"asked_at": json.loads(record.read_text())["asked_at"], "job": info["id"]}))
        return self._follow(job, key, int(info["id"]), request)

    def _adopt(self, asked_at: str, request: TrainingRequest) -> int | None:
        """The one job of the project on the request's dataset and target created since `asked_at`, if just one."""
        found = [j["id"] for j in self.api.jobs() if j["created_at"] >= asked_at and j["dataset"] == request.dataset
                 and j["target_epsilon"] == request.epsilon and j["study"] is None]
        return found[0] if len(found) == 1 else None

    def _follow(self, job: Any, key: str, job_id: int, request: TrainingRequest) -> Outcome:
        info = self.api.job(job_id)
        if info["state"] == "running":
            return Outcome(job.name, job.submitted_by, "training", f"DP-SGD at the site (job {job_id}): epoch "
                           f"{info['epoch']} of {info['epochs']}, epsilon {info['epsilon']:.3g} of "
                           f"{info['target_epsilon']:g} spent so far")
        if info["state"] == "failed":  # settled and audited by the executor
            return self._refuse(job, key, "training_failed", f"the training job failed at the site: {info['error']}",
                                audit=False, receipt=info["receipt"])
        try:
            weights = self.api.weights(job_id)
        except Refused as exc:  # stopped before its first step, say: settled and audited by the executor
            return self._refuse(job, key, exc.code, f"the training job ended without a model: {exc.message}",
                                audit=False, receipt=info["receipt"])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / MODEL_FOLDER
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(weights)
            (folder / "job.json").write_text(json.dumps(info, indent=2))
            (folder / "receipt.ipynb").write_text(json.dumps(training_receipt_notebook(
                self.site, info, hashlib.sha256(weights).hexdigest()), indent=1))
            (folder / "README.txt").write_text(
                f"A DP-SGD model trained at Veil site '{self.site}' ({request.source}): the accountant spent "
                f"epsilon {info['epsilon']:.4g} at delta {info['delta']:g}; job.json has its DP evaluation on "
                "held-out patients.\nCheck it: veil receipts verify receipt.ipynb --study study.toml\n")
            self._deposit(job, folder)
        return Outcome(job.name, job.submitted_by, "released", f"DP-SGD model ({info['state']})", info["receipt"])

    def _waiting_or_refused(self, job: Any, key: str, app: dict[str, Any]) -> Outcome:
        if app["status"] in ("rejected", "withdrawn"):
            return self._refuse(job, key, "application_rejected", f"the project has no grant and its Veil "
                                f"application #{app['id']} was {app['status']}", audit=True)
        return Outcome(job.name, job.submitted_by, "waiting", f"the project has no grant on this dataset: Veil "
                       f"application #{app['id']} is {app['status']}, for the site's stewards to review; the job "
                       "runs once it is approved")

    def _refuse(self, job: Any, key: str, code: str, message: str, audit: bool,
                receipt: str | None = None) -> Outcome:
        if audit:
            receipt = self.api.record_refusal(key, job.submitted_by, code, message)["receipt"]
        refusal = {"kind": "refusal", "code": code, "message": message, "receipt": receipt, "site": self.site}
        if job.status == "pending":
            job.reject(reason=f"{code}: {message}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / REFUSAL_FOLDER
                folder.mkdir()
                (folder / "refusal.json").write_text(json.dumps(refusal, indent=2))
                self._deposit(job, folder, failed=True)
        return Outcome(job.name, job.submitted_by, "refused", message, receipt)

    def _deposit(self, job: Any, folder: Path, failed: bool = False) -> None:
        """The job's outputs are exactly `folder` (anything from an earlier pass replaced), shared with its
        submitter; a refusal marks the job failed."""
        outputs = job.job_review_path / "outputs"
        if outputs.exists():
            shutil.rmtree(outputs)
        job.accept_by_depositing_result(str(folder))
        if failed:
            state = job._state
            state.status = type(state.status)("failed")
            state.return_code = 1
            job._client.manager.write_state(job._ref, state)
        job.share_outputs([job.submitted_by])


def receipt_notebook(release: dict[str, Any]) -> dict[str, Any]:
    """A one-cell notebook that records the release as the Veil kernel does, for `veil receipts verify`."""
    recorded = {"site": release["site"], "dataset": release["dataset"], "query": release["query"],
                "cost": release["cost"], "receipt": release["receipt"], "mock": False}
    text = json.dumps({"rows": release["rows"], "receipt": release["receipt"]}, indent=1)
    return _one_cell(f"# {release['query']}", text, recorded)


def training_receipt_notebook(site: str, info: dict[str, Any], weights_sha256: str) -> dict[str, Any]:
    """A one-cell notebook that records a DP-SGD model for `veil receipts verify`: the site's settlement entry
    (its receipt) must name these weights' digest."""
    recorded = {"kind": "training", "site": site, "dataset": info["dataset"], "receipt": info["receipt"],
                "weights_sha256": weights_sha256, "mock": False}
    text = json.dumps({"job": info["id"], "epsilon": info["epsilon"], "delta": info["delta"],
                       "receipt": info["receipt"]}, indent=1)
    return _one_cell(f"# DP-SGD job {info['id']} on {info['dataset']}", text, recorded)


def _one_cell(source: str, text: str, recorded: dict[str, Any]) -> dict[str, Any]:
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {"veil": {"source": "pysyft bridge"}},
            "cells": [{"cell_type": "code", "id": "veil-release", "metadata": {}, "execution_count": 1,
                       "source": source,
                       "outputs": [{"output_type": "display_data", "data": {"text/plain": text},
                                    "metadata": {"veil": {"releases": [recorded]}}}]}]}
