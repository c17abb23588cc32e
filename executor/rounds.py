"""A site's part in a federated study: the rounds of DP-SGD that the study's coordinator sends.

A researcher joins a site to a study with an ordinary training request that names the study and its
rounds (`TrainRequest.federated`). The site checks it as any job, reserves the whole study's
(epsilon, delta) on its own ledger, releases a DP count of its rows (its public training-row count,
post-processing of it, sets the sampling rate and is the site's averaging weight; the held-out size
follows from it) and fixes a private held-out split of exactly that size. Rounds then arrive as
Flower messages, over the executor's HTTP API from the researcher's coordinator or through a SuperNode
the site runs beside its executor. Each round resumes the site's ONE accountant for the study (Opacus'
`state_dict()`, kept as JSON in the job row's `history` column: `dpsgd.save_accountant`), trains the
round's epochs from the global weights, and records the accountant's new state, epsilon and an audit
entry in one transaction before the DP weights leave; a round that would take the accountant past the
target is refused before it starts. Finishing evaluates the final global
model on the held-out patients (a DP release) and settles the ledger to what the accountant spent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import secrets
import threading
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from sqlalchemy import select, update

from veil.errors import CatalogError, GovernanceError, QueryError
from veil.executor import audit, dpsgd, models
from veil.executor.auth import Principal
from veil.executor.catalog import Dataset
from veil.executor.features import Encoded
from veil.executor.store import jobs, write
from veil.executor.training import Trainer, alive, me, public_rows, split
from veil.models import build
from veil.query.evaluation import held_out_rows
from veil.wire import JobInfo, TrainRequest


class Rounds:
    """The federated parts of studies at one site (job rows whose request has `federated`)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.engine, self.catalog = trainer, trainer.engine, trainer.catalog
        self._data: dict[int, tuple[Encoded, Encoded]] = {}
        self._lock = threading.Lock()

    def join(self, who: Principal, dataset: Dataset, request: TrainRequest) -> JobInfo:
        """Check and reserve the site's part of a study, then release its DP count of the dataset's rows."""
        self.expire()
        seed = secrets.randbits(62)
        # history "{}": the study's accountant, none before its first round (a federated part's mark)
        job_id, eval_rho = self.trainer.reserve(who, dataset, request, owner="", split_seed=seed, history="{}")
        try:
            self.trainer.update(job_id, rows=public_rows(dataset, request, eval_rho))
        except Exception as exc:
            self.trainer.settle(job_id, who, dataset.name, request, "failed", 0.0, False, None, None,
                                f"the DP count of the dataset's rows failed ({type(exc).__name__})")
            raise
        return self.trainer.info(who, job_id)

    def train_round(self, job_id: int, state: Mapping[str, torch.Tensor], server_round: int,
                    who: Principal | None = None) -> tuple[dpsgd.Stretch, int]:
        """Round `server_round` of the study from the global weights `state`: the stretch trained and the
        site's public weight (its DP row count). `who` (the HTTP path) must be the job's project; a
        SuperNode of the site passes None."""
        row = self._claim(job_id, server_round, who)
        request = TrainRequest.model_validate_json(row["request"])
        assert request.federated is not None
        try:
            dataset = self.catalog.dataset(row["dataset"])
            train, _ = self._encoded(row, dataset, request)
            whole = request.train.model_copy(update={"epochs": request.train.epochs * request.federated.rounds})
            try:
                build.load_weights(models.build_model(request.model, train.layout), _as_bytes(state))
            except Exception:  # noqa: BLE001 - any mismatch of names, shapes or types is the sender's
                raise QueryError("bad_weights", "the round's weights do not fit this study's model",
                                 hint="send the weights of the model the study was joined with") from None
            limit = threading.Event()  # a round stops at the site's time limit, charged for its steps
            timer = threading.Timer(self.catalog.max_training_seconds, limit.set)
            timer.daemon = True
            timer.start()
            try:
                stretch = dpsgd.train_stretch(request.model, whole, train.x, train.y, epochs=request.train.epochs,
                                              state=state, accountant=json.loads(row["history"]),
                                              layout=train.layout,
                                              public_rows=row["rows"], cancel=limit, exact=False)
            finally:
                timer.cancel()
        except BaseException:
            self._release_claim(job_id)
            raise
        rounds = request.federated.rounds
        with write(self.engine) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                owner="", round=server_round, history=json.dumps(stretch.accountant_state), epsilon=stretch.epsilon,
                progress=min(1.0, server_round / rounds), epoch=server_round * request.train.epochs,
                updated_at=audit.now()))
            audit.append(conn, principal=row["principal"], role="researcher", action="train", decision="released",
                         project=row["project"], dataset=row["dataset"], rho=0.0, epsilon=0.0, delta=0.0,
                         result_digest=hashlib.sha256(_as_bytes(stretch.state)).hexdigest(),
                         reason=f"job {job_id}, study {request.federated.study}: round {server_round} of {rounds}; "
                                f"DP weights left the site, the accountant has spent epsilon "
                                f"{'at most ' if not stretch.exact else ''}{stretch.epsilon:.4g} "
                                f"of {request.train.epsilon:g}")
        return stretch, int(row["rows"])

    def finish(self, who: Principal, job_id: int, weights: bytes | None) -> JobInfo:
        """End the site's part: with the final global `weights`, a DP evaluation on the held-out patients
        (state done); without, no evaluation (cancelled). Either way the ledger is settled to what the
        accountant spent."""
        row = self.trainer.row(who, job_id)
        if row["state"] != "running":
            return self.trainer.info(who, job_id)
        row = self._claim(job_id, None, who)
        request = TrainRequest.model_validate_json(row["request"])
        dataset = self.catalog.dataset(row["dataset"])
        evaluation, state = None, "cancelled"
        try:
            if weights is not None:
                _, holdout = self._encoded(row, dataset, request)
                try:
                    build.load_weights(models.build_model(request.model, holdout.layout), weights)
                except Exception:  # noqa: BLE001
                    raise QueryError("bad_weights", "the final weights do not fit this study's model",
                                     hint="send the safetensors of the study's global model") from None
                evaluation = self.trainer.evaluate(dataset, request, weights, holdout,
                                                   self.trainer.release_rho(row, request), who,
                                                   held_out_rows(row["rows"], request.holdout))
                state = "done"
        except BaseException:
            self._release_claim(job_id)
            raise
        spent = _settled_epsilon(row, request)
        self.trainer.settle(job_id, who, dataset.name, request, state, spent, spent > 0,
                            evaluation, weights, None)
        with self._lock:
            self._data.pop(job_id, None)
        return self.trainer.info(who, job_id)

    def recover(self) -> None:
        """At start: free parts whose round died with its process (nothing of that round left the site, so
        the recorded accountant is what was spent), then settle abandoned ones."""
        for row in self._running():
            if row["owner"] and not alive(row["owner"]):
                with write(self.engine) as conn:
                    conn.execute(update(jobs).where(jobs.c.id == row["id"]).values(owner=""))
        self.expire()

    def expire(self) -> None:
        """Settle idle parts that received no round within the site's training time limit."""
        cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.catalog.max_training_seconds)).isoformat()
        for row in self._running():
            if row["owner"] == "" and row["updated_at"] < cutoff:
                request = TrainRequest.model_validate_json(row["request"])
                who = Principal(row["principal"], "researcher", row["project"])
                self.trainer.settle(row["id"], who, row["dataset"], request, "failed", row["epsilon"],
                                    row["epsilon"] > 0, None, None,
                                    f"abandoned: no round for {self.catalog.max_training_seconds:g} s; charged what "
                                    "its rounds spent")

    # ------------------------------------------------------------ internals

    def _running(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.state == "running", jobs.c.history.is_not(None)))
            return [dict(r) for r in rows.mappings()]

    def _claim(self, job_id: int, server_round: int | None, who: Principal | None) -> dict[str, Any]:
        """Mark the part busy in this process (one round, or the finish, at a time), after checking that
        `server_round` (None: finishing) may run now."""
        with write(self.engine) as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if row is None or (who is not None and row["project"] != who.project):
                raise CatalogError("unknown_job", f"there is no training job {job_id} that you may see",
                                   hint="join a study with POST /jobs (a request with `federated`)", status=404)
            request = TrainRequest.model_validate_json(row["request"])
            if request.federated is None:
                raise GovernanceError("not_federated", f"job {job_id} trains on its own; it takes no rounds",
                                      hint="follow it with GET /jobs/ID", status=409)
            if row["state"] != "running":
                raise GovernanceError("job_ended", f"job {job_id} is {row['state']}; it takes no more rounds",
                                      hint="join the study again with a new job", status=409)
            if row["owner"] and (row["owner"] == me() or alive(row["owner"])):
                raise GovernanceError("round_in_progress", f"job {job_id} is training a round now",
                                      hint="wait for that round's reply, then send the next", status=409)
            rounds = request.federated.rounds
            if server_round is not None and not row["round"] < server_round <= rounds:
                raise GovernanceError("round_out_of_order", f"job {job_id} has trained round {row['round']} of "
                                      f"{rounds}; round {server_round} cannot run now",
                                      hint=f"send a round after {row['round']} and at most {rounds}", status=409)
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(owner=me()))
        return dict(row)

    def _release_claim(self, job_id: int) -> None:
        with write(self.engine) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.owner == me()).values(owner=""))

    def _encoded(self, row: Mapping[str, Any], dataset: Dataset, request: TrainRequest) -> tuple[Encoded, Encoded]:
        """The part's (training, held-out) tensors, split by its private seed; kept in memory between rounds."""
        with self._lock:
            if row["id"] not in self._data:
                train, holdout = split(dataset, request, row["split_seed"],
                                       held_out_rows(row["rows"], request.holdout))
                self._data[row["id"]] = (self.trainer.encode(dataset, request, train),
                                         self.trainer.encode(dataset, request, holdout))
            return self._data[row["id"]]


def _settled_epsilon(row: Mapping[str, Any], request: TrainRequest) -> float:
    """What the part spent, for the ledger: Opacus' accountant's exact epsilon of the recorded history,
    computed once here (the rounds record an upper bound); the recorded bound where that evaluation fails."""
    bound = float(row["epsilon"])
    try:
        saved = json.loads(row["history"] or "{}")
        history = [tuple(h) for h in saved.get("history", [])]
        if not history:
            return bound
        exact = dpsgd.history_epsilon(history, saved.get("mechanism", "prv"), request.train.delta)
    except Exception:  # noqa: BLE001 - the bound stands
        return bound
    return min(exact, bound) if math.isfinite(exact) else bound


def _as_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes."""
    return safetensors.torch.save({k: v.detach().contiguous() for k, v in state.items()})

