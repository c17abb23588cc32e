"""Training jobs at a site: the policy check, a budget reservation, DP-SGD in a worker thread, and a
settlement to what the accountant spent, with DP releases about the data it used.

Only DP quantities leave: the weights (safetensors), the accountant's (epsilon, delta), a DP count of
the dataset's rows (the training and held-out sizes are post-processing of it: it sets the sampling
rate, so the private count shows nowhere, and the split takes exactly the public held-out size) and a
DP accuracy (or squared error) on the held-out patients: one DP sum over that public size
(`veil.query.evaluation`, which also gives the privacy argument), or a plain statement that the
held-out set is too small to evaluate privately. Before the data is touched the job reserves its
target (epsilon, delta) and the rho of its two DP releases, in one transaction with its audit entry;
when it ends (done, cancelled or failed) it is settled to what the accountant spent, and the rho of a
release that did not happen (no count recorded, no evaluation, or a held-out set too small to measure)
is refunded. A job cut off by a crash is settled when the executor starts again, to the accountant's
last recorded epsilon.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl
import torch
from sqlalchemy import Engine, insert, select, update

from veil.errors import CatalogError, GovernanceError, QueryError, VeilError
from veil.executor import application, audit, dpsgd, ledger, models
from veil.executor.auth import Principal
from veil.executor.catalog import Catalog, Column, Dataset
from veil.executor.features import Encoded, encode
from veil.executor.store import jobs, write
from veil.models import build
from veil.models.layout import FeatureLayout
from veil.query import evaluation as held_out_evaluation
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.query.prepared import prepare
from veil.query.release import run
from veil.query.table import Table
from veil.sql import parse_sql
from veil.wire import MAX_EVALUATION_EPSILON, Cost, JobInfo, Layout, Release, TrainingCheck, TrainRequest

log = logging.getLogger("veil.executor.training")
CONFIDENCE = 0.95


class Trainer:
    """The training jobs of one site; each runs in its own thread of the executor process."""

    def __init__(self, engine: Engine, catalog: Catalog) -> None:
        self.engine, self.catalog = engine, catalog
        self._cancels: dict[int, threading.Event] = {}
        self._timed_out: set[int] = set()

    # ------------------------------------------------------------ requests

    def start(self, who: Principal, dataset: Dataset, request: TrainRequest) -> JobInfo:
        """Check the request against policy and public metadata, reserve the budget, start the job (a
        federated part waits for its study's rounds instead; see `rounds.Rounds`)."""
        job_id, eval_rho = self.reserve(who, dataset, request)
        cancel = threading.Event()
        self._cancels[job_id] = cancel
        threading.Thread(target=self._run, args=(job_id, who, dataset, request, eval_rho, cancel), daemon=True,
                         name=f"veil-train-{job_id}").start()
        timer = threading.Timer(self.catalog.max_training_seconds, self._time_out, args=(job_id, cancel))
        timer.daemon = True
        timer.start()
        return self.info(who, job_id)

    def check(self, who: Principal, dataset: Dataset, request: TrainRequest) -> TrainingCheck:
        """What `reserve` checks (policy, public metadata, the grant and the cap), reserving and reading nothing."""
        self._check(dataset, request, who.project or "")
        eval_rho = rho_for_epsilon(request.evaluation_epsilon, self.catalog.reporting_delta)
        with self.engine.connect() as conn:
            ledger.check(conn, self.catalog, who.project or "", dataset, 2 * eval_rho, request.train.delta,
                         use="training", epsilon=request.train.epsilon)
        return TrainingCheck(dataset=dataset.name, epsilon=request.train.epsilon, delta=request.train.delta,
                             rho=2 * eval_rho, layout=self.wire_layout(dataset, request))

    def reserve(self, who: Principal, dataset: Dataset, request: TrainRequest, **values: Any) -> tuple[int, float]:
        """Check the request, then reserve its target (epsilon, delta) and the rho of its two DP releases
        (the dataset's rows, held-out evaluation) with a `running` job row and its audit entry, in one
        transaction; returns the job id and the rho of one release."""
        self._check(dataset, request, who.project or "")
        eval_rho = rho_for_epsilon(request.evaluation_epsilon, self.catalog.reporting_delta)
        project, target = who.project or "", request.train
        now, values = audit.now(), {"owner": me(), **values}
        with write(self.engine) as conn:
            ledger.charge(conn, self.catalog, project, dataset, 2 * eval_rho, 0.0, use="training")
            ledger.charge(conn, self.catalog, project, dataset, 0.0, target.delta, use="training",
                          epsilon=target.epsilon)
            job_id = conn.execute(insert(jobs).values(
                project=project, principal=who.name, dataset=dataset.name, request=request.model_dump_json(),
                state="running", progress=0.0, epoch=0, epsilon=0.0, cancel=False, release_rho=eval_rho,
                created_at=now, updated_at=now, **values)).inserted_primary_key[0]
            what = (f"study {request.federated.study}, {request.federated.rounds} rounds"
                    if request.federated else "DP-SGD")
            audit.append(conn, principal=who.name, role=who.role, action="train", decision="reserved",
                         project=project, dataset=dataset.name, query=request.model_dump_json(), rho=2 * eval_rho,
                         epsilon=target.epsilon, delta=target.delta,
                         reason=f"job {job_id}: {what} at (epsilon {target.epsilon:g}, delta {target.delta:g}) "
                                "and two DP releases (the dataset's rows, held-out evaluation)")
        return job_id, eval_rho

    def info(self, who: Principal, job_id: int) -> JobInfo:
        """A job of the caller's project (stewards see every job)."""
        row = self.row(who, job_id)
        request = TrainRequest.model_validate_json(row["request"])
        evaluation = Release.model_validate_json(row["evaluation"]) if row["evaluation"] else None
        rounds = request.federated.rounds if request.federated else 1
        return JobInfo(id=row["id"], project=row["project"], dataset=row["dataset"], state=row["state"],
                       progress=row["progress"], epoch=row["epoch"], epochs=request.train.epochs * rounds,
                       epsilon=row["epsilon"], target_epsilon=request.train.epsilon, delta=request.train.delta,
                       rows=row["rows"], evaluation=evaluation, error=row["error"], receipt=row["receipt"],
                       created_at=row["created_at"], updated_at=row["updated_at"],
                       study=request.federated.study if request.federated else None, round=row["round"],
                       rounds=rounds, layout=self.wire_layout(self.catalog.dataset(row["dataset"]), request))

    def listing(self, who: Principal, limit: int) -> list[JobInfo]:
        """The caller's project's jobs (a steward's: every job), newest first, at most `limit`."""
        query = select(jobs.c.id).order_by(jobs.c.id.desc()).limit(limit)
        if who.role == "researcher":
            query = query.where(jobs.c.project == (who.project or ""))
        with self.engine.connect() as conn:
            ids: list[int] = list(conn.execute(query).scalars())
        return [self.info(who, job_id) for job_id in ids]

    def cancel(self, who: Principal, job_id: int) -> JobInfo:
        """Ask a running job to stop before its next step; it is charged what its steps spent."""
        row = self.row(who, job_id)
        if row["state"] == "running":
            with write(self.engine) as conn:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel=True))
            if job_id in self._cancels:
                self._cancels[job_id].set()
        return self.info(who, job_id)

    def _time_out(self, job_id: int, cancel: threading.Event) -> None:
        """Stop a job at the site's time limit (it then ends as cancelled, charged for its steps)."""
        if not cancel.is_set() and job_id in self._cancels:
            self._timed_out.add(job_id)
            cancel.set()

    def holds(self, who: Principal, job_id: int) -> bool:
        """Whether the caller's project holds job `job_id` (a weights upload is accepted only then)."""
        try:
            self.row(who, job_id)
        except VeilError:
            return False
        return True

    def weights(self, who: Principal, job_id: int) -> bytes:
        """The trained weights (safetensors) of a finished or cancelled job."""
        row = self.row(who, job_id)
        if row["weights"] is None:
            raise GovernanceError("no_weights", f"job {job_id} is {row['state']} and has no weights to give",
                                  hint="wait until it is done (GET /jobs/ID), or read its error", status=409)
        return bytes(row["weights"])

    def recover(self) -> None:
        """Settle the jobs a stopped executor process left running, to their last recorded accountant epsilon.
        Jobs of executor processes still alive on this host (other workers) are theirs to settle; federated
        parts outlive processes (see `rounds.Rounds.recover`)."""
        with self.engine.connect() as conn:
            running = [dict(r) for r in conn.execute(select(jobs).where(jobs.c.state == "running")).mappings()]
        for row in running:
            request = TrainRequest.model_validate_json(row["request"])
            if request.federated is not None or alive(row["owner"]):
                continue
            who = Principal(row["principal"], "researcher", row["project"])
            self.settle(row["id"], who, row["dataset"], request, "failed", row["epsilon"], row["epsilon"] > 0,
                         None, None, "the executor stopped while the job ran; charged what its recorded steps spent")

    # ------------------------------------------------------------ the job

    def _check(self, dataset: Dataset, request: TrainRequest, project: str) -> None:
        """Refuse what the level or the public metadata rule out, before anything is reserved or read."""
        rule = self.catalog.rule(dataset)
        if not rule.training:
            raise GovernanceError("training_not_allowed", f"{dataset.level} data may not be used for training "
                                  "at this site", hint="ask the data stewards; the level's rule forbids it", status=403)
        if dataset.max_rows_per_unit != 1:
            raise QueryError("one_row_per_patient", f"'{dataset.name}' has up to {dataset.max_rows_per_unit} rows "
                             "per patient; DP-SGD here protects one row per patient",
                             hint="train on a dataset with one row per patient")
        if request.model.source is not None and request.model.source != application.approved_model_source(
                self.engine, project, dataset.name):
            raise GovernanceError("model_source_not_approved", "this custom model's source is not the one an approved "
                                  f"application of your project allows on '{dataset.name}'",
                                  hint="apply with the source as model_source (uses include 'training') and have it "
                                       "approved under the dataset's review rule; then train with exactly that source",
                                  status=403)
        if request.train.epsilon > rule.max_epsilon_per_model:
            raise GovernanceError("epsilon_above_level", f"{dataset.level} data allows at most epsilon "
                                  f"{rule.max_epsilon_per_model:g} per trained model at this site",
                                  hint=f"ask for epsilon <= {rule.max_epsilon_per_model:g}", status=403)
        models.build_model(request.model, self.layout(dataset, request))

    def wire_layout(self, dataset: Dataset, request: TrainRequest) -> Layout:
        """`layout` as the researcher receives it."""
        layout = self.layout(dataset, request)
        return Layout(numeric=list(layout.numeric), categorical=[(n, k) for n, k in layout.categorical],
                      outputs=layout.outputs)

    def layout(self, dataset: Dataset, request: TrainRequest) -> FeatureLayout:
        """How the request's features are encoded, from public metadata alone."""
        return self.encode(dataset, request, pl.DataFrame(schema=dataset.schema())).layout

    def encode(self, dataset: Dataset, request: TrainRequest, frame: pl.DataFrame) -> Encoded:
        numeric, categorical = {}, {}
        for name in request.features:
            column = dataset.column(name)
            if column.categories is not None:
                categorical[name] = list(column.categories)
            elif column.bounds is not None and column.is_numeric:
                numeric[name] = column.bounds
            else:
                raise QueryError("unbounded_feature", f"feature '{name}' has neither public bounds nor categories",
                                 hint="ask the steward to declare them, or leave the column out")
        label = dataset.column(request.label)
        classification = request.model.task == "classification"
        if (label.categories is None) if classification else (label.bounds is None or not label.is_numeric):
            need = "public categories (classification)" if classification else "public bounds (regression)"
            raise QueryError("bad_label", f"label '{label.name}' needs {need}",
                             hint="pick a label the catalog declares so, or change the model's task")
        return encode(frame, label=label.name, numeric=numeric, categorical=categorical,
                      classes=list(label.categories) if classification else None,  # type: ignore[arg-type]
                      label_bounds=None if classification else label.bounds)

    def _run(self, job_id: int, who: Principal, dataset: Dataset, request: TrainRequest, eval_rho: float,
             cancel: threading.Event) -> None:
        state, spent, started, rows, evaluation, weights, error = "failed", 0.0, False, None, None, None, None
        recorded = 0.0  # the accountant's epsilon at the last progress report
        try:
            rows = public_rows(dataset, request, eval_rho)
            self.update(job_id, rows=rows)
            held_out = held_out_evaluation.held_out_rows(rows, request.holdout)
            train, holdout = split(dataset, request, secrets.randbits(63), held_out)

            def progress(p: dpsgd.Progress) -> None:
                nonlocal recorded
                recorded = p.epsilon
                self.update(job_id, progress=p.step / p.steps, epoch=p.epoch, epsilon=p.epsilon)
                if self._cancel_requested(job_id):
                    cancel.set()

            encoded = self.encode(dataset, request, train)
            started = True
            outcome = dpsgd.train(request.model, request.train, encoded.x, encoded.y, layout=encoded.layout,
                                  progress=progress, cancel=cancel, public_rows=rows)
            spent, weights = outcome.epsilon, outcome.weights
            evaluation = self.evaluate(dataset, request, outcome.weights, self.encode(dataset, request, holdout),
                                        eval_rho, who, held_out)
            state = "cancelled" if outcome.cancelled else "done"
            if job_id in self._timed_out:
                error = (f"time_limit: the job ran past this site's limit of {self.catalog.max_training_seconds:g} s "
                         "and was stopped; it was charged what its steps spent and its weights are kept")
        except VeilError as exc:  # refused before its first step (checks, calibration): what was recorded
            error = f"{exc.code}: {exc.message}" + (f" (what to do: {exc.hint})" if exc.hint else "")
            spent = recorded
        except Exception as exc:  # noqa: BLE001 - a job's failure is recorded, settled and audited, never lost
            log.exception("training job %s failed", job_id)
            error = f"internal error ({type(exc).__name__}); charged what was spent"
            spent = request.train.epsilon if started else 0.0  # steps may have run uncounted: the whole target
        started = started and spent > 0
        self.settle(job_id, who, dataset.name, request, state, spent, started, evaluation, weights, error)
        self._cancels.pop(job_id, None)
        self._timed_out.discard(job_id)

    def evaluate(self, dataset: Dataset, request: TrainRequest, weights: bytes, holdout: Encoded, rho: float,
                  who: Principal, held_out: int) -> Release:
        """A DP accuracy (classification) or mean squared error (regression, scaled label) on the `held_out`
        held-out rows (a public size: `veil.query.evaluation`), or, when that many are too few for an
        informative interval at `rho`, a plain statement that says so and no number."""
        name = "accuracy" if request.model.task == "classification" else "squared_error"
        ev = held_out_evaluation.evaluator(name, held_out, rho, CONFIDENCE)
        larger = None
        if not ev.informative and request.evaluation_epsilon < MAX_EVALUATION_EPSILON:
            top = MAX_EVALUATION_EPSILON
            larger = (top, held_out_evaluation.evaluator(
                name, held_out, rho_for_epsilon(top, self.catalog.reporting_delta), CONFIDENCE))
        score = np.zeros(0)
        if ev.informative:  # a held-out set too small is not even scored
            module = build.load_weights(models.build_model(request.model, holdout.layout), weights).eval()
            with torch.no_grad():
                out = module(holdout.x)
            score = ((out.argmax(dim=1) == holdout.y).to(torch.int32) if name == "accuracy"
                     else (out.squeeze(-1).clamp(-1, 1) - holdout.y) ** 2).numpy()
        output = held_out_evaluation.release(score, ev, request.evaluation_epsilon, larger)
        spent = rho if ev.informative else 0.0  # nothing measured: its reserved rho is refunded at settlement
        cost = Cost(rho=spent, delta=0.0, epsilon=epsilon_of(spent, self.catalog.reporting_delta) if spent else 0.0,
                    epsilon_delta=self.catalog.reporting_delta)
        return Release(site=self.catalog.site, dataset=dataset.name, project=who.project or "",
                       query=f"held-out evaluation: the DP mean {name} of {held_out} held-out patients",
                       confidence=CONFIDENCE, group_by=[], statistics=output.statistics, rows=output.rows,
                       raw=output.raw, threshold=None, notes=output.notes, cost=cost, receipt="",
                       released_at=audit.now())

    def release_rho(self, row: Mapping[str, Any], request: TrainRequest) -> float:
        """The rho the job reserved for each of its two DP releases (rows of jobs older than the column: the
        site's present reporting delta, as they were reserved unless a steward changed it since)."""
        stored = row.get("release_rho")
        return float(stored) if stored is not None else rho_for_epsilon(request.evaluation_epsilon,
                                                                         self.catalog.reporting_delta)

    def settle(self, job_id: int, who: Principal, dataset: str, request: TrainRequest, state: str, spent: float,
                started: bool, evaluation: Release | None, weights: bytes | None, error: str | None) -> None:
        """End a running job: refund the (epsilon, delta) the accountant did not spend and the rho of each DP
        release that was not made (the count of rows when none was recorded; the evaluation when there is
        none or it measured nothing), with one audit entry; a job settled already is left alone."""
        target = request.train
        refund_epsilon = max(0.0, target.epsilon - spent)
        refund_delta = 0.0 if started else target.delta
        with write(self.engine) as conn:
            row = dict(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
            if row["state"] != "running":
                return  # settled already (by a restarted process's recovery): never refund twice
            one = self.release_rho(row, request)
            used = (one if row["rows"] is not None else 0.0) + (evaluation.cost.rho if evaluation else 0.0)
            refund_rho = max(0.0, 2 * one - used)
            ledger.refund(conn, who.project or "", dataset, refund_epsilon, refund_delta, refund_rho)
            unmade = (f"; refunded the rho {refund_rho:.4g} of the DP release{'s' if refund_rho > one else ''} "
                      "it did not make" if refund_rho > 0 else "")
            entry = audit.append(
                conn, principal=who.name, role=who.role, action="train", decision="settled", project=who.project,
                dataset=dataset, epsilon=-refund_epsilon, delta=-refund_delta, rho=-refund_rho,
                result_digest=hashlib.sha256(weights).hexdigest() if weights else None,
                reason=f"job {job_id} {state}: the accountant spent epsilon {spent:.4g} of {target.epsilon:g}"
                       + unmade + (f"; {error}" if error else ""))
            if evaluation is not None:
                evaluation = evaluation.model_copy(update={"receipt": entry.hash})
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                state=state, epsilon=spent, weights=weights, error=error, receipt=entry.hash,
                evaluation=evaluation.model_dump_json() if evaluation else None, updated_at=audit.now(),
                **({"progress": 1.0} if state == "done" else {})))

    # ------------------------------------------------------------ rows

    def row(self, who: Principal, job_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None or (who.role == "researcher" and row["project"] != who.project):
            raise CatalogError("unknown_job", f"there is no training job {job_id} that you may see",
                               hint="start one with POST /jobs; list yours with GET /jobs", status=404)
        return dict(row)

    def update(self, job_id: int, **values: Any) -> None:
        with write(self.engine) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=audit.now(), **values))

    def _cancel_requested(self, job_id: int) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(select(jobs.c.cancel).where(jobs.c.id == job_id)).scalar_one())


def alive(owner: str) -> bool:
    """Whether the executor process `owner` (host:pid) still runs on this host."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def split(dataset: Dataset, request: TrainRequest, seed: int,
          held_out: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The request's columns of `dataset`, shuffled by `seed` and cut into (training, held-out) rows: exactly
    `held_out` rows held out (a public size; all of them if the file has fewer), whatever the file holds."""
    frame = dataset.scan().select(*request.features, request.label).collect()
    order = np.random.default_rng(seed).permutation(frame.height)
    return frame[order[held_out:]], frame[order[:held_out]]


def public_rows(dataset: Dataset, request: TrainRequest, rho: float) -> int:
    """The job's public count of training rows: post-processing of a DP count (zCDP `rho`) of the dataset's
    rows, from which the held-out size follows too (`veil.query.evaluation.split_sizes`)."""
    n = int(dataset.scan().select(pl.len()).collect().item())
    return held_out_evaluation.split_sizes(dp_rows(n, rho, dataset.max_rows), request.holdout)[0]


def dp_rows(n: int, rho: float, max_rows: int) -> int:
    """A DP count (zCDP `rho`) of `n` rows, one per patient; at least 1."""
    ones = pl.DataFrame({"one": np.ones(n, dtype=np.int32)})
    count = _release(ones, "SELECT COUNT(*) AS n FROM data", rho, max_rows, {"one": Column("one", "Int32", bounds=(0, 1))})
    return max(1, round(count.rows[0]["n"]))


def me() -> str:
    """This executor process, as host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _release(frame: pl.DataFrame, sql: str, rho: float, max_rows: int, columns: dict[str, Column]) -> Any:
    """A DP release over an in-executor frame (one row per patient), through the query path's own
    planning, OpenDP calibration and intervals."""
    table = Table(name="data", privacy_unit="row_id", max_rows_per_unit=1, max_rows=max_rows,
                  columns={"row_id": Column("row_id", "Int64"), **columns})
    prepared = prepare(table, parse_sql(sql), verified_bound=True, rho=rho, delta=None, confidence=CONFIDENCE,
                       min_threshold=0)
    rows = frame.with_row_index("row_id").with_columns(pl.col("row_id").cast(pl.Int64)).lazy()
    return run(rows, table, prepared.plan, prepared.certified, prepared.description)
