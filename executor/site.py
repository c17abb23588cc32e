"""A site: its catalog, its state database and the path from a request to a release or a refusal."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select

from veil.errors import CatalogError, VeilError
from veil.executor import (
    application,
    audit,
    checkpoints,
    ledger,
    lifecycle,
    mocks,
    report,
    sheets,
    snapshot,
    standing,
    witness,
)
from veil.executor.auth import Principal, require
from veil.executor.cancellation import Ticket, Tickets
from veil.executor.catalog import Catalog, Dataset, check_data_matches, load_catalog
from veil.executor.query_pool import QueryPool, QueryTask
from veil.executor.store import jobs, open_store, write
from veil.executor.throttle import RateLimiter, RefusalCounter
from veil.executor.unit_bound import RowsPerUnit, rows_per_unit
from veil.query.accounting import rho_for_epsilon
from veil.query.pricing import accuracy_within_level, requested_rho, unsigned_release
from veil.query.sharing import refuse_query
from veil.sql import canonical_sql, parse_sql
from veil.usage import UsageReport
from veil.wire import (
    ApplicationInfo,
    ApplicationRequest,
    AuditEntry,
    AuditVerification,
    Cancellation,
    DatasetBudget,
    DatasetInfo,
    DatasetState,
    DirectGrantRequest,
    GrantInfo,
    JobInfo,
    MockInfo,
    MockRequest,
    PublishRequest,
    QueryRequest,
    QuerySpec,
    Release,
    ReviewRequest,
    StandingInfo,
    StandingWindow,
    StatisticsSheet,
    TrainingCheck,
    TrainRequest,
    TransitionInfo,
    TransitionRequest,
    TransitionReview,
)

if TYPE_CHECKING:  # the training stack loads on first use (`Site.trainer`)
    from veil.executor.rounds import Rounds
    from veil.executor.training import Trainer

log = logging.getLogger("veil.executor")


@dataclass
class _BoundCheck:
    """What the check of a dataset's file against max_rows_per_unit found, and for which version of it."""

    fingerprint: tuple[int, int]
    found: RowsPerUnit

    @property
    def holds(self) -> bool:
        return self.found.over == 0


@dataclass
class Site:
    """One hospital's executor state. Thread-safe: the web server calls it from worker threads."""

    catalog: Catalog
    engine: Engine
    queries: QueryPool = None  # type: ignore[assignment]  # made from the catalog's limits when not given
    _bounds: dict[str, _BoundCheck] = field(default_factory=dict)
    _bounds_lock: threading.Lock = field(default_factory=threading.Lock)
    hidden: list[Path] = field(default_factory=list)
    """What a custom model's sandbox must never see: the site's data, catalog, keys and state."""
    _training: tuple[Trainer, Rounds] | None = None
    _training_lock: threading.Lock = field(default_factory=threading.Lock)
    rates: RateLimiter = field(default_factory=RateLimiter)
    refusals: RefusalCounter = field(init=False)
    tickets: Tickets = field(default_factory=Tickets)
    snapshots: snapshot.Refresher = field(init=False)
    witnesses: witness.Exchange = field(init=False)
    standing: standing.Scheduler = field(init=False)

    def __post_init__(self) -> None:
        if self.queries is None:
            self.queries = QueryPool(self.catalog.path, self.catalog.limits.query_workers,
                                     self.catalog.limits.query_seconds)
        self.refusals = RefusalCounter(self.catalog.limits.audit_window_seconds, self._log_refusals)
        self.snapshots = snapshot.Refresher(self.catalog, self._log_failed_snapshot, self._refreshing)
        self.witnesses = witness.Exchange(self.catalog, self.engine)
        self.standing = standing.Scheduler(self.catalog, self.engine)

    def close(self) -> None:
        """Write the last window of counted refusals and stop the query workers (the executor stops)."""
        self.refusals.close()
        self.snapshots.stop()
        self.witnesses.stop()
        self.standing.stop()
        self.queries.close()

    @classmethod
    def open(cls, catalog_path: str | Path, database_url: str | None = None) -> Site:
        """Load the catalog, check every dataset file against it, connect the state database."""
        catalog = load_catalog(catalog_path)
        engine = open_store(database_url or catalog.database_url)
        lifecycle.finish_destruction(engine, catalog)
        with engine.connect() as conn:
            present = [catalog.datasets[n] for n, state in lifecycle.states(conn, catalog).items()
                       if state != "destroyed"]
        for ds in present:
            if snapshot.due(ds):  # a dataset in PostgreSQL: its snapshot is taken before anything reads it
                taken = snapshot.take(ds)
                log.info("dataset %s: snapshot of %s taken (%d rows)", ds.name, taken.table, taken.rows)
            check_data_matches(ds)
        signer = checkpoints.Signer.load(catalog.site, catalog.audit_key)  # once per process; created if absent
        hidden = [catalog.path.parent, catalog.audit_key.parent, *(ds.path.parent for ds in catalog.datasets.values()),
                  *_database_dir(database_url or catalog.database_url)]
        site = cls(catalog, engine, hidden=hidden)
        checkpoints.register(site.engine, signer)  # before any write: every moved head gets signed
        ledger.sync_caps(site.engine, catalog)
        with site.engine.connect() as conn:
            left_running = conn.execute(select(jobs.c.id).where(jobs.c.state == "running").limit(1)).first()
        if left_running is not None:  # jobs a stopped executor left running are settled now
            site.trainer.recover()
            site.rounds.recover()
        for ds in present:
            site.check_bound(ds)
        site.snapshots.start()
        site.witnesses.start()  # pushes the signed head to the peers every witness_minutes
        released = standing.release_due(site.engine, catalog)  # the windows that closed while the site was down
        if released:
            log.info("standing queries: %d window(s) released that closed while the executor was stopped", released)
        site.standing.start()  # then every standing_check_seconds
        return site

    @property
    def trainer(self) -> Trainer:
        """DP-SGD jobs at this site (the training stack loads with the first training request)."""
        return self._training_stack()[0]

    @property
    def rounds(self) -> Rounds:
        """This site's parts of federated studies."""
        return self._training_stack()[1]

    def _training_stack(self) -> tuple[Trainer, Rounds]:
        """PyTorch, Opacus and Flower load on first use, not at start: an executor that only answers queries
        keeps about 300 MB less (which lets three fit in a Binder session)."""
        with self._training_lock:
            if self._training is None:
                from veil.executor import custom_model
                from veil.executor.rounds import Rounds
                from veil.executor.training import Trainer

                custom_model.hide(self.hidden)
                trainer = Trainer(self.engine, self.catalog)
                self._training = (trainer, Rounds(trainer))
            return self._training

    @staticmethod
    def _log_failed_snapshot(dataset: Dataset, error: VeilError) -> None:
        log.error("dataset %s: the snapshot could not be refreshed; the previous one is still served: %s",
                  dataset.name, error.message)

    # ------------------------------------------------------------ privacy unit

    def bound_holds(self, dataset: Dataset) -> bool:
        """True when the file (as it is now) has at most max_rows_per_unit rows per patient.

        When it holds, queries skip the per-patient truncation; when it does not, truncation in the plan
        enforces the bound, or, where the catalog says `on_excess_rows = "refuse"`, the request is refused.
        """
        check = self.check_bound(dataset)
        if not check.holds and dataset.on_excess_rows == "refuse":
            raise VeilError("data_breaks_bound", f"the site's file for '{dataset.name}' breaks its catalog's bound "
                            f"of {dataset.max_rows_per_unit} rows per patient, so the site refuses to use it; "
                            "nothing was charged", hint="ask the site's data steward to fix the file or the catalog",
                            status=409)
        return check.holds

    def check_bound(self, dataset: Dataset) -> _BoundCheck:
        """The file's rows per patient against max_rows_per_unit, checked once per file version (size,
        mtime), not per query. A version that breaks the bound is logged for the steward and audited."""
        stat = dataset.path.stat()
        fingerprint = (stat.st_size, stat.st_mtime_ns)
        with self._bounds_lock:
            known = self._bounds.get(dataset.name)
            if known is None or known.fingerprint != fingerprint:
                known = _BoundCheck(fingerprint, rows_per_unit(dataset.path, dataset.privacy_unit,
                                                               dataset.max_rows_per_unit))
                if not known.holds:
                    self._report_broken_bound(dataset, known)
                self._bounds[dataset.name] = known
            return known

    def _report_broken_bound(self, dataset: Dataset, check: _BoundCheck) -> None:
        """Warn the steward in the executor's log; audit it once per file version (across restarts too)."""
        k, (most, over) = dataset.max_rows_per_unit, check.found
        refusing = dataset.on_excess_rows == "refuse"
        what = "requests on it are refused" if refusing else \
            f"queries keep at most {k} rows per patient, so counts and sums come out low"
        log.warning("dataset '%s': the file %s breaks the catalog's max_rows_per_unit = %d: %d patients have more "
                    "rows (up to %d); %s. Fix the file, or raise max_rows_per_unit in the catalog if more rows per "
                    "patient are right%s.", dataset.name, dataset.path, k, over, most, what,
                    "" if refusing else ', or set on_excess_rows = "refuse" to refuse requests on it')
        version = hashlib.sha256(f"{dataset.path}:{check.fingerprint}".encode()).hexdigest()
        with write(self.engine) as conn:
            if not audit.recorded(conn, "data_check", dataset.name, version):
                audit.append(conn, principal="executor", role="site", action="data_check",
                             decision="refusing" if refusing else "truncating", dataset=dataset.name,
                             result_digest=version, reason=f"{over} patients have more than max_rows_per_unit = "
                             f"{k} rows (up to {most}); file of {check.fingerprint[0]} bytes")

    # ------------------------------------------------------------ views

    def lifecycle_states(self) -> dict[str, str]:
        """Every dataset's lifecycle state now (one small read)."""
        with self.engine.connect() as conn:
            return lifecycle.states(conn, self.catalog)

    def _refreshing(self, dataset: Dataset) -> bool:
        """Whether the dataset's snapshot is kept fresh: not once it is suspended, retired or destroyed."""
        return self.lifecycle_states()[dataset.name] in ("draft", "active")

    def visible(self, principal: Principal, states: dict[str, str] | None = None) -> list[Dataset]:
        """Stewards see every dataset; a researcher those their project holds a grant on, and L1 ones, unless
        they are drafts or destroyed (a suspended or retired one is still named, so that its refusal says why).
        `states`: the lifecycle states, when the caller has read them already."""
        if principal.role in ("steward", "admin"):
            return list(self.catalog.datasets.values())
        granted = ledger.granted_datasets(self.engine, principal.project) if principal.project else set()
        states = states if states is not None else self.lifecycle_states()
        return [ds for ds in self.catalog.datasets.values() if principal.project
                and states[ds.name] not in ("draft", "destroyed")
                and (self.catalog.rule(ds).default_grant_epsilon is not None or ds.name in granted)]

    def datasets(self, principal: Principal) -> list[DatasetInfo]:
        """The datasets the caller may see, with their pricing and where they are in their lifecycle."""
        states = self.lifecycle_states()
        return [ds.info(self.catalog.pricing(ds)).model_copy(update={"state": states[ds.name]})
                for ds in self.visible(principal, states)]

    def dataset_info(self, principal: Principal, name: str) -> DatasetInfo:
        """One dataset's schema and public metadata, with its lifecycle state."""
        states = self.lifecycle_states()
        return self.dataset_for(principal, name, states=states).info().model_copy(update={"state": states[name]})

    def dataset_for(self, principal: Principal, name: str, use: str | None = None,
                    states: dict[str, str] | None = None) -> Dataset:
        """The dataset if the caller may see it; an unseen one is 'unknown', not 'forbidden'. With `use` (what
        the caller does with it), a dataset that is not active is refused, saying since when and why."""
        states = states if states is not None else self.lifecycle_states()
        if name not in {ds.name for ds in self.visible(principal, states)}:
            raise CatalogError("unknown_dataset", f"site '{self.catalog.site}' has no dataset '{name}' you may use",
                               hint="list the datasets you may use with GET /datasets", status=404)
        dataset = self.catalog.datasets[name]
        if use is not None and states[name] != "active":  # the refusal reads since when, by whom and why
            with self.engine.connect() as conn:
                lifecycle.require_active(conn, dataset, use)
        return dataset

    def grants(self, principal: Principal) -> list[GrantInfo]:
        project = None if principal.role in ("steward", "admin") else principal.project
        return ledger.list_grants(self.engine, project, self.catalog.reporting_delta)

    def receipt(self, principal: Principal, receipt: str) -> AuditEntry:
        """An audit entry by its hash, with the signed checkpoint that covers it; researchers may read
        only their own project's entries."""
        entry = audit.find(self.engine, receipt)
        if entry is None or (principal.role == "researcher" and entry.project != principal.project):
            raise CatalogError("unknown_receipt", f"no receipt {receipt[:16]}... that you may read on this site",
                               hint="check the receipt string; receipts are the hash of an audit entry", status=404)
        with self.engine.connect() as conn:
            entry = entry.model_copy(update={"checkpoint": checkpoints.covering(conn, entry.seq)})
        return audit.reported(entry, self.catalog.reporting_delta)

    # ------------------------------------------------------------ queries

    def begin_query(self, principal: Principal, request: QueryRequest) -> Ticket:
        """The ticket of a researcher's query, by which it can be cancelled until it is charged."""
        require(principal, "researcher")
        return self.tickets.begin(principal.project or "", request.request_id)

    def cancel_query(self, principal: Principal, request_id: str) -> Cancellation:
        """Cancel a query of the caller's project: nothing charged, or the release it already made."""
        require(principal, "researcher")
        return self.tickets.cancel(principal.project or "", request_id)

    def query(self, principal: Principal, request: QueryRequest, ticket: Ticket | None = None) -> Release:
        """Plan, certify, precheck the budget, run, then charge and audit in one transaction, unless the
        request's `ticket` was cancelled meanwhile (then nothing is charged). A query refused before its charge
        leaves no ticket behind: the same request_id may be sent again."""
        ticket = ticket or self.begin_query(principal, request)
        if ticket.release is not None:  # a retry of a request already released: the same release, charged once
            return ticket.release
        try:
            return self._query(principal, request, ticket)
        finally:
            self.tickets.settle(principal.project or "", ticket)

    def _query(self, principal: Principal, request: QueryRequest, ticket: Ticket) -> Release:
        project = principal.project or ""
        if request.project is not None and request.project != project:
            raise VeilError("wrong_project", f"your token acts for project '{project}', not '{request.project}'",
                            hint="use a token issued for that project", status=403)
        spec: QuerySpec = parse_sql(request.sql) if request.sql is not None else request.spec  # type: ignore[assignment]
        dataset = self.dataset_for(principal, spec.dataset, use="query")
        refuse_query(dataset.name, dataset.sharing)
        text = canonical_sql(spec)
        pricing = self.catalog.pricing(dataset)
        rho = requested_rho(request, dataset.level, pricing)
        verified = self.bound_holds(dataset)
        delta = request.delta if spec.group_by else None
        key = (dataset.name, text, verified, rho, request.accuracy, delta, request.confidence,
               pricing.min_group_threshold)
        task = QueryTask(key, dataset.name, spec.model_dump_json(), verified, rho, delta, request.confidence,
                         pricing.min_group_threshold, request.accuracy)
        with self.queries.session(principal.name, ticket.stopped) as worker:
            certified = worker.prepare(task)  # planned and certified in the worker, within the time limit
            accuracy_within_level(request, certified, dataset.level, pricing)
            with self.engine.connect() as conn:  # fail early, before touching the data
                ledger.check(conn, self.catalog, project, dataset, certified.rho, certified.delta)
            ticket.check()
            output = worker.run(task, certified)
        release = unsigned_release(self.catalog.site, dataset.name, project, text, request, spec.group_by,
                                   certified, output, pricing)
        if not verified:
            release = release.model_copy(update={"notes": [
                *release.notes, f"rows were truncated to at most {dataset.max_rows_per_unit} per patient because "
                "the site's file breaks its catalog's bound; counts and sums may be low"]})
        if (taken := snapshot.current(dataset)) is not None:
            release = release.model_copy(update={"notes": [*release.notes, taken.note]})

        grant: dict[str, Any] | None = None

        def charge() -> Release:
            nonlocal grant
            with write(self.engine) as conn:
                ledger.charge(conn, self.catalog, project, dataset, certified.rho, certified.delta)
                entry = audit.append(conn, principal=principal.name, role=principal.role, action="query",
                                     decision="released", project=project, dataset=dataset.name, query=text,
                                     rho=certified.rho, delta=certified.delta, result_digest=output.digest)
                checkpoint = checkpoints.covering(conn, entry.seq)  # signs this head now (the commit won't again)
                grant = ledger.grant_row(conn, project, dataset.name)
            return release.model_copy(update={"receipt": entry.hash, "released_at": entry.ts, "checkpoint": checkpoint})

        charged = ticket.commit(charge)  # the grant's figures after the commit: the write lock is not held for them
        ticket.release = charged.model_copy(update={"grant": ledger.grant_figures(grant, self.catalog)})
        return ticket.release

    # ------------------------------------------------------------ governance

    def apply(self, who: Principal, request: ApplicationRequest) -> ApplicationInfo:
        require(who, "researcher")
        self._convert(request.epsilon)
        return application.submit(self.engine, self.catalog, who, request)

    def amend(self, who: Principal, application_id: int, request: ApplicationRequest) -> ApplicationInfo:
        require(who, "researcher")
        self._convert(request.epsilon)
        return application.amend(self.engine, self.catalog, who, application_id, request)

    def grant_directly(self, who: Principal, request: DirectGrantRequest) -> ApplicationInfo:
        """A steward's grant on a review made outside Veil (recorded as an application they approved)."""
        require(who, "steward")
        self._convert(request.epsilon)
        return application.grant_directly(self.engine, self.catalog, who, request)

    def withdraw(self, who: Principal, application_id: int) -> ApplicationInfo:
        require(who, "researcher")
        return application.withdraw(self.engine, self.catalog, who, application_id)

    def review(self, who: Principal, application_id: int, decision: ReviewRequest) -> ApplicationInfo:
        require(who, "steward")
        return application.review(self.engine, self.catalog, who, application_id, decision)

    def applications(self, who: Principal, status: str | None = None) -> list[ApplicationInfo]:
        return application.listing(self.engine, self.catalog, who, status)

    def application(self, who: Principal, application_id: int) -> ApplicationInfo:
        return application.get(self.engine, self.catalog, who, application_id)

    def revoke_grant(self, who: Principal, grant_id: int, reason: str) -> GrantInfo:
        require(who, "steward")
        with write(self.engine) as conn:
            ledger.revoke_grant(conn, grant_id, by=who.name, reason=reason)
        return next(g for g in self.grants(who) if g.id == grant_id)

    def standing_queries(self, who: Principal) -> list[StandingInfo]:
        """Standing queries: a researcher's project's, or all of them for stewards."""
        return standing.listing(self.engine, who)

    def standing_query(self, who: Principal, standing_id: int) -> StandingInfo:
        return standing.get(self.engine, who, standing_id)

    def standing_windows(self, who: Principal, standing_id: int, after: int = -1) -> list[StandingWindow]:
        return standing.windows(self.engine, who, standing_id, after)

    def stop_standing(self, who: Principal, standing_id: int, reason: str) -> StandingInfo:
        return standing.stop(self.engine, who, standing_id, reason)

    def dataset_state(self, who: Principal, dataset: str) -> DatasetState:
        """Where a dataset is in its lifecycle (stewards: any dataset; researchers: those they may see)."""
        return lifecycle.state(self.engine, self.dataset_for(who, dataset))

    def request_transition(self, who: Principal, dataset: str, body: TransitionRequest) -> TransitionInfo:
        return lifecycle.request(self.engine, self.catalog, who, dataset, body)

    def review_transition(self, who: Principal, transition_id: int, body: TransitionReview) -> TransitionInfo:
        return lifecycle.review(self.engine, self.catalog, who, transition_id, body)

    def transitions(self, who: Principal, status: str | None) -> list[TransitionInfo]:
        return lifecycle.transitions(self.engine, who, status)

    def budgets(self, who: Principal) -> list[DatasetBudget]:
        """Caps and grants, and how each file keeps its rows-per-patient bound (stewards only)."""
        require(who, "steward", "admin")
        return [self._with_bound(b) for b in ledger.budgets(self.engine, self.catalog)]

    def _with_bound(self, budget: DatasetBudget) -> DatasetBudget:
        dataset = self.catalog.dataset(budget.dataset)
        found = self.check_bound(dataset).found
        return budget.model_copy(update={"max_rows_per_unit": dataset.max_rows_per_unit, "most_rows_per_patient":
                                         found.most, "patients_over_bound": found.over,
                                         "on_excess_rows": dataset.on_excess_rows})

    def set_cap(self, who: Principal, dataset: str, epsilon: float, reason: str) -> DatasetBudget:
        require(who, "steward")
        self._convert(epsilon)
        with write(self.engine) as conn:
            ledger.set_cap(conn, self.catalog, self.catalog.dataset(dataset), epsilon, by=who.name, reason=reason)
        return next(b for b in self.budgets(who) if b.dataset == dataset)

    def set_mock(self, who: Principal, dataset: str, request: MockRequest) -> MockInfo:
        require(who, "steward")
        ds = self.catalog.dataset(dataset)
        with self.engine.connect() as conn:
            lifecycle.require_active(conn, ds, "set a mock for")
        synthetic = request.kind == "synthetic"  # a schema-only mock reads no data: never refused for it
        return mocks.set_mock(self.engine, self.catalog, ds, request, who.name, synthetic and self.bound_holds(ds))

    def mock(self, who: Principal, dataset: str) -> MockInfo:
        """The dataset's mock for mock mode (to anyone who may see the dataset): it is public or DP already."""
        return mocks.get_mock(self.engine, self.dataset_for(who, dataset, use="fetch the mock of").name)

    def publish_sheet(self, who: Principal, dataset: str, request: PublishRequest) -> StatisticsSheet:
        """Release an open dataset's DP statistics sheet (stewards), charged to its lifetime cap and audited."""
        require(who, "steward")
        ds = self.catalog.dataset(dataset)
        with self.engine.connect() as conn:
            lifecycle.require_active(conn, ds, "publish the statistics sheet of")
        return sheets.publish(self.engine, self.catalog, ds, request.epsilon, who.name, self.bound_holds(ds))

    def sheet(self, dataset: str) -> StatisticsSheet:
        """An open dataset's published sheet, for any token on the site: it is DP and public already."""
        ds = self.catalog.dataset(dataset)
        with self.engine.connect() as conn:
            lifecycle.require_active(conn, ds, "download the statistics sheet of")
        return sheets.get_sheet(self.engine, ds)

    def train(self, who: Principal, request: TrainRequest) -> JobInfo:
        """Start a DP-SGD job (budget reserved now, settled when it ends); poll it with `job`."""
        dataset = self._trainable(who, request)
        if request.federated is not None:
            return self.rounds.join(who, dataset, request)
        return self.trainer.start(who, dataset, request)

    def check_training(self, who: Principal, request: TrainRequest) -> TrainingCheck:
        """Whether `train` would accept the request now, reserving and reading nothing (a study asks every site
        before any joins, so that one site's refusal costs the others nothing)."""
        return self.trainer.check(who, self._trainable(who, request), request)

    def _trainable(self, who: Principal, request: TrainRequest) -> Dataset:
        require(who, "researcher")
        dataset = self.dataset_for(who, request.dataset, use="train on")
        if not self.bound_holds(dataset):  # DP-SGD takes each row as a patient: it never truncates
            raise VeilError("data_breaks_bound", f"the site's file for '{dataset.name}' has more rows per patient "
                            f"than its catalog's bound of {dataset.max_rows_per_unit}, so training on it would not "
                            "protect each patient; nothing was charged",
                            hint="ask the site's data steward to fix the file or the catalog", status=409)
        return dataset

    def job(self, who: Principal, job_id: int) -> JobInfo:
        return self.trainer.info(who, job_id)

    def jobs(self, who: Principal, limit: int) -> list[JobInfo]:
        """The caller's project's training jobs here (a steward's: all), newest first."""
        return self.trainer.listing(who, limit)

    def cancel_job(self, who: Principal, job_id: int) -> JobInfo:
        require(who, "researcher")
        if self.job(who, job_id).study is not None:
            return self.rounds.finish(who, job_id, None)
        return self.trainer.cancel(who, job_id)

    def train_round(self, who: Principal, job_id: int, message: bytes) -> bytes:
        """One round of a federated study (a Flower message's content, protobuf) for the researcher's
        coordinator; the reply carries the DP weights and public numbers only."""
        require(who, "researcher")
        from veil.executor import federated
        from veil.federation import codec

        self.dataset_for(who, self.trainer.row(who, job_id)["dataset"], use="train on")
        return codec.encode_content(federated.executor_reply(self.rounds, job_id, codec.decode_content(message), who))

    def finish_job(self, who: Principal, job_id: int, weights: bytes | None) -> JobInfo:
        """End a federated part: a DP evaluation of the final `weights`, and the ledger settled."""
        require(who, "researcher")
        return self.rounds.finish(who, job_id, weights)

    def job_weights(self, who: Principal, job_id: int) -> bytes:
        require(who, "researcher")
        return self.trainer.weights(who, job_id)

    def report(self, who: Principal, since: str | None = None, until: str | None = None,
               dataset: str | None = None, project: str | None = None) -> UsageReport:
        """Usage and value over [since, until) from the audit log and ledger (executor/report.py): stewards and
        admins of any project, a researcher of their own (another project's is refused, 403)."""
        within = report.scope(who, since, until, self.dataset_for(who, dataset).name if dataset else None, project)
        return report.build(self.engine, self.catalog, who, within)

    def audit_log(self, who: Principal, since: int = 0, limit: int = 100, before: int | None = None,
                  **filters: str | None) -> list[AuditEntry]:
        """Newest first (see `audit_page`)."""
        return self.audit_page(who, since=since, limit=limit, before=before, **filters)[0]

    def audit_page(self, who: Principal, *, limit: int = 100, before: int | None = None, since: int = 0,
                   **filters: str | None) -> tuple[list[AuditEntry], int]:
        """Newest first, up to `limit` entries with `since` < seq < `before` matching the filters, each with its
        cost in epsilon at the site's reporting delta; and how many entries match the filters in all."""
        require(who, "steward", "admin")
        found, total = audit.page(self.engine, limit=limit, before=before, since=since, **filters)
        return [audit.reported(e, self.catalog.reporting_delta) for e in found], total

    def audit_export(self, who: Principal, fmt: str, since: int = 0, **filters: str | None) -> str:
        """Every entry matching the filters, oldest first, as JSON lines or CSV (stewards)."""
        require(who, "steward", "admin")
        found = audit.matching(self.engine, since=since, **filters)
        return audit.export_text((audit.reported(e, self.catalog.reporting_delta) for e in found), fmt)

    def verify(self, who: Principal) -> AuditVerification:
        require(who, "steward", "admin")
        signer = checkpoints.signer(self.engine)
        result = audit.verify(self.engine, signer.key if signer else None)
        return AuditVerification(ok=result.ok, entries=result.entries, problems=result.problems)

    def _convert(self, epsilon: float) -> None:
        """Convert a budget to rho before a write transaction opens: the ledger's conversion inside it is
        then a cache hit, so the site-wide write lock is never held while OpenDP searches."""
        rho_for_epsilon(epsilon, self.catalog.reporting_delta)

    def _log_refusals(self, reason: str) -> None:
        with write(self.engine) as conn:
            audit.append(conn, principal="anonymous", role="none", action="requests", decision="refused",
                         reason=reason)

    def refuse(self, principal: Principal, action: str, error: VeilError, dataset: str | None = None,
               query: str | None = None) -> str:
        """Record a refusal in the audit log; return its receipt."""
        with write(self.engine) as conn:
            entry = audit.append(conn, principal=principal.name, role=principal.role, action=action,
                                 decision="refused", project=principal.project, dataset=dataset, query=query,
                                 reason=f"{error.code}: {error.message}")
        return entry.hash


def _database_dir(url: str) -> list[Path]:
    """The directory of a SQLite state database (what custom model code must not see); none for a server."""
    prefix = "sqlite:///"
    return [Path(url[len(prefix):]).parent] if url.startswith(prefix) and url != prefix + ":memory:" else []
