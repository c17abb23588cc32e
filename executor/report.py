"""Usage and value reports (`veil.usage`), built only from what the site records: the audit log, the
ledger (grants, caps), applications and their reviews, and training jobs. No data row is read.

Costs add up the audit entries that moved the ledger (`audit.CHARGES`), exactly as `audit.verify` does, and
convert a sum of rho once (zCDP composes by adding rho), so a report agrees with the ledger and the log.
A researcher's report covers their own project only and never shows a dataset's cap (it would tell what
other projects spent); refusals without an accountable token are the stewards' to see.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from veil.errors import VeilError
from veil.executor import application, audit, ledger
from veil.executor.auth import Principal
from veil.executor.catalog import Catalog
from veil.executor.store import jobs
from veil.sql import parse_sql
from veil.usage import (
    ApplicationSummary,
    DatasetTimeline,
    FederatedPart,
    Receipt,
    RefusalCount,
    ReviewNote,
    Spent,
    TimelinePoint,
    TrainedModel,
    UsageLine,
    UsageReport,
    period,
    window_codes,
)
from veil.wire import ApplicationInfo, AuditEntry, GrantInfo, TrainRequest

MAX_POINTS = 200
"""A dataset's timeline keeps at most this many points (evenly spread, the last always kept)."""
Key = tuple[str | None, str | None]  # (dataset, project)


@dataclass
class _Found:
    """What the report found for one (dataset, project) so far."""

    applications: dict[int, ApplicationSummary] = field(default_factory=dict)
    charges: list[AuditEntry] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    models: list[TrainedModel] = field(default_factory=list)
    studies: list[FederatedPart] = field(default_factory=list)


@dataclass(frozen=True)
class Scope:
    """What a report covers: [since, until) in the log's time format, and optional dataset and project."""

    since: str | None
    until: str
    dataset: str | None
    project: str | None

    def covers(self, project: str | None, dataset: str | None) -> bool:
        return (self.project is None or project == self.project) and (self.dataset is None or dataset == self.dataset)

    def during(self, ts: str) -> bool:
        return (self.since is None or ts >= self.since) and ts < self.until


def scope(who: Principal, since: str | None, until: str | None, dataset: str | None, project: str | None) -> Scope:
    """The report's scope for `who`: a researcher's is their own project (asking for another is refused, 403)."""
    if who.role == "researcher":
        if project is not None and project != who.project:
            raise VeilError("wrong_project", f"your token acts for project '{who.project}', so you may see its "
                            f"report only, not project '{project}''s", hint="leave out project, or ask the site's "
                            "data stewards for a report on the other project", status=403)
        project = who.project or ""
    start, end = period(since, until, datetime.now(UTC))
    return Scope(start, end, dataset, project)


def build(engine: Engine, catalog: Catalog, who: Principal, within: Scope) -> UsageReport:
    """The report for `within`, as `who` may see it."""
    steward = who.role in ("steward", "admin")
    delta = catalog.reporting_delta
    logged = [e for e in audit.entries(engine) if e.ts < within.until]
    seen = [e for e in logged if within.covers(e.project, _dataset_of(e))]
    lines: dict[Key, _Found] = {}
    for entry in seen:
        if within.during(entry.ts):
            _note_entry(lines, entry, delta)
    _note_applications(lines, application.listing(engine, catalog, who), within)
    _note_jobs(lines, engine, within)
    grants: dict[Key, GrantInfo] = {(g.dataset, g.project): g for g in ledger.list_grants(engine, within.project, delta)}
    budgets = [b for b in ledger.budgets(engine, catalog) if within.dataset in (None, b.dataset)] if steward else []
    return UsageReport(
        site=catalog.site, since=within.since, until=within.until, generated_at=audit.now(), reporting_delta=delta,
        project=within.project, dataset=within.dataset, audit_seq=logged[-1].seq if logged else 0,
        lines=[_line(key, found, grants.get(key), delta) for key, found in sorted(lines.items(), key=_order)],
        timelines=_timelines(seen, within, delta), budgets=budgets,
        anonymous_refusals=_anonymous(logged, within) if steward and within.project is within.dataset is None else [])


def _anonymous(logged: list[AuditEntry], within: Scope) -> list[RefusalCount]:
    """The refusals counted per window without an accountable token (`Site._log_refusals`), by code."""
    counted = Counter[str]()
    for entry in logged:
        if within.during(entry.ts) and entry.action == "requests" and entry.decision == "refused":
            for code, n in window_codes(entry.reason or ""):
                counted[code] += n
    return [RefusalCount(code=c, count=n) for c, n in counted.most_common()]


def _order(item: tuple[Key, _Found]) -> tuple[str, str]:
    (dataset, project), _ = item
    return (dataset or "~", project or "~")  # lines outside any dataset, and the site's own, come last


def _slot(lines: dict[Key, _Found], dataset: str | None, project: str | None) -> _Found:
    return lines.setdefault((dataset, project), _Found())


def _note_entry(lines: dict[Key, _Found], entry: AuditEntry, delta: float) -> None:
    """A charge (release, training reservation or settlement) or an accountable refusal, in its line."""
    if entry.decision in audit.CHARGES:
        _slot(lines, entry.dataset, entry.project).charges.append(audit.reported(entry, delta))
    elif entry.decision == "refused" and entry.role != "none":
        code = (entry.reason or "unknown").split(":", 1)[0]
        _slot(lines, _dataset_of(entry), entry.project).refusals[code] += 1


def _dataset_of(entry: AuditEntry) -> str | None:
    """The entry's dataset; for a refused SQL query (audited before it was parsed), the one its text names."""
    if entry.dataset is not None or entry.action != "query" or not entry.query:
        return entry.dataset
    try:
        return parse_sql(entry.query).dataset
    except VeilError:  # the refusal was for the SQL itself
        return None


def _note_applications(lines: dict[Key, _Found], found: list[ApplicationInfo], within: Scope) -> None:
    """Applications in force or changed during the period, in the line of each dataset they ask for."""
    for a in found:
        if a.created_at >= within.until or not (a.status == "approved" or a.updated_at >= (within.since or "")):
            continue
        for name in a.request.datasets:
            if within.covers(a.project, name):
                _slot(lines, name, a.project).applications[a.id] = _summary(a)


def _summary(a: ApplicationInfo) -> ApplicationSummary:
    r = a.request
    return ApplicationSummary(
        id=a.id, applicant=a.applicant, status=a.status, version=a.version, purpose=r.purpose,
        ethics_ref=r.ethics_ref, epsilon=r.epsilon, uses=list(r.uses), created_at=a.created_at,
        decided_at=a.decided_at, reviews=[ReviewNote(reviewer=v.reviewer, office=v.office, decision=v.decision,
                                                     ts=v.ts) for v in a.reviews])


def _note_jobs(lines: dict[Key, _Found], engine: Engine, within: Scope) -> None:
    """Training jobs that ran during the period: models trained (done) and parts of federated studies."""
    query = select(jobs.c.id, jobs.c.project, jobs.c.dataset, jobs.c.request, jobs.c.state, jobs.c.epsilon,
                   jobs.c.rows, jobs.c.round, jobs.c.receipt, jobs.c.updated_at).where(
        jobs.c.created_at < within.until).order_by(jobs.c.id)
    if within.since is not None:
        query = query.where(jobs.c.updated_at >= within.since)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    for row in rows:
        if not within.covers(row["project"], row["dataset"]):
            continue
        federated = TrainRequest.model_validate_json(row["request"]).federated
        slot = _slot(lines, row["dataset"], row["project"])
        if federated is not None:
            slot.studies.append(FederatedPart(job=row["id"], study=federated.study, state=row["state"],
                                              round=row["round"], rounds=federated.rounds,
                                              epsilon=row["epsilon"], rows=row["rows"], receipt=row["receipt"]))
        elif row["state"] == "done":
            slot.models.append(TrainedModel(job=row["id"], epsilon=row["epsilon"], rows=row["rows"],
                                            receipt=row["receipt"], updated_at=row["updated_at"]))


def spent(charges: list[AuditEntry], delta: float) -> Spent:
    """Charges added up as the ledger adds them, with their epsilon at the reporting delta."""
    rho = sum(e.rho for e in charges)
    approx = sum(e.epsilon for e in charges)
    return Spent(rho=rho, approx_epsilon=approx, delta=sum(e.delta for e in charges),
                 epsilon=_epsilon(rho, approx, delta))


def _line(key: Key, found: _Found, grant: GrantInfo | None, delta: float) -> UsageLine:
    """One (dataset, project)'s line of the report, from what was found for it."""
    charges = found.charges
    return UsageLine(
        dataset=key[0], project=key[1], applications=list(found.applications.values()),
        releases=sum(e.decision == "released" for e in charges), spent=spent(charges, delta),
        receipts=[Receipt(seq=e.seq, ts=e.ts, action=e.action, decision=e.decision, query=e.query,
                          epsilon=e.epsilon_at_reporting_delta or 0.0, receipt=e.hash) for e in charges],
        models=found.models, studies=found.studies,
        refusals=[RefusalCount(code=c, count=n) for c, n in found.refusals.most_common()], grant=grant)


def _timelines(seen: list[AuditEntry], within: Scope, delta: float) -> list[DatasetTimeline]:
    """Per dataset, the cumulative epsilon its charges (by the projects covered) spent, from the log's start:
    a point at the period's start, then one per charge in the period (thinned to MAX_POINTS)."""
    charges: dict[str, list[AuditEntry]] = {}
    for e in seen:
        if e.decision in audit.CHARGES and e.dataset is not None:
            charges.setdefault(e.dataset, []).append(e)
    return [DatasetTimeline(dataset=name, points=_points(found, within, delta))
            for name, found in sorted(charges.items())]


def _points(charges: list[AuditEntry], within: Scope, delta: float) -> list[TimelinePoint]:
    """One dataset's timeline from its charges in log order (running sums, one conversion per point)."""
    before = [e for e in charges if not within.during(e.ts)]
    during = [e for e in charges if within.during(e.ts)]
    step = max(1, -(-len(during) // MAX_POINTS))
    kept = set(range(len(during) - 1, -1, -step))
    rho, approx = sum(e.rho for e in before), sum(e.epsilon for e in before)
    points = [TimelinePoint(ts=within.since or charges[0].ts, epsilon=_epsilon(rho, approx, delta), seq=0)]
    for i, e in enumerate(during):
        rho, approx = rho + e.rho, approx + e.epsilon
        if i in kept:
            points.append(TimelinePoint(ts=e.ts, epsilon=_epsilon(rho, approx, delta), seq=e.seq))
    return points


def _epsilon(rho: float, approx: float, delta: float) -> float:
    """Spent rho and DP-SGD epsilon as one epsilon at the reporting delta, as the ledger states it."""
    return ledger.epsilon_spent({"rho_spent": rho, "approx_epsilon_spent": approx}, delta)
