"""An open dataset's DP statistics sheet: published by a steward, then public to every token on the site.

The sheet holds the dataset's DP row count and, per column, what its public metadata allows: DP counts per
public category (columns with declared categories), a bounded DP mean (numeric columns with public bounds) and
a DP count of non-null values (nullable columns). Each is one query of the shared core (`veil.query`: prepare,
then run), the sheet's epsilon split evenly among them in zCDP. The whole cost is charged to the dataset's
lifetime cap (it belongs to no project) and audited in one transaction with the stored sheet, before anyone
sees it; downloads are then free. A new publication replaces the stored sheet; the audit log keeps each one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from sqlalchemy import Engine, delete, insert, select

from veil.errors import CatalogError
from veil.executor import audit, ledger
from veil.executor.catalog import Catalog, Dataset
from veil.executor.store import published_sheets, write
from veil.query.accounting import rho_for_epsilon
from veil.query.prepared import prepare
from veil.query.release import run
from veil.query.table import Column
from veil.wire import Aggregate, QuerySpec, SheetPart, StatisticsSheet

CONFIDENCE = 0.95


def _column_spec(dataset: str, column: Column) -> QuerySpec | None:
    """The query of a column's sheet statistics; None when its public metadata allows none beyond the rows."""
    if column.categories is not None:
        return QuerySpec(dataset=dataset, group_by=[column.name], aggregates=[Aggregate(fn="count")])
    aggregates = [Aggregate(fn="count", column=column.name)] if column.nullable else []
    if column.is_numeric and column.bounds is not None:
        aggregates.append(Aggregate(fn="mean", column=column.name))
    return QuerySpec(dataset=dataset, aggregates=aggregates) if aggregates else None


def sheet_specs(dataset: Dataset) -> Iterator[tuple[str | None, QuerySpec]]:
    """(column, query) for each part of the dataset's sheet: its rows first (column None), then its columns."""
    yield None, QuerySpec(dataset=dataset.name, aggregates=[Aggregate(fn="count")])
    for column in dataset.columns.values():
        spec = _column_spec(dataset.name, column) if column.name != dataset.privacy_unit else None
        if spec is not None:
            yield column.name, spec


def _require_open(dataset: Dataset) -> None:
    if dataset.sharing != "open":
        raise CatalogError("not_open", f"dataset '{dataset.name}' is {dataset.sharing}: only open datasets have a "
                           "public statistics sheet", hint='a steward may declare an L1 dataset sharing = "open" '
                           "in site.toml; otherwise query it under a grant", status=404)


def publish(engine: Engine, catalog: Catalog, dataset: Dataset, epsilon: float, by: str,
            verified_bound: bool) -> StatisticsSheet:
    """Release the open dataset's sheet at `epsilon` in all, charge the lifetime cap, audit and store it
    together; refuse (BudgetError) before reading any row when the cap cannot afford it."""
    _require_open(dataset)
    specs = list(sheet_specs(dataset))
    rho = rho_for_epsilon(epsilon, catalog.reporting_delta)
    with engine.connect() as conn:  # fail early, before reading any row
        ledger.check_cap(conn, dataset, rho, 0.0, catalog.reporting_delta)
    parts, spent, digests = [], 0.0, []
    for column, spec in specs:
        prepared = prepare(dataset, spec, verified_bound=verified_bound, rho=rho / len(specs), delta=None,
                           confidence=CONFIDENCE, min_threshold=0)
        output = run(dataset.scan(), dataset, prepared.plan, prepared.certified, prepared.description)
        parts.append(SheetPart(column=column, statistics=[s.name for s in output.statistics], rows=output.rows))
        spent += prepared.certified.rho  # zCDP: the parts' rho add up
        digests.append(output.digest)
    with write(engine) as conn:  # charged, recorded and stored together, before anyone downloads it
        ledger.charge_cap(conn, dataset, spent, 0.0, catalog.reporting_delta)
        entry = audit.append(conn, principal=by, role="steward", action="publish", decision="released",
                             dataset=dataset.name, rho=spent,
                             result_digest=hashlib.sha256("".join(digests).encode()).hexdigest(),
                             reason=f"DP statistics sheet ({len(parts)} queries, OpenDP), public to every token")
        sheet = StatisticsSheet(site=catalog.site, dataset=dataset.name, title=dataset.title, epsilon=epsilon,
                                confidence=CONFIDENCE, parts=parts, published_by=by, published_at=entry.ts,
                                receipt=entry.hash)
        conn.execute(delete(published_sheets).where(published_sheets.c.dataset == dataset.name))
        conn.execute(insert(published_sheets).values(dataset=dataset.name, epsilon=epsilon,
                                                     sheet=sheet.model_dump_json(), published_by=by,
                                                     published_at=entry.ts, receipt=entry.hash))
    return sheet


def get_sheet(engine: Engine, dataset: Dataset) -> StatisticsSheet:
    """The open dataset's published sheet; refused (404) when it is not open or nothing is published yet."""
    _require_open(dataset)
    with engine.connect() as conn:
        stored = conn.execute(select(published_sheets.c.sheet).where(
            published_sheets.c.dataset == dataset.name)).scalar()
    if stored is None:
        raise CatalogError("no_sheet", f"no statistics sheet of '{dataset.name}' has been published yet",
                           hint="ask the site's data steward to publish one: veil steward publish --dataset "
                                f"{dataset.name} --epsilon E", status=404)
    return StatisticsSheet.model_validate_json(stored)


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def _part_markdown(part: SheetPart) -> list[str]:
    """One part as a Markdown table: its group keys (if any), then each statistic with its interval."""
    keys = [k for k in (part.rows[0] if part.rows else {}) if k not in part.statistics
            and not k.endswith(("_lower", "_upper"))]
    lines = [f"### {part.column or 'rows'}", "",
             "| " + " | ".join([*keys, *(f"{s} [interval]" for s in part.statistics)]) + " |",
             "|" + "---|" * (len(keys) + len(part.statistics))]
    for row in part.rows:
        cells = [_value(row[k]) for k in keys] + [
            f"{_value(row[s])} [{_value(row[f'{s}_lower'])}, {_value(row[f'{s}_upper'])}]" for s in part.statistics]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(sheet: StatisticsSheet) -> str:
    """The sheet as a Markdown document: a header saying how it was released, then one table per part."""
    head = [f"# {sheet.title} ({sheet.dataset}, site {sheet.site}): DP statistics sheet", "",
            f"Released with differential privacy (OpenDP) at epsilon {sheet.epsilon:g} in all, intervals at "
            f"{sheet.confidence:.0%} confidence; published by {sheet.published_by} at {sheet.published_at[:19]}, "
            f"audit receipt {sheet.receipt}. An empty estimate is not informative (its interval spans half of "
            "the column's public range or more).", ""]
    return "\n".join(head + [line for part in sheet.parts for line in _part_markdown(part)])
