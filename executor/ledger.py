"""The privacy-budget ledger: a grant per (project, dataset) and a lifetime cap per dataset.

Budgets are set in epsilon at the site's reporting delta and kept in rho (zCDP adds up); a
grant's own `delta` is a separate budget for thresholding, which adds to the reporting delta. A charge
is checked against both the grant and the cap and recorded in the same write transaction as its
audit entry, so concurrent requests cannot overspend and a crash cannot split them.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from veil.errors import BudgetError, CatalogError
from veil.executor import audit
from veil.executor.accounting import epsilon_of, rho_for_epsilon
from veil.executor.catalog import Catalog, Dataset
from veil.executor.store import caps, grants, write
from veil.wire import AuditEntry, GrantInfo


def sync_caps(engine: Engine, catalog: Catalog) -> None:
    """Make each dataset's lifetime cap match the catalog; what was spent is kept."""
    with write(engine) as conn:
        for ds in catalog.datasets.values():
            rho = rho_for_epsilon(ds.lifetime_epsilon, catalog.reporting_delta)
            values = dict(epsilon=ds.lifetime_epsilon, delta=catalog.reporting_delta, rho_total=rho)
            if conn.execute(select(caps.c.dataset).where(caps.c.dataset == ds.name)).first() is None:
                conn.execute(insert(caps).values(dataset=ds.name, rho_spent=0.0, delta_spent=0.0, **values))
            else:
                conn.execute(update(caps).where(caps.c.dataset == ds.name).values(**values))


def set_grant(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, epsilon: float,
              by: str, role: str = "steward") -> AuditEntry:
    """Create or resize a grant (in epsilon at the site's reporting delta) and audit the decision."""
    delta = catalog.reporting_delta
    rho = rho_for_epsilon(epsilon, delta)
    existing = conn.execute(select(grants).where(grants.c.project == project, grants.c.dataset == dataset.name)
                            ).mappings().first()
    if existing is None:
        conn.execute(insert(grants).values(project=project, dataset=dataset.name, epsilon=epsilon, delta=delta,
                                           rho_total=rho, rho_spent=0.0, delta_spent=0.0, created_by=by,
                                           created_at=audit.now()))
    else:
        conn.execute(update(grants).where(grants.c.id == existing["id"]).values(epsilon=epsilon, rho_total=rho))
    return audit.append(conn, principal=by, role=role, action="grant", decision="granted", project=project,
                        dataset=dataset.name, reason=f"epsilon={epsilon} at delta={delta}")


_GRANT = select(grants).where(grants.c.project == bindparam("project"), grants.c.dataset == bindparam("dataset"))
_CAP = select(caps).where(caps.c.dataset == bindparam("dataset"))
_SPEND_GRANT = update(grants).where(grants.c.id == bindparam("grant_id")).values(
    rho_spent=grants.c.rho_spent + bindparam("cost_rho"), delta_spent=grants.c.delta_spent + bindparam("cost_delta"))
_SPEND_CAP = update(caps).where(caps.c.dataset == bindparam("cap_dataset")).values(
    rho_spent=caps.c.rho_spent + bindparam("cost_rho"), delta_spent=caps.c.delta_spent + bindparam("cost_delta"))
# statements built once: the charge path runs them on every release


def _grant_row(conn: Connection, project: str, dataset: str) -> dict | None:
    row = conn.execute(_GRANT, {"project": project, "dataset": dataset}).mappings().first()
    return dict(row) if row else None


def _no_grant(project: str, dataset: Dataset) -> CatalogError:
    return CatalogError(
        "no_grant",
        f"project '{project}' holds no grant on dataset '{dataset.name}' ({dataset.level})",
        hint="apply to the site's data stewards for access; an approved application comes with a budget",
        status=403,
    )


def grant_info(row: dict, reporting_delta: float) -> GrantInfo:
    """A grant as people read it; `epsilon_remaining` is the largest epsilon one more release could have."""
    remaining = max(0.0, row["rho_total"] - row["rho_spent"])
    return GrantInfo(
        project=row["project"], dataset=row["dataset"], epsilon=row["epsilon"], delta=row["delta"],
        rho_total=row["rho_total"], rho_spent=row["rho_spent"], rho_remaining=remaining,
        epsilon_spent=epsilon_of(row["rho_spent"], reporting_delta),
        epsilon_remaining=epsilon_of(remaining, reporting_delta),
        delta_spent=row["delta_spent"],
    )


def list_grants(engine: Engine, project: str | None, reporting_delta: float) -> list[GrantInfo]:
    """Grants of one project (a researcher's view) or of all projects (a steward's)."""
    query = select(grants).order_by(grants.c.project, grants.c.dataset)
    if project is not None:
        query = query.where(grants.c.project == project)
    with engine.connect() as conn:
        return [grant_info(dict(r), reporting_delta) for r in conn.execute(query).mappings()]


def granted_datasets(engine: Engine, project: str) -> set[str]:
    """The datasets on which `project` holds a grant."""
    with engine.connect() as conn:
        return set(conn.execute(select(grants.c.dataset).where(grants.c.project == project)).scalars())


def _remaining(grant: dict, cap: dict) -> dict[str, float]:
    return {
        "rho": max(0.0, min(grant["rho_total"] - grant["rho_spent"], cap["rho_total"] - cap["rho_spent"])),
        "delta": max(0.0, min(grant["delta"] - grant["delta_spent"], cap["delta"] - cap["delta_spent"])),
        "rho_granted": grant["rho_total"],
        "epsilon_granted": grant["epsilon"],
    }


def check(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, rho: float, delta: float
          ) -> dict | None:
    """Refuse (BudgetError, with what remains) unless the grant and the cap can both afford the cost.

    Returns the grant row, or None for an L1 dataset whose default grant is not created yet."""
    found = _grant_row(conn, project, dataset.name)
    grant = found
    if grant is None:
        if dataset.level != "L1":
            raise _no_grant(project, dataset)
        grant = dict(rho_total=rho_for_epsilon(catalog.default_l1_epsilon, catalog.reporting_delta), rho_spent=0.0,
                     delta=catalog.reporting_delta, delta_spent=0.0, epsilon=catalog.default_l1_epsilon)
    cap = dict(conn.execute(_CAP, {"dataset": dataset.name}).mappings().one())
    grant_ok = grant["rho_spent"] + rho <= grant["rho_total"] and grant["delta_spent"] + delta <= grant["delta"]
    cap_ok = cap["rho_spent"] + rho <= cap["rho_total"] and cap["delta_spent"] + delta <= cap["delta"]
    if not (grant_ok and cap_ok):
        left = _remaining(grant, cap)
        which = f"project '{project}''s grant" if not grant_ok else "the dataset's lifetime cap"
        asked = f"rho={rho:.4g}" + (f", delta={delta:.2g}" if delta else "")
        left_text = f"rho={left['rho']:.4g}" + (f", delta={left['delta']:.2g}" if delta else "")
        raise BudgetError(
            "budget_exhausted",
            f"this release costs {asked} but {which} on '{dataset.name}' has {left_text} left",
            hint="ask for a smaller epsilon (wider intervals), reuse releases you already have, "
                 "or ask the data steward for more budget",
            remaining=left,
        )
    return found


def charge(conn: Connection, catalog: Catalog, project: str, dataset: Dataset, rho: float, delta: float) -> None:
    """Check and add the cost to the grant and the cap, inside the caller's write transaction."""
    grant = check(conn, catalog, project, dataset, rho, delta)
    if grant is None:  # first use of an L1 dataset: its default grant, audited like any grant
        set_grant(conn, catalog, project, dataset, catalog.default_l1_epsilon, by="site-default", role="system")
        grant = _grant_row(conn, project, dataset.name)
        assert grant is not None
    params = {"grant_id": grant["id"], "cap_dataset": dataset.name, "cost_rho": rho, "cost_delta": delta}
    conn.execute(_SPEND_GRANT, params)
    conn.execute(_SPEND_CAP, params)
