"""The append-only, hash-chained audit log. An entry's hash is the receipt its response carries.

Each entry hashes its own fields together with the previous entry's hash, so editing, deleting,
inserting or reordering any entry breaks the chain at that point; the head row (last seq and
hash) catches a truncated tail. `verify` also checks that the ledger's spent totals equal the
sum of the charges recorded in released entries and, given the site's key, that the chain still
matches the heads the site signed (executor/checkpoints.py), which a recomputed chain does not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update

from veil import spreadsheet
from veil.executor import checkpoints
from veil.executor.checkpoints import SiteKey
from veil.executor.store import GENESIS, audit, audit_head, caps, grants, head_moved
from veil.wire import AuditEntry, Checkpoint

FIELDS = ("seq", "ts", "principal", "role", "project", "action", "dataset", "query", "rho", "epsilon", "delta",
          "result_digest", "decision", "reason", "prev_hash")


_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
_INSERT = insert(audit)
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"),
                                                                   hash=bindparam("new_hash"))


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the entry's fields (canonical JSON), the previous hash included."""
    body = json.dumps({k: entry[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


MAX_FIELD_CHARS = 4000
"""No text field of an entry is longer: what a client sends cannot grow the log beyond this per entry."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _line(text: str | None) -> str | None:
    """A text field as the log keeps it: one line (control characters escaped), at most MAX_FIELD_CHARS."""
    if text is None:
        return None
    line = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return line if len(line) <= MAX_FIELD_CHARS else line[:MAX_FIELD_CHARS - 13] + " [truncated]"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def append(
    conn: Connection,
    *,
    principal: str,
    role: str,
    action: str,
    decision: str,
    project: str | None = None,
    dataset: str | None = None,
    query: str | None = None,
    rho: float = 0.0,
    delta: float = 0.0,
    epsilon: float = 0.0,
    result_digest: str | None = None,
    reason: str | None = None,
) -> AuditEntry:
    """Append one entry inside the caller's write transaction and return it (hash = receipt).
    (`+ 0.0` turns -0.0 into 0.0: the database keeps no sign on zero, and the hash must match what it keeps.)"""
    head = conn.execute(_HEAD).one()
    entry: dict[str, Any] = dict(
        seq=head.seq + 1, ts=now(), principal=_line(principal), role=_line(role), project=_line(project),
        action=_line(action), dataset=_line(dataset), query=_line(query), rho=float(rho) + 0.0,
        epsilon=float(epsilon) + 0.0, delta=float(delta) + 0.0, result_digest=result_digest,
        decision=_line(decision), reason=_line(reason), prev_hash=head.hash,
    )
    entry["hash"] = entry_hash(entry)
    conn.execute(_INSERT, entry)
    conn.execute(_MOVE_HEAD, {"new_seq": entry["seq"], "new_hash": entry["hash"]})
    head_moved(conn, entry["seq"], entry["hash"])  # the site's key signs the new head before commit
    return AuditEntry(**entry)


def recorded(conn: Connection, action: str, dataset: str, result_digest: str) -> bool:
    """Whether the log already has an entry of `action` on `dataset` with this digest."""
    return conn.execute(select(audit.c.seq).where(audit.c.action == action, audit.c.dataset == dataset,
                                                  audit.c.result_digest == result_digest).limit(1)).first() is not None


def find(engine: Engine, receipt: str) -> AuditEntry | None:
    with engine.connect() as conn:
        row = conn.execute(select(audit).where(audit.c.hash == receipt)).mappings().first()
    return AuditEntry(**row) if row else None


@dataclass
class Verification:
    """The outcome of checking a site's audit log and ledger."""

    entries: int = 0
    problems: list[str] = field(default_factory=list)
    checkpoints: int = 0  # signed heads checked (stored and published)

    @property
    def ok(self) -> bool:
        return not self.problems


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


CHARGES = ("released", "reserved", "settled")
"""Decisions that move the ledger: a release, and a training job's reservation and settlement."""
CAP_ONLY = ("standing",)
"""Actions whose charge is the dataset's lifetime cap's alone: their project holds no grant for them."""
SPENT = ("rho", "delta", "epsilon")
LEDGER_COLUMNS = ("rho_spent", "delta_spent", "approx_epsilon_spent")


def verify(engine: Engine, site_key: SiteKey | None = None, published: Iterable[Checkpoint] = (),
           witnessed: Mapping[str, Iterable[Checkpoint]] | None = None) -> Verification:
    """Walk the chain from the genesis hash; compare the head and the ledger with what it records.

    With the site's key, every stored checkpoint, each `published` one and each head a peer `witnessed`
    (peer -> heads, executor/witness.py) must be signed by that key and name the hash the chain still has
    at its seq; otherwise the log was rewritten after signing. Problems name the peer."""
    result = Verification()
    spent: dict[tuple[str | None, str], list[float]] = {}
    with engine.connect() as conn:
        sources = [("published checkpoint", published),
                   *((f"head witnessed by peer {peer}", heads) for peer, heads in (witnessed or {}).items())]
        signed = _signed_heads(conn, result, site_key, sources)
        expected_prev, expected_seq = GENESIS, 1
        for row in conn.execute(select(audit).order_by(audit.c.seq)).mappings():
            entry = dict(row)
            result.entries += 1
            if entry["seq"] != expected_seq:
                result.problems.append(f"entry {entry['seq']}: expected seq {expected_seq} (an entry is missing or inserted)")
            if entry["prev_hash"] != expected_prev:
                result.problems.append(f"entry {entry['seq']}: does not follow the previous entry (deleted, inserted or reordered)")
            if entry_hash(entry) != entry["hash"]:
                result.problems.append(f"entry {entry['seq']}: its content does not match its hash (edited)")
            for label, head in signed.pop(entry["seq"], []):
                if head != entry["hash"]:
                    result.problems.append(
                        f"{label} at entry {entry['seq']}: the site signed hash {head[:16]}..., the log now has "
                        f"{entry['hash'][:16]}... (the log was rewritten after it was signed)")
            if entry["decision"] in CHARGES:  # a standing query's up-front charge is on the cap alone (no grant)
                project = None if entry["action"] in CAP_ONLY else entry["project"]
                totals = spent.setdefault((project, entry["dataset"]), [0.0, 0.0, 0.0])
                for i, name in enumerate(SPENT):
                    totals[i] += entry[name]
            expected_prev, expected_seq = entry["hash"], entry["seq"] + 1
        for seq, heads in sorted(signed.items()):
            for label, _ in heads:
                result.problems.append(f"{label} at entry {seq}: the log has no entry {seq} (truncated or rewritten)")
        head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).one()
        if (head.seq, head.hash) != (expected_seq - 1, expected_prev):
            result.problems.append(f"the log ends at entry {expected_seq - 1} but its head says {head.seq} (truncated)")
        for g in conn.execute(select(grants)).mappings():
            logged = spent.get((g["project"], g["dataset"]), [0.0, 0.0, 0.0])
            _compare(result, f"grant {g['project']}/{g['dataset']}", g, logged)
        per_dataset: dict[str, list[float]] = {}
        for (_, ds), totals in spent.items():
            acc = per_dataset.setdefault(ds, [0.0, 0.0, 0.0])
            for i, value in enumerate(totals):
                acc[i] += value
        for c in conn.execute(select(caps)).mappings():
            _compare(result, f"dataset cap {c['dataset']}", c, per_dataset.get(c["dataset"], [0.0, 0.0, 0.0]))
    return result


def _signed_heads(conn: Connection, result: Verification, site_key: SiteKey | None,
                  published: list[tuple[str, Iterable[Checkpoint]]]) -> dict[int, list[tuple[str, str]]]:
    """seq -> [(which checkpoint, signed hash)] for each validly signed checkpoint; bad signatures noted."""
    heads: dict[int, list[tuple[str, str]]] = {}
    if site_key is None:
        return heads
    for label, found in [("checkpoint", checkpoints.stored(conn, site_key.site)), *published]:
        for cp in found:
            result.checkpoints += 1
            if not site_key.signed(cp):
                result.problems.append(f"{label} at entry {cp.seq}: not signed by this site's key {site_key.key_id} "
                                       "(forged or altered)")
                continue
            heads.setdefault(cp.seq, []).append((label, cp.hash))
    return heads


def _compare(result: Verification, what: str, row: Any, logged: list[float]) -> None:
    for column, name, value in zip(LEDGER_COLUMNS, SPENT, logged):
        if not _close(row[column], value):
            result.problems.append(f"{what}: ledger says {name} {row[column]:.6g}, "
                                   f"the audit log's releases add up to {value:.6g}")


def entries(engine: Engine, since: int = 0, limit: int | None = None) -> list[AuditEntry]:
    """Entries after sequence number `since`, oldest first."""
    query = select(audit).where(audit.c.seq > since).order_by(audit.c.seq)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [AuditEntry(**row) for row in conn.execute(query).mappings()]


def count_entries(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit)).scalar_one())


FILTERS = ("project", "dataset", "action", "decision")
"""Columns the log can be filtered on (exact match)."""


def _matching(since: int, before: int | None, filters: dict[str, str | None]) -> list[Any]:
    unknown = set(filters) - set(FILTERS)
    if unknown:
        raise ValueError(f"no audit filter {sorted(unknown)}")
    conditions: list[Any] = [audit.c.seq > since]
    if before is not None:
        conditions.append(audit.c.seq < before)
    return conditions + [audit.c[name] == value for name, value in filters.items() if value is not None]


def page(engine: Engine, *, limit: int = 100, before: int | None = None, since: int = 0,
         **filters: str | None) -> tuple[list[AuditEntry], int]:
    """Newest first: up to `limit` entries with `since` < seq < `before` matching the filters (keyset paging:
    pass the last seq of a page as the next `before`), and how many entries after `since` match the filters."""
    with engine.connect() as conn:
        rows = conn.execute(select(audit).where(*_matching(since, before, filters))
                            .order_by(audit.c.seq.desc()).limit(limit)).mappings().all()
        total = conn.execute(select(func.count()).select_from(audit)
                             .where(*_matching(since, None, filters))).scalar_one()
    return [AuditEntry(**row) for row in rows], int(total)


def matching(engine: Engine, since: int = 0, **filters: str | None) -> list[AuditEntry]:
    """Every entry after `since` matching the filters, oldest first (an export)."""
    with engine.connect() as conn:
        rows = conn.execute(select(audit).where(*_matching(since, None, filters)).order_by(audit.c.seq)).mappings()
        return [AuditEntry(**row) for row in rows]


EXPORT_COLUMNS = (*FIELDS, "hash", "epsilon_at_reporting_delta")
"""The columns of an exported log (CSV), in order; JSON lines carry the same keys."""


def export_text(found: Iterable[AuditEntry], fmt: str) -> str:
    """The entries as JSON lines (`jsonl`) or CSV (`csv`, a header row first; text that a spreadsheet would run
    as a formula is quoted)."""
    import csv
    import io

    rows = [e.model_dump(include=set(EXPORT_COLUMNS)) for e in found]
    if fmt == "jsonl":
        return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}: jsonl or csv")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: spreadsheet.cell(value) for key, value in row.items()} for row in rows)
    return out.getvalue()


@lru_cache(maxsize=4096)
def _epsilon_of(rho: float, delta: float) -> float:
    # OpenDP (and scikit-learn) load only when a cost is converted: a ClientApp's token needs none
    from veil.query.accounting import epsilon_of

    return epsilon_of(rho, delta)  # OpenDP's conversion takes milliseconds; a log repeats a few costs


def reported(entry: AuditEntry, reporting_delta: float) -> AuditEntry:
    """The entry with its cost as epsilon at the site's reporting delta (the zCDP part converted by OpenDP,
    plus any (epsilon, delta) charge), as the ledger counts it; the hashed fields are untouched."""
    zcdp = _epsilon_of(abs(entry.rho), reporting_delta) if entry.rho else 0.0
    cost = (zcdp if entry.rho > 0 else -zcdp) + entry.epsilon  # a settlement's refund shows as a negative cost
    return entry.model_copy(update={"epsilon_at_reporting_delta": cost})
