"""The privacy-budget ledger: a grant per (project, dataset) and a lifetime cap per dataset.

Budgets are set in epsilon at the site's reporting delta and kept in rho (zCDP adds up); releases
that are accounted in (epsilon, delta) instead (DP-SGD's accountant) add up beside it, and the two
compose basically: epsilon_of(rho spent) + the (epsilon, delta) epsilons spent stays within the
granted epsilon, and every delta spent within the grant's delta. A
grant's own `delta` is a separate budget for thresholding, which adds to the reporting delta. A charge
is checked against both the grant and the cap and recorded in the same write transaction as its
audit entry, so concurrent requests cannot overspend and a crash cannot split them.

What the site's rule gives without review (an L1 default grant, an L1 approval) is at most a project's
share of the dataset's lifetime cap (`project_share`). A researcher's refusal speaks of their own grant
only: that the dataset's site-wide budget is short says nothing of how much other projects spent.
"""

from __future__ import annotations

import math

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from veil.errors import BudgetError, CatalogError, GovernanceError
from veil.executor import audit
from veil.executor.catalog import Catalog, Dataset
from veil.executor.store import caps, grants, write
from veil.query.accounting import epsilon_of, rho_for_epsilon
from veil.wire import AuditEntry, DatasetBudget, GrantInfo


def sync_caps(engine: Engine, catalog: Catalog) -> None:
    """Give each new dataset its catalog cap, and follow catalog edits unless a steward set the cap since."""
    with write(engine) as conn:
        for ds in catalog.datasets.values():
            rho = rho_for_epsilon(ds.lifetime_epsilon, catalog.reporting_delta)
            values = dict(epsilon=ds.lifetime_epsilon, delta=ds.lifetime_delta, rho_total=rho)
            row = conn.execute(select(caps.c.set_by).where(caps.c.dataset == ds.name)).first()
            if row is None:
                conn.execute(insert(caps).values(dataset=ds.name, rho_spent=0.0, delta_spent=0.0, set_by="catalog",
                                                 **values))
            elif row.set_by == "catalog":
                conn.execute(update(caps).where(caps.c.dataset == ds.name).values(**values))


def set_grant(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, epsilon: float, by: str,
              role: str = "steward", *, delta: float | None = None, expires_at: str | None = None,
              application_id: int | None = None, uses: tuple[str, ...] = ("query",)) -> AuditEntry:
    """Create a grant, or give an existing one a new total (never below what it spent, in rho or epsilon); audited.

    Budgets are in epsilon at the site's reporting delta; `delta` is the separate budget for
    thresholded GROUP BY (default: the reporting delta). A revoked grant set again is active again."""
    delta = catalog.reporting_delta if delta is None else delta
    rho = rho_for_epsilon(epsilon, catalog.reporting_delta)
    values = dict(epsilon=epsilon, delta=delta, revoked=False, expires_at=expires_at,
                  application_id=application_id, uses=",".join(uses))
    existing = grant_row(conn, project, dataset.name)
    if existing is None:
        conn.execute(insert(grants).values(project=project, dataset=dataset.name, rho_total=rho, rho_spent=0.0,
                                           delta_spent=0.0, created_by=by, created_at=audit.now(), **values))
    else:
        spent = epsilon_spent(existing, catalog.reporting_delta)
        floor = max(existing["rho_spent"], rho_for_epsilon(spent, catalog.reporting_delta) if spent > 0 else 0.0)
        conn.execute(update(grants).where(grants.c.id == existing["id"]).values(rho_total=max(rho, floor), **values))
    until = f" until {expires_at[:10]}" if expires_at else ""
    return audit.append(conn, principal=by, role=role, action="grant", decision="granted", project=project,
                        dataset=dataset.name, reason=f"epsilon={epsilon:g} at delta={catalog.reporting_delta:g}"
                        f"{until} for {', '.join(uses)}" + (f" (application {application_id})" if application_id else ""))


def added_grant(existing: dict, epsilon: float, delta: float, expires_at: str | None, uses: tuple[str, ...],
                reporting_delta: float) -> dict:
    """What a grant becomes when a new budget of `epsilon` (and `delta`) is added to it: zCDP composes, so the
    new rho is added to the grant's total (its remaining grows by exactly the new budget's rho, and the granted
    epsilon is the epsilon of the summed rho, less than the two epsilons added up); deltas add up; the later
    expiry stands (none is the latest); the uses are both grants' uses."""
    rho_total = existing["rho_total"] + rho_for_epsilon(epsilon, reporting_delta)
    later = None if existing["expires_at"] is None or expires_at is None else max(existing["expires_at"], expires_at)
    both = list(dict.fromkeys([*existing["uses"].split(","), *uses]))
    return dict(rho_total=rho_total, epsilon=epsilon_of(rho_total, reporting_delta),
                delta=existing["delta"] + delta, expires_at=later, uses=",".join(both))


def add_to_grant(conn: Connection, catalog: Catalog, existing: dict, epsilon: float, by: str, role: str, *,
                 delta: float | None = None, expires_at: str | None = None, application_id: int | None = None,
                 uses: tuple[str, ...] = ("query",), note: str = "") -> AuditEntry:
    """Add a new budget to an active grant (see `added_grant`); what it spent stays spent. Audited with the
    figures before and after."""
    delta = catalog.reporting_delta if delta is None else delta
    after = added_grant(existing, epsilon, delta, expires_at, uses, catalog.reporting_delta)
    conn.execute(update(grants).where(grants.c.id == existing["id"]).values(
        revoked=False, application_id=application_id, **after))
    until = f" until {after['expires_at'][:10]}" if after["expires_at"] else ""
    return audit.append(conn, principal=by, role=role, action="grant", decision="granted",
                        project=existing["project"], dataset=existing["dataset"],
                        reason=f"added epsilon={epsilon:g} to grant {existing['id']}: epsilon "
                        f"{existing['epsilon']:.4g} -> {after['epsilon']:.4g} at delta={catalog.reporting_delta:g} "
                        f"(rho {existing['rho_total']:.4g} -> {after['rho_total']:.4g}){until} for "
                        f"{after['uses'].replace(',', ', ')}" + note
                        + (f" (application {application_id})" if application_id else ""))


def revoke_grant(conn: Connection, grant_id: int, by: str, reason: str) -> AuditEntry:
    """Stop a grant from being used (what it spent stays spent); audited."""
    row = conn.execute(select(grants).where(grants.c.id == grant_id)).mappings().first()
    if row is None:
        raise GovernanceError("unknown_grant", f"there is no grant {grant_id} on this site",
                              hint="list grants with 'veil steward grants'", status=404)
    if row["revoked"]:
        raise GovernanceError("grant_revoked", f"grant {grant_id} ({row['project']} on {row['dataset']}) is "
                              f"already revoked", hint="nothing to do")
    conn.execute(update(grants).where(grants.c.id == grant_id).values(revoked=True))
    return audit.append(conn, principal=by, role="steward", action="grant", decision="revoked",
                        project=row["project"], dataset=row["dataset"], reason=f"grant {grant_id}: {reason}")


def set_cap(conn: Connection, catalog: Catalog, dataset: Dataset, epsilon: float, by: str, reason: str
            ) -> AuditEntry:
    """Change a dataset's lifetime cap; never below what it has spent. Audited; outlives catalog edits."""
    rho = rho_for_epsilon(epsilon, catalog.reporting_delta)
    cap = dict(conn.execute(_CAP, {"dataset": dataset.name}).mappings().one())
    spent = epsilon_spent(cap, catalog.reporting_delta)
    if rho < cap["rho_spent"] or epsilon < spent:
        raise GovernanceError("cap_below_spent", f"'{dataset.name}' has already spent epsilon {spent:.4g}; "
                              f"a cap of {epsilon:g} would be below it",
                              hint=f"set a cap of at least {spent:.4g}, or revoke grants to stop further use")
    conn.execute(update(caps).where(caps.c.dataset == dataset.name).values(epsilon=epsilon, rho_total=rho,
                                                                          set_by=by))
    return audit.append(conn, principal=by, role="steward", action="cap", decision="changed",
                        dataset=dataset.name, reason=f"lifetime epsilon {cap['epsilon']:g} -> {epsilon:g}"
                        + (f": {reason}" if reason else ""))


_GRANT = select(grants).where(grants.c.project == bindparam("project"), grants.c.dataset == bindparam("dataset"))
_CAP = select(caps).where(caps.c.dataset == bindparam("dataset"))
_SPEND_GRANT = update(grants).where(grants.c.id == bindparam("grant_id")).values(
    rho_spent=grants.c.rho_spent + bindparam("cost_rho"), delta_spent=grants.c.delta_spent + bindparam("cost_delta"),
    approx_epsilon_spent=grants.c.approx_epsilon_spent + bindparam("cost_epsilon"))
_SPEND_CAP = update(caps).where(caps.c.dataset == bindparam("cap_dataset")).values(
    rho_spent=caps.c.rho_spent + bindparam("cost_rho"), delta_spent=caps.c.delta_spent + bindparam("cost_delta"),
    approx_epsilon_spent=caps.c.approx_epsilon_spent + bindparam("cost_epsilon"))
# statements built once: the charge path runs them on every release


def grant_row(conn: Connection, project: str, dataset: str) -> dict | None:
    """The grant row of (project, dataset), if any."""
    row = conn.execute(_GRANT, {"project": project, "dataset": dataset}).mappings().first()
    return dict(row) if row else None


def grant_figures(row: dict | None, catalog: Catalog) -> dict[str, float] | None:
    """A grant row (`grant_row`) as a researcher reads it (granted, spent, largest next release, what remains),
    or None for no grant. Pure arithmetic on the row: a writer reads the row in its transaction and converts
    after the commit, so the database's write lock is not held for the epsilon conversions."""
    return None if row is None else _remaining(row, catalog.reporting_delta)


def grants_of_application(conn: Connection, application_id: int, exclude: list[str]) -> list[int]:
    """Ids of the active grants an application gave on datasets other than `exclude`."""
    return list(conn.execute(select(grants.c.id).where(
        grants.c.application_id == application_id, grants.c.revoked.is_(False),
        grants.c.dataset.not_in(exclude))).scalars())


def _no_grant(project: str, dataset: Dataset) -> CatalogError:
    return CatalogError(
        "no_grant",
        f"project '{project}' holds no grant on dataset '{dataset.name}' ({dataset.level})",
        hint="apply to the site's data stewards for access; an approved application comes with a budget",
        status=403,
    )


def grant_status(row: dict, now: str) -> str:
    """active, revoked, or expired (past its `expires_at`)."""
    if row["revoked"]:
        return "revoked"
    return "expired" if row["expires_at"] is not None and row["expires_at"] <= now else "active"


def grant_info(row: dict, reporting_delta: float, now: str | None = None) -> GrantInfo:
    """A grant as people read it: granted (`epsilon`), spent (`epsilon_spent`), and the largest epsilon one more
    release could have (`largest_next_epsilon`: the epsilon of the remaining rho, not granted minus spent)."""
    remaining = rho_left(row, reporting_delta)
    return GrantInfo(
        id=row["id"], project=row["project"], dataset=row["dataset"],
        status=grant_status(row, now or audit.now()), expires_at=row["expires_at"],  # type: ignore[arg-type]
        application_id=row["application_id"], uses=row["uses"].split(","),
        epsilon=row["epsilon"], delta=row["delta"],
        rho_total=row["rho_total"], rho_spent=row["rho_spent"], rho_remaining=remaining,
        epsilon_spent=epsilon_spent(row, reporting_delta),
        largest_next_epsilon=epsilon_of(remaining, reporting_delta),
        delta_spent=row["delta_spent"],
    )


def epsilon_spent(row: dict, reporting_delta: float) -> float:
    """What a grant or cap has spent, in epsilon: its zCDP releases converted, plus its (epsilon, delta) ones."""
    return epsilon_of(row["rho_spent"], reporting_delta) + row["approx_epsilon_spent"]


def rho_left(row: dict, reporting_delta: float) -> float:
    """The largest rho one more zCDP release may cost under a grant or cap (after any DP-SGD spending)."""
    if row["approx_epsilon_spent"] == 0.0:
        return max(0.0, row["rho_total"] - row["rho_spent"])
    epsilon = epsilon_of(row["rho_total"], reporting_delta) - row["approx_epsilon_spent"]
    return max(0.0, rho_for_epsilon(epsilon, reporting_delta) - row["rho_spent"]) if epsilon > 0 else 0.0


def affords(row: dict, rho: float, delta: float, epsilon: float, reporting_delta: float) -> bool:
    """Whether a grant or cap can take one more release costing rho (zCDP) or epsilon (approximate DP), and delta."""
    if row["delta_spent"] + delta > row["delta"]:
        return False
    if epsilon == 0.0 and row["approx_epsilon_spent"] == 0.0:
        return row["rho_spent"] + rho <= row["rho_total"]
    spent = epsilon_of(row["rho_spent"] + rho, reporting_delta) + row["approx_epsilon_spent"] + epsilon
    return spent <= epsilon_of(row["rho_total"], reporting_delta)


def list_grants(engine: Engine, project: str | None, reporting_delta: float) -> list[GrantInfo]:
    """Grants of one project (a researcher's view) or of all projects (a steward's)."""
    query = select(grants).order_by(grants.c.project, grants.c.dataset)
    if project is not None:
        query = query.where(grants.c.project == project)
    now = audit.now()
    with engine.connect() as conn:
        return [grant_info(dict(r), reporting_delta, now) for r in conn.execute(query).mappings()]


def granted_datasets(engine: Engine, project: str) -> set[str]:
    """The datasets on which `project` holds a grant (active or not: a refusal then says why)."""
    with engine.connect() as conn:
        return set(conn.execute(select(grants.c.dataset).where(grants.c.project == project)).scalars())


def budgets(engine: Engine, catalog: Catalog) -> list[DatasetBudget]:
    """Per dataset: its lifetime cap, what is spent, the largest next release, and every project's grant on it."""
    delta = catalog.reporting_delta
    now = audit.now()
    with engine.connect() as conn:
        cap_rows = {r["dataset"]: dict(r) for r in conn.execute(select(caps)).mappings()}
        all_grants = [grant_info(dict(r), delta, now) for r in
                      conn.execute(select(grants).order_by(grants.c.project)).mappings()]
    out = []
    for ds in catalog.datasets.values():
        cap = cap_rows[ds.name]
        mine = [g for g in all_grants if g.dataset == ds.name]
        remaining = rho_left(cap, delta)
        out.append(DatasetBudget(
            dataset=ds.name, level=ds.level, cap_epsilon=cap["epsilon"], cap_rho=cap["rho_total"],
            spent_rho=cap["rho_spent"], spent_epsilon=epsilon_spent(cap, delta),
            remaining_rho=remaining, largest_next_epsilon=epsilon_of(remaining, delta),
            granted_rho=sum(g.rho_remaining for g in mine if g.status == "active"), grants=mine,
        ))
    return out


def cap_remaining(conn: Connection, dataset: str, reporting_delta: float) -> float:
    """What the dataset's lifetime cap has left, in rho."""
    return rho_left(dict(conn.execute(_CAP, {"dataset": dataset}).mappings().one()), reporting_delta)


def project_share(conn: Connection, catalog: Catalog, dataset: Dataset) -> float:
    """The most epsilon one project may hold on `dataset` by the site's rule alone, without a review:
    its level's `max_project_share` of the dataset's lifetime cap, as a steward last set it."""
    cap = conn.execute(_CAP, {"dataset": dataset.name}).mappings().one()
    return catalog.rule(dataset).max_project_share * cap["epsilon"]


def default_grant_epsilon(conn: Connection, catalog: Catalog, dataset: Dataset) -> float | None:
    """The grant a project gets on its first use of `dataset` without applying (L1): the level's
    `default_grant_epsilon`, but no more than `project_share`; None where the level gives none."""
    default = catalog.rule(dataset).default_grant_epsilon
    return None if default is None else min(default, project_share(conn, catalog, dataset))


def _remaining(grant: dict, reporting_delta: float) -> dict[str, float]:
    """What a refusal tells the caller remains: their own grant's figures only, never the cap's, which
    would tell them what other projects have spent."""
    rho = rho_left(grant, reporting_delta)
    return {
        "rho": rho,
        "delta": max(0.0, grant["delta"] - grant["delta_spent"]),
        "rho_granted": grant["rho_total"],
        "epsilon_granted": grant["epsilon"],
        "epsilon_spent": epsilon_spent(grant, reporting_delta),
        "largest_next_epsilon": epsilon_of(rho, reporting_delta),
    }


def _largest_next(row: dict, reporting_delta: float, approx: bool) -> float:
    """The largest epsilon one more release could have under a grant or cap: for a zCDP release, the epsilon of
    the rho left; for one accounted in (epsilon, delta) (DP-SGD), what the epsilon of all the rho exceeds the
    spent epsilon by, since that is how `affords` adds them up."""
    if not approx:
        return epsilon_of(rho_left(row, reporting_delta), reporting_delta)
    return max(0.0, epsilon_of(row["rho_total"], reporting_delta) - epsilon_spent(row, reporting_delta))


def _at_most(value: float) -> float:
    """`value` rounded down to three significant digits: a figure to ask for that the budget still affords."""
    if value <= 0.0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(value)) - 2)
    return float(f"{math.floor(value / scale) * scale:.3g}")


def _asked(rho: float, delta: float, epsilon: float, reporting_delta: float) -> str:
    """A release's cost as people read it: its epsilon at the reporting delta (and its rho, which is charged)."""
    text = f"epsilon {epsilon:.4g}" if epsilon else f"epsilon {epsilon_of(rho, reporting_delta):.4g} (rho={rho:.4g})"
    return text + (f", delta={delta:.2g}" if delta else "")


def _usable(grant: dict, project: str, dataset: Dataset, use: str) -> None:
    """Refuse a revoked or expired grant, or one not granted for this use."""
    status = grant_status(grant, audit.now())
    if status != "active":
        raise GovernanceError(
            f"grant_{status}",
            f"project '{project}''s grant on '{dataset.name}' is {status}"
            + (f" (since {grant['expires_at'][:19]})" if status == "expired" else ""),
            hint="apply to the site's data stewards again; an approved application renews the grant", status=403)
    if use not in grant["uses"].split(","):
        raise GovernanceError("use_not_granted", f"project '{project}''s grant on '{dataset.name}' covers "
                              f"{grant['uses']}, not {use}",
                              hint=f"amend your application to include '{use}'; it will be reviewed again",
                              status=403)


def check(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, rho: float, delta: float,
          use: str = "query", epsilon: float = 0.0) -> dict | None:
    """Refuse (BudgetError, with what remains) unless the grant and the cap can both afford the cost:
    rho for a zCDP release, or epsilon for one accounted in (epsilon, delta), and delta.

    Returns the grant row, or None for a dataset whose level gives a default grant not created yet."""
    found = grant_row(conn, project, dataset.name)
    grant = found
    if grant is None:
        default = default_grant_epsilon(conn, catalog, dataset)
        if default is None:
            raise _no_grant(project, dataset)
        grant = dict(rho_total=rho_for_epsilon(default, catalog.reporting_delta), rho_spent=0.0, revoked=False,
                     delta=catalog.reporting_delta, delta_spent=0.0, approx_epsilon_spent=0.0, epsilon=default,
                     expires_at=None, uses="query")
    _usable(grant, project, dataset, use)
    cap = dict(conn.execute(_CAP, {"dataset": dataset.name}).mappings().one())
    grant_ok = affords(grant, rho, delta, epsilon, catalog.reporting_delta)
    if not (grant_ok and affords(cap, rho, delta, epsilon, catalog.reporting_delta)):
        left = _remaining(grant, catalog.reporting_delta)
        asked = _asked(rho, delta, epsilon, catalog.reporting_delta)
        if not grant_ok and grant["delta_spent"] + delta > grant["delta"]:
            raise BudgetError(
                "delta_exhausted",
                f"this costs delta={delta:.2g} but project '{project}''s grant on '{dataset.name}' has "
                f"delta={left['delta']:.2g} left (of {grant['delta']:.2g}); a smaller epsilon does not change that",
                hint=f"amend your application (or apply again) for a delta of at least {grant['delta_spent'] + delta:.2g}"
                     f"{'' if use == 'query' else f' for {use}'}, or ask for a smaller delta if the method allows it",
                remaining=left,
            )
        if not grant_ok:
            largest = _largest_next(grant, catalog.reporting_delta, approx=epsilon > 0.0)
            ask = f"ask for a smaller epsilon, {_at_most(largest):g} at most (wider intervals), " if largest else ""
            raise BudgetError(
                "budget_exhausted",
                f"this release asks for {asked} but project '{project}''s grant on '{dataset.name}' allows at most "
                f"epsilon {largest:.4g} for the next release (granted {grant['epsilon']:.4g}, spent "
                f"{left['epsilon_spent']:.4g}" + ("" if epsilon else "; epsilons of releases do not add up, rho does")
                + ")",
                hint=ask + "reuse releases you already have, or ask the data steward for more budget",
                remaining=left,
            )
        raise BudgetError(  # the cap's figures would tell what other projects spent: not for a researcher
            "budget_exhausted",
            f"this release asks for {asked}, which your grant on '{dataset.name}' covers, but this dataset's "
            "site-wide budget cannot cover it",
            hint="ask for a smaller epsilon (wider intervals) or reuse releases you already have; the site's "
                 "data stewards can tell you more",
            remaining=left,
        )
    return found


def charge(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, rho: float, delta: float,
           use: str = "query", epsilon: float = 0.0) -> None:
    """Check and add the cost to the grant and the cap, inside the caller's write transaction."""
    grant = check(conn, catalog, project, dataset, rho, delta, use, epsilon)
    if grant is None:  # first use of a dataset with a default grant (L1): created now, audited like any grant
        default = default_grant_epsilon(conn, catalog, dataset)  # at most the project's share of the cap
        assert default is not None
        set_grant(conn, catalog, project, dataset, default, by="site-default", role="system")
        grant = grant_row(conn, project, dataset.name)
        assert grant is not None
    params = {"grant_id": grant["id"], "cap_dataset": dataset.name, "cost_rho": rho, "cost_delta": delta,
              "cost_epsilon": epsilon}
    conn.execute(_SPEND_GRANT, params)
    conn.execute(_SPEND_CAP, params)


def refund(conn: Connection, project: str, dataset: str, epsilon: float, delta: float, rho: float = 0.0) -> None:
    """Give back what a training job reserved and did not spend, when it is settled: (epsilon, delta) the
    accountant did not spend, and the rho of DP releases it did not make."""
    grant = grant_row(conn, project, dataset)
    assert grant is not None, "a reservation always has a grant"
    params = {"grant_id": grant["id"], "cap_dataset": dataset, "cost_rho": -rho, "cost_delta": -delta,
              "cost_epsilon": -epsilon}
    conn.execute(_SPEND_GRANT, params)
    conn.execute(_SPEND_CAP, params)


def check_cap(conn: Connection, dataset: Dataset, rho: float, delta: float, reporting_delta: float) -> None:
    """Refuse (BudgetError) unless the dataset's lifetime cap alone can afford the cost."""
    cap = dict(conn.execute(_CAP, {"dataset": dataset.name}).mappings().one())
    if not affords(cap, rho, delta, 0.0, reporting_delta):
        raise BudgetError("budget_exhausted", f"this asks for {_asked(rho, delta, 0.0, reporting_delta)} but the "
                          f"lifetime cap of '{dataset.name}' allows at most epsilon "
                          f"{_largest_next(cap, reporting_delta, approx=False):.4g} for the next release (cap "
                          f"{cap['epsilon']:.4g}, spent {epsilon_spent(cap, reporting_delta):.4g})",
                          hint="use a smaller epsilon, or raise the cap with 'veil steward budget DATASET --cap'")


def charge_cap(conn: Connection, dataset: Dataset, rho: float, delta: float, reporting_delta: float) -> None:
    """Charge a release that belongs to no project (a steward's DP synthetic mock) to the cap alone."""
    check_cap(conn, dataset, rho, delta, reporting_delta)
    conn.execute(_SPEND_CAP, {"cap_dataset": dataset.name, "cost_rho": rho, "cost_delta": delta, "cost_epsilon": 0.0})
