"""A dataset's lifecycle: draft -> active -> suspended -> retired -> destroyed, each change audited.

The catalog says where a dataset starts (`state = "draft"`, or active by default); stewards move it on with
`veil steward dataset activate|suspend|resume|retire|destroy`, and the state database keeps where it is.
A change that opens access or cannot be undone (activate, resume, retire, destroy) follows the review rule of
the dataset's level: the requesting steward counts as the first approval, and a level that needs more
reviewers or particular offices (L3: both offices) leaves the request pending until other stewards approve.
Suspending only closes access, so one steward may do it at once (an incident does not wait).

Only an active dataset serves anything: every use of a draft, suspended, retired or destroyed one is refused
with its state, since when and why. Suspending or retiring cancels the jobs training on it; retiring also
revokes every grant on it and stops its standing queries. Destroying deletes the site's copies (its file or
snapshot, the snapshot's record, the stored mock, the weights of models trained on it) after recording each one's SHA-256 in the audit log, in
the same transaction that marks it destroyed; the files are deleted right after the commit, and a deletion
cut short by a crash is finished when the executor next starts (`finish_destruction`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from veil.errors import GovernanceError
from veil.executor import audit, ledger, policy
from veil.executor.auth import Principal, require
from veil.executor.catalog import Catalog, Dataset
from veil.executor.store import (
    dataset_states,
    dataset_transitions,
    grants,
    jobs,
    mocks,
    standing_queries,
    write,
)
from veil.wire import (
    DatasetState,
    DeletedCopy,
    LevelRule,
    TransitionInfo,
    TransitionRequest,
    TransitionReview,
)

log = logging.getLogger("veil.executor")

MOVES: dict[str, tuple[str, ...]] = {
    "active": ("draft", "suspended"),  # activate a draft, or resume a suspended dataset
    "suspended": ("active",),
    "retired": ("draft", "active", "suspended"),
    "destroyed": ("retired",),
}
"""For each state a steward may ask for, the states a dataset may be in to get there."""
IMMEDIATE = frozenset({"suspended"})
"""Changes one steward makes at once: they only close access, and reopening it is reviewed."""
VERBS = {"active": "activated", "suspended": "suspended", "retired": "retired", "destroyed": "destroyed"}


def _state_row(conn: Connection, dataset: Dataset) -> dict[str, Any]:
    row = conn.execute(select(dataset_states).where(dataset_states.c.dataset == dataset.name)).mappings().first()
    if row is not None:
        return dict(row)
    return {"dataset": dataset.name, "state": dataset.initial_state, "reason": "as the catalog declares it",
            "changed_by": "catalog", "changed_at": None, "receipt": None}


def states(conn: Connection, catalog: Catalog) -> dict[str, str]:
    """Every catalog dataset's current state."""
    changed = {r.dataset: r.state for r in conn.execute(select(dataset_states.c.dataset, dataset_states.c.state))}
    return {name: changed.get(name, ds.initial_state) for name, ds in catalog.datasets.items()}


def state(engine: Engine, dataset: Dataset) -> DatasetState:
    """Where the dataset is, since when and why, with the changes awaiting review."""
    with engine.connect() as conn:
        row = _state_row(conn, dataset)
        pending = conn.execute(select(dataset_transitions).where(
            dataset_transitions.c.dataset == dataset.name, dataset_transitions.c.status == "pending")
            .order_by(dataset_transitions.c.id)).mappings().all()
    return DatasetState(**row, pending=[_info(dict(p)) for p in pending])


def require_active(conn: Connection, dataset: Dataset, use: str) -> None:
    """Refuse (GovernanceError) to `use` a dataset that is not active, saying since when and why."""
    row = _state_row(conn, dataset)
    if row["state"] == "active":
        return
    since = f" since {row['changed_at'][:10]}" if row["changed_at"] else ""
    by = f" by {row['changed_by']}" if row["changed_by"] != "catalog" else ""
    hints = {"draft": "its data steward has not opened it yet; ask them when it will be",
             "suspended": "ask the site's data stewards when it will resume",
             "retired": "it serves nothing any more; grants on it were revoked",
             "destroyed": "its data no longer exists at this site"}
    raise GovernanceError(f"dataset_{row['state']}", f"dataset '{dataset.name}' is {row['state']}{since}{by} "
                          f"({row['reason']}): you cannot {use} it", hint=hints[row["state"]],
                          status=410 if row["state"] in ("retired", "destroyed") else 409)


def _rule(catalog: Catalog, dataset: Dataset) -> LevelRule:
    """The level's review rule, with at least one approval: the requesting steward's."""
    rule = catalog.rule(dataset)
    return rule.model_copy(update={"reviewers": max(rule.reviewers, 1)})


def _info(row: dict[str, Any], needs: str | None = None) -> TransitionInfo:
    deleted = [DeletedCopy(**d) for d in json.loads(row["digests"])] if row["digests"] else []
    return TransitionInfo(id=row["id"], dataset=row["dataset"], to=row["to_state"], reason=row["reason"],
                          requested_by=row["requested_by"], requested_office=row["requested_office"],
                          requested_at=row["requested_at"], status=row["status"], reviewed_by=row["reviewed_by"],
                          reviewed_office=row["reviewed_office"], reviewed_at=row["reviewed_at"], needs=needs,
                          deleted=deleted)


def request(engine: Engine, catalog: Catalog, who: Principal, name: str, body: TransitionRequest) -> TransitionInfo:
    """A steward asks for `body.to`: done now when the level's rule is met by them alone, else pending."""
    require(who, "steward")
    dataset = catalog.dataset(name)
    with write(engine) as conn:
        current = _state_row(conn, dataset)["state"]
        if current not in MOVES[body.to]:
            raise GovernanceError("bad_transition", f"dataset '{name}' is {current}: it cannot become {body.to}",
                                  hint=f"a dataset becomes {body.to} from {' or '.join(MOVES[body.to])}")
        waiting = conn.execute(select(dataset_transitions.c.id, dataset_transitions.c.to_state).where(
            dataset_transitions.c.dataset == name, dataset_transitions.c.status == "pending")).first()
        if waiting is not None:
            raise GovernanceError("transition_pending", f"request {waiting.id} to make '{name}' {waiting.to_state} "
                                  "awaits review", hint=f"review it first: veil steward dataset approve|reject "
                                  f"{waiting.id}")
        now = audit.now()
        row = {"dataset": name, "to_state": body.to, "reason": body.reason, "requested_by": who.name,
               "requested_office": who.office, "requested_at": now, "status": "pending", "reviewed_by": None,
               "reviewed_office": None, "reviewed_at": None, "digests": None}
        row["id"] = conn.execute(insert(dataset_transitions).values(**row)).inserted_primary_key[0]  # type: ignore[index]
        lacking = None if body.to in IMMEDIATE else policy.missing(_rule(catalog, dataset), [(who.name, who.office)])
        if lacking is None:
            files = _apply(conn, dataset, row, who)
        else:
            audit.append(conn, principal=who.name, role=who.role, action="dataset", decision="requested",
                         dataset=name, reason=f"request {row['id']}: make it {body.to} ({body.reason}); needs "
                                              f"{lacking}")
            files = []
    _delete_files(files)
    return _info(row, needs=lacking)


def review(engine: Engine, catalog: Catalog, who: Principal, transition_id: int, body: TransitionReview
           ) -> TransitionInfo:
    """Another steward approves or rejects a pending transition; an approval that meets the rule applies it."""
    require(who, "steward")
    with write(engine) as conn:
        found = conn.execute(select(dataset_transitions).where(dataset_transitions.c.id == transition_id)
                             ).mappings().first()
        if found is None or found["status"] != "pending":
            raise GovernanceError("unknown_transition", f"there is no pending dataset request {transition_id}",
                                  hint="list them with 'veil steward dataset requests'", status=404)
        row = dict(found)
        dataset = catalog.dataset(row["dataset"])
        if who.name == row["requested_by"]:
            raise GovernanceError("own_request", "you made this request: another steward must review it",
                                  hint="ask a steward of the office the level needs")
        rule, approvals = _rule(catalog, dataset), [(row["requested_by"], row["requested_office"])]
        refusal = policy.may_review(rule, who.office, approvals)
        if body.decision == "approve" and refusal is not None:
            raise GovernanceError("cannot_review", refusal, hint="a steward of another office must review it")
        row.update(reviewed_by=who.name, reviewed_office=who.office, reviewed_at=audit.now())
        files: list[Path] = []
        if body.decision == "reject":
            row["status"] = "rejected"
            conn.execute(update(dataset_transitions).where(dataset_transitions.c.id == transition_id).values(
                status="rejected", reviewed_by=who.name, reviewed_office=who.office, reviewed_at=row["reviewed_at"]))
            audit.append(conn, principal=who.name, role=who.role, action="dataset", decision="rejected",
                         dataset=dataset.name, reason=f"request {transition_id} (make it {row['to_state']}): "
                                                      f"{body.comment}")
        else:
            lacking = policy.missing(rule, [*approvals, (who.name, who.office)])
            if lacking is not None:  # rules never need more than two here; say so rather than half-apply
                raise GovernanceError("cannot_review", f"this request still needs {lacking}",
                                      hint="the level's rule needs more stewards than a request can collect")
            files = _apply(conn, dataset, row, who)
    _delete_files(files)
    return _info(row)


def transitions(engine: Engine, who: Principal, status: str | None = "pending") -> list[TransitionInfo]:
    """Dataset requests, newest first (stewards only)."""
    require(who, "steward", "admin")
    query = select(dataset_transitions).order_by(dataset_transitions.c.id.desc())
    if status is not None:
        query = query.where(dataset_transitions.c.status == status)
    with engine.connect() as conn:
        return [_info(dict(r)) for r in conn.execute(query).mappings()]


def _apply(conn: Connection, dataset: Dataset, row: dict[str, Any], who: Principal) -> list[Path]:
    """Move the dataset to `row['to_state']` with its effects, record it, and return the files to delete."""
    to, reason, now = row["to_state"], row["reason"], audit.now()
    effects: list[str] = []
    files: list[Path] = []
    if to in ("suspended", "retired"):
        cancelled = conn.execute(update(jobs).where(jobs.c.dataset == dataset.name, jobs.c.state == "running")
                                 .values(cancel=True)).rowcount
        effects.append(f"{cancelled} running job(s) cancelled")
    if to == "retired":
        held: list[int] = list(conn.execute(select(grants.c.id).where(grants.c.dataset == dataset.name,
                                                           grants.c.revoked.is_(False))).scalars())
        for grant_id in held:
            ledger.revoke_grant(conn, grant_id, by=who.name, reason=f"dataset '{dataset.name}' retired: {reason}")
        effects.append(f"{len(held)} grant(s) revoked")
    if to in ("retired", "destroyed"):  # a standing query releases nothing more (its budget was charged up front)
        stopped = conn.execute(update(standing_queries).where(
            standing_queries.c.dataset == dataset.name, standing_queries.c.status == "active").values(
            status="stopped", status_reason=f"dataset '{dataset.name}' {VERBS[to]}: {reason}")).rowcount
        effects.append(f"{stopped} standing quer{'y' if stopped == 1 else 'ies'} stopped")
    if to == "destroyed":
        files, deleted = _copies(conn, dataset)
        row["digests"] = json.dumps([d.model_dump() for d in deleted])
        effects.append("deleted: " + "; ".join(f"{d.what} ({d.bytes} bytes, sha256 {d.sha256})" for d in deleted)
                       if deleted else "no copy was left to delete")
    row["status"] = "done"
    conn.execute(update(dataset_transitions).where(dataset_transitions.c.id == row["id"]).values(
        status="done", reviewed_by=row["reviewed_by"], reviewed_office=row["reviewed_office"],
        reviewed_at=row["reviewed_at"], digests=row["digests"]))
    approved = f"; approved by {row['reviewed_by']}" if row["reviewed_by"] else ""
    entry = audit.append(conn, principal=who.name, role=who.role, action="dataset", decision=VERBS[to],
                         dataset=dataset.name, result_digest=hashlib.sha256(row["digests"].encode()).hexdigest()
                         if row["digests"] else None,
                         reason=f"request {row['id']} by {row['requested_by']}{approved}: {reason}"
                                + (f" ({', '.join(effects)})" if effects else ""))
    values = {"state": to, "reason": reason, "changed_by": who.name, "changed_at": now, "receipt": entry.hash}
    if conn.execute(update(dataset_states).where(dataset_states.c.dataset == dataset.name).values(**values)
                    ).rowcount == 0:
        conn.execute(insert(dataset_states).values(dataset=dataset.name, **values))
    return files


def _sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _site_files(dataset: Dataset) -> list[Path]:
    """The dataset's files at the site: its data (file or snapshot) and a snapshot's record."""
    return [p for p in (dataset.path, dataset.path.with_suffix(".snapshot.json")) if p.is_file()]


def _copies(conn: Connection, dataset: Dataset) -> tuple[list[Path], list[DeletedCopy]]:
    """Digest every copy of the dataset and delete the stored ones (mock, model weights) in this transaction;
    the files are returned, digested, for deletion after the commit."""
    files = _site_files(dataset)
    found = []
    for path in files:
        sha, size = _sha256_file(path)
        found.append(DeletedCopy(what=str(path), sha256=sha, bytes=size))
    mock = conn.execute(select(mocks.c.data).where(mocks.c.dataset == dataset.name)).first()
    if mock is not None:
        data = mock.data or b""
        found.append(DeletedCopy(what="stored mock", sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
        conn.execute(mocks.delete().where(mocks.c.dataset == dataset.name))
    for job in conn.execute(select(jobs.c.id, jobs.c.weights).where(jobs.c.dataset == dataset.name,
                                                                   jobs.c.weights.is_not(None))).all():
        found.append(DeletedCopy(what=f"job {job.id} model weights", sha256=hashlib.sha256(job.weights).hexdigest(),
                                 bytes=len(job.weights)))
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(weights=None))
    return files, found


def _delete_files(files: Iterable[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)
        log.info("deleted %s", path)


def finish_destruction(engine: Engine, catalog: Catalog) -> list[Path]:
    """Delete the files of datasets recorded as destroyed that are still on disk (a deletion cut short)."""
    with engine.connect() as conn:
        gone = [catalog.datasets[n] for n, s in states(conn, catalog).items() if s == "destroyed"]
    left = [path for ds in gone for path in _site_files(ds)]
    for path in left:
        log.warning("finishing the destruction recorded in the audit log: deleting %s", path)
        path.unlink(missing_ok=True)
    return left
