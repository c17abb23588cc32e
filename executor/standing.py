"""Standing DP counts at a site (issue 18): created when their application is approved, each window released
once, in order, by a background scheduler.

Approval (in the approving transaction, `create`): the site plans the counter (`continual.plan_counter`), charges
the whole horizon's certified rho to the dataset's lifetime cap once, audits it (action `standing`) and keeps
the counter's state. No grant is created or touched, and nothing is charged afterwards.

Release (`release_due`): window w is due at `start + (w + 1) * window_days + lag_days` (UTC midnight). The
true counts are read outside any transaction; then ONE write transaction re-reads the row, skips unless
`windows_released == w` (another worker or process did it), noises every group's closing nodes, updates the
state with a conditional UPDATE, inserts the released window and appends its audit entry (rho 0: charged up
front). A process killed mid-release leaves nothing behind: the noise it drew was never shown. A dataset that is
not active holds its windows back; they are released, once each, when it is active again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from veil.errors import CatalogError, GovernanceError, VeilError
from veil.executor import audit, ledger, lifecycle
from veil.executor.auth import Principal, require
from veil.executor.catalog import Catalog, Dataset
from veil.executor.store import standing_queries, standing_windows, write
from veil.query import continual
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.query.sharing import refuse_query
from veil.query.standing import Counting, prepare, release_time, window_counts, window_dates
from veil.query.standing import due as due_windows
from veil.wire import ApplicationRequest, StandingCell, StandingInfo, StandingQuery, StandingWindow

log = logging.getLogger("veil.executor.standing")


# ------------------------------------------------------------ planning and approval


def plan(spec: StandingQuery, epsilon: float, reporting_delta: float) -> continual.CounterPlan:
    """The counter of a standing query whose whole horizon costs at most `epsilon` at `reporting_delta`."""
    return continual.plan_counter(spec.horizon, spec.max_windows, rho_for_epsilon(epsilon, reporting_delta),
                                  levels=spec.levels, confidence=spec.confidence)


def check(catalog: Catalog, request: ApplicationRequest) -> None:
    """Refuse, when an application is filed, a standing query its dataset cannot count (an enclave, bad SQL, a
    group key without public values, a time column that is not a date, an unknown column) or no noise can serve;
    plans the counter outside any transaction (OpenDP's search is cached for the approval)."""
    if request.standing is None or request.datasets[0] not in catalog.datasets:
        return  # no standing query, or an unknown dataset, which the application's own checks refuse
    dataset = catalog.datasets[request.datasets[0]]
    refuse_query(dataset.name, dataset.sharing)  # an enclave releases no counts, standing ones neither
    prepare(dataset, request.standing)
    plan(request.standing, request.epsilon, catalog.reporting_delta)


def project_epsilon(conn: Connection, catalog: Catalog, project: str, dataset: str, epsilon: float) -> float:
    """What `project` would hold on `dataset` with a new standing query of `epsilon`: its active grant and its
    standing queries there composed with it (rho adds up), as epsilon at the site's reporting delta."""
    delta = catalog.reporting_delta
    rho = rho_for_epsilon(epsilon, delta) + sum(conn.execute(select(standing_queries.c.rho).where(
        standing_queries.c.project == project, standing_queries.c.dataset == dataset)).scalars())
    held = ledger.grant_row(conn, project, dataset)
    if held is not None and ledger.grant_status(held, audit.now()) == "active":
        rho += held["rho_total"]
    return epsilon_of(rho, delta)


def create(conn: Connection, catalog: Catalog, row: dict[str, Any], request: ApplicationRequest, by: Principal,
           reveal: bool) -> str:
    """On approval, in its transaction: charge the standing query's whole horizon to the dataset's cap once,
    audit it and keep its counter. `reveal`: a steward approves, so a refusal names the cap's figures."""
    spec = request.standing
    assert spec is not None
    dataset = catalog.datasets[request.datasets[0]]
    taken = conn.execute(select(standing_queries.c.id).where(standing_queries.c.application_id == row["id"])).first()
    if taken is not None:
        raise GovernanceError("standing_exists", f"application {row['id']} already started standing query "
                              f"{taken.id}; its budget was charged once, up front",
                              hint="file a new application for another standing query")
    counting = prepare(dataset, spec)
    counter = plan(spec, request.epsilon, catalog.reporting_delta)
    left = ledger.cap_remaining(conn, dataset.name, catalog.reporting_delta)
    if counter.rho > left * (1 + 1e-9):
        if not reveal:
            raise GovernanceError("cap_exceeded", f"epsilon {request.epsilon:g} on '{dataset.name}' cannot be "
                                  "granted: this dataset's site-wide budget cannot cover it",
                                  hint="apply for a smaller budget; the site's data stewards can tell you more")
        raise GovernanceError(
            "cap_exceeded", f"approving standing query '{spec.name}' charges epsilon {request.epsilon:g} (rho "
            f"{counter.rho:.4g}) to '{dataset.name}' at once, but its lifetime cap has rho {left:.4g} left (at most "
            f"epsilon {epsilon_of(left, catalog.reporting_delta) if left > 0 else 0.0:.4g}); nothing was charged",
            hint="ask the applicant for a smaller budget or a shorter horizon, or raise the cap with 'veil steward "
                 f"budget {dataset.name} --cap EPSILON'")
    ledger.charge_cap(conn, dataset, counter.rho, 0.0, catalog.reporting_delta)
    now = audit.now()
    inserted = conn.execute(insert(standing_queries).values(
        application_id=row["id"], project=row["project"], dataset=dataset.name, spec=spec.model_dump_json(),
        epsilon=request.epsilon, delta=catalog.reporting_delta, rho=counter.rho, levels=counter.levels,
        scale=counter.scale, state=_state_json(counting.keys, [continual.start(counter)] * len(counting.keys)),
        windows_released=0, status="active", status_reason=None, created_at=now, receipt="")).inserted_primary_key
    assert inserted is not None
    new_id = int(inserted[0])
    entry = audit.append(conn, principal=by.name, role=by.role, action="standing", decision="released",
                         project=row["project"], dataset=dataset.name, rho=counter.rho, query=spec.sql,
                         reason=f"standing query {new_id} '{spec.name}' of application {row['id']}: {spec.horizon} "
                                f"windows of {spec.window_days} days from {spec.start}, each patient in at most "
                                f"{counter.max_windows} cells, {counter.levels} levels, noise scale "
                                f"{counter.scale:.4g}; charged once, up front")
    conn.execute(update(standing_queries).where(standing_queries.c.id == new_id).values(receipt=entry.hash))
    return (f"; standing query {new_id} '{spec.name}' charged rho {counter.rho:.4g} (epsilon "
            f"{request.epsilon:g}) to the cap of '{dataset.name}'; no grant given")


def _state_json(keys: tuple[dict[str, Any], ...], states: list[continual.CounterState]) -> str:
    """The row's private state: the public group keys and each group's counter state (true open counts)."""
    return json.dumps({"keys": list(keys), "groups": [json.loads(s.to_json()) for s in states]}, sort_keys=True)


def _read_state(text: str) -> tuple[tuple[dict[str, Any], ...], list[continual.CounterState]]:
    data = json.loads(text)
    return tuple(data["keys"]), [continual.CounterState.from_json(json.dumps(g)) for g in data["groups"]]


# ------------------------------------------------------------ releases


def release_due(engine: Engine, catalog: Catalog, now: datetime | None = None) -> int:
    """Release every due window of every active standing query, in order, each once; how many were released.
    A query whose release fails is logged and left for the next round."""
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        ids: list[int] = list(conn.execute(select(standing_queries.c.id).where(standing_queries.c.status == "active")
                                .order_by(standing_queries.c.id)).scalars())
    released = 0
    for standing_id in ids:
        try:
            while release_next(engine, catalog, standing_id, now):
                released += 1
        except Exception:  # one failing query (a file gone, a database hiccup) must not stop the others
            log.exception("standing query %d: the next window could not be released; retrying later", standing_id)
    return released


def release_next(engine: Engine, catalog: Catalog, standing_id: int, now: datetime) -> bool:
    """Release the standing query's next window if it is due and its dataset active; whether one was."""
    with engine.connect() as conn:
        row = _row(conn, standing_id)
        spec = StandingQuery.model_validate_json(row["spec"])
        window = row["windows_released"]
        dataset = catalog.datasets.get(row["dataset"])
        if (row["status"] != "active" or dataset is None or window >= due_windows(spec, now)
                or lifecycle.states(conn, catalog)[dataset.name] != "active"):
            return False
    keys, _ = _read_state(row["state"])
    counting = Counting(dataset, spec, prepare(dataset, spec).query, keys)
    counts = window_counts(counting, dataset.scan(), window)  # the data, read outside the transaction
    with write(engine) as conn:
        row = _row(conn, standing_id)
        if (row["status"] != "active" or row["windows_released"] != window
                or lifecycle.states(conn, catalog)[dataset.name] != "active"):
            return False  # another worker released it, or it was stopped meanwhile
        _release(conn, dataset, row, spec, window, counts)
    return True


def _release(conn: Connection, dataset: Dataset, row: dict[str, Any], spec: StandingQuery, window: int,
             counts: list[int]) -> None:
    """Noise every group's closing nodes and record the window: its row, the counter's state, its audit entry."""
    counter = plan(spec, row["epsilon"], row["delta"])
    keys, states = _read_state(row["state"])
    cells, after = [], []
    for key, state, count in zip(keys, states, counts):
        state, out = continual.release_window(counter, state, window, count)
        after.append(state)
        cells.append(StandingCell(key=key, count=out.count, count_accuracy=out.count_accuracy, total=out.total,
                                  total_accuracy=out.total_accuracy))
    cells_json = json.dumps([c.model_dump(mode="json") for c in cells], sort_keys=True)
    finished = window + 1 == spec.horizon
    done = conn.execute(update(standing_queries).where(
        standing_queries.c.id == row["id"], standing_queries.c.windows_released == window).values(
        state=_state_json(keys, after), windows_released=window + 1, status="finished" if finished else "active",
        status_reason="every window was released" if finished else None)).rowcount
    if done != 1:
        raise VeilError("standing_conflict", f"standing query {row['id']} changed while window {window} was released")
    first, end = window_dates(spec, window)
    entry = audit.append(conn, principal="executor", role="site", action="standing_release", decision="released",
                         project=row["project"], dataset=dataset.name, rho=0.0,
                         result_digest=hashlib.sha256(cells_json.encode()).hexdigest(),
                         reason=f"standing query {row['id']} '{spec.name}': window {window} ({first} to {end}, end "
                                f"excluded), {len(cells)} group(s); charged up front")
    conn.execute(insert(standing_windows).values(standing_id=row["id"], window=window, start=first.isoformat(),
                                                 end=end.isoformat(), cells=cells_json, released_at=entry.ts,
                                                 receipt=entry.hash))


class Scheduler:
    """Releases due windows every `standing_check_seconds` in a daemon thread (after the catch-up that
    `Site.open` runs once at start)."""

    def __init__(self, catalog: Catalog, engine: Engine) -> None:
        self.catalog, self.engine = catalog, engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="veil-standing", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.catalog.standing_check_seconds):
            try:
                release_due(self.engine, self.catalog)
            except Exception:  # the state database unreachable for a while: the next round retries
                log.exception("standing queries: this round's releases failed; retrying in %g s",
                              self.catalog.standing_check_seconds)


# ------------------------------------------------------------ views and stopping


def _row(conn: Connection, standing_id: int) -> dict[str, Any]:
    row = conn.execute(select(standing_queries).where(standing_queries.c.id == standing_id)).mappings().first()
    if row is None:
        raise _unknown(standing_id)
    return dict(row)


def _unknown(standing_id: int) -> CatalogError:
    return CatalogError("unknown_standing_query", f"there is no standing query {standing_id} on this site that you "
                        "may see", hint="list your project's standing queries with GET /standing", status=404)


def _visible(conn: Connection, who: Principal, standing_id: int) -> dict[str, Any]:
    row = _row(conn, standing_id)
    if who.role == "researcher" and row["project"] != who.project:
        raise _unknown(standing_id)
    return row


def info(row: dict[str, Any]) -> StandingInfo:
    """A standing query as its project and the stewards see it (never its private state)."""
    spec = StandingQuery.model_validate_json(row["spec"])
    upcoming = row["windows_released"] if row["status"] == "active" else None
    return StandingInfo(
        id=row["id"], project=row["project"], dataset=row["dataset"], application_id=row["application_id"],
        spec=spec, status=row["status"], status_reason=row["status_reason"],
        epsilon=epsilon_of(row["rho"], row["delta"]), delta=row["delta"], rho=row["rho"],
        levels=row["levels"], noise_scale=row["scale"], windows_released=row["windows_released"],
        next_window=upcoming, next_release_at=None if upcoming is None else
        release_time(spec, upcoming).isoformat(), created_at=row["created_at"], receipt=row["receipt"])


def listing(engine: Engine, who: Principal) -> list[StandingInfo]:
    """Standing queries, oldest first: a researcher's project's, or all of them for stewards."""
    query = select(standing_queries).order_by(standing_queries.c.id)
    if who.role == "researcher":
        query = query.where(standing_queries.c.project == who.project)
    with engine.connect() as conn:
        return [info(dict(r)) for r in conn.execute(query).mappings()]


def get(engine: Engine, who: Principal, standing_id: int) -> StandingInfo:
    with engine.connect() as conn:
        return info(_visible(conn, who, standing_id))


def windows(engine: Engine, who: Principal, standing_id: int, after: int = -1) -> list[StandingWindow]:
    """The released windows numbered above `after`, oldest first."""
    with engine.connect() as conn:
        row = _visible(conn, who, standing_id)
        found = conn.execute(select(standing_windows).where(
            standing_windows.c.standing_id == standing_id, standing_windows.c.window > after)
            .order_by(standing_windows.c.window)).mappings().all()
    spec = StandingQuery.model_validate_json(row["spec"])
    return [StandingWindow(standing_id=standing_id, window=w["window"], start=w["start"], end=w["end"],
                           released_at=w["released_at"], receipt=w["receipt"], noise_scale=row["scale"],
                           total_nodes=len(continual.prefix(spec.horizon, row["levels"], w["window"] + 1)),
                           cells=[StandingCell(**c) for c in json.loads(w["cells"])]) for w in found]


def stop(engine: Engine, who: Principal, standing_id: int, reason: str) -> StandingInfo:
    """A steward stops an active standing query: no window is released after this, and nothing is refunded."""
    require(who, "steward")
    with write(engine) as conn:
        row = _row(conn, standing_id)
        if row["status"] != "active":
            raise GovernanceError("standing_not_active", f"standing query {standing_id} is {row['status']} already",
                                  hint="only an active standing query can be stopped")
        conn.execute(update(standing_queries).where(standing_queries.c.id == standing_id).values(
            status="stopped", status_reason=f"stopped by {who.name}: {reason}"))
        audit.append(conn, principal=who.name, role=who.role, action="standing", decision="stopped",
                     project=row["project"], dataset=row["dataset"],
                     reason=f"standing query {standing_id} stopped after {row['windows_released']} window(s): "
                            f"{reason}; nothing refunded (its budget was charged up front)")
        return info(_row(conn, standing_id))
