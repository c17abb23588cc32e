"""A standing count's true counts (issue 18): its spec checked against a dataset's public metadata, the
dates of its windows, and one window's count for every public group, from the rows. Pure Polars; the noise
and the accounting are `veil.query.continual`'s (OpenDP), never here.

Counting. A row falls in window `(day(time_column) - start).days // window_days`, kept if in [0, horizon).
Among the rows the WHERE keeps, the cells are the distinct (privacy unit, window, group key); each patient's
cells are sorted by (window, key) and only the first `max_windows` count (truncation: a patient is in at
most k cells over the whole horizon, at most 1 per window and group). The count of (w, key) is the number
of kept cells there. A window's cells depend only on the rows of windows up to it, so this holds as long as
the rows of closed windows do not change afterwards (the usual continual-release setting: the count series
is fixed in advance, not chosen after seeing what was released).

Groups share one tree plan. With G groups the node vector is G trees; a patient's kept cells are at most
k in all, so per level the squared L2 change is still at most k * min(2^h, k): `continual.sensitivity_squared`
bounds the whole vector, and one `CounterPlan` (one OpenDP measurement) serves every group, each group
keeping its own `CounterState`. Every public key is released, zero counts included: which keys occur in
the data is never shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import polars as pl

from veil.errors import QueryError
from veil.query.plan import predicate, public_keys
from veil.query.table import Table
from veil.sql import parse_sql
from veil.wire import QuerySpec, StandingQuery

DATE_DTYPES = ("Date", "Datetime")
_WINDOW = "__veil_window"


@dataclass(frozen=True)
class Counting:
    """A standing query checked against its dataset: the parsed SQL and every public group key, in order."""

    table: Table
    spec: StandingQuery
    query: QuerySpec
    keys: tuple[dict[str, Any], ...]
    """Every public key combination ({} without GROUP BY): the groups released in every window."""


def prepare(table: Table, spec: StandingQuery) -> Counting:
    """Check a standing query against the dataset's public metadata; refuse (QueryError, CatalogError) SQL
    that is not one COUNT(*) over this dataset, group keys without public values, unknown columns, and a
    time column that is not a date. Reads no data."""
    query = parse_sql(spec.sql)
    if query.dataset != table.name:
        raise QueryError("standing_dataset_mismatch", f"the standing query's SQL reads '{query.dataset}', but the "
                         f"application names dataset '{table.name}'",
                         hint="name the same dataset in the SQL's FROM and in the application's datasets")
    if len(query.aggregates) != 1 or query.aggregates[0].fn != "count" or query.aggregates[0].column is not None:
        raise QueryError("standing_count_only", "a standing query counts patients: its SQL selects exactly one "
                         "COUNT(*) and no other aggregate",
                         hint=f"write SELECT [keys,] COUNT(*) FROM {table.name} [WHERE ...] [GROUP BY keys]")
    for name in query.group_by:
        if public_keys(table, [name]) is None:
            raise QueryError("no_public_keys", f"column '{name}' has no public list of values, so its groups "
                             "cannot all be released in every window",
                             hint="group by columns with declared categories, booleans or small integer bounds "
                                  "(GET /datasets/NAME lists them), or ask the steward to declare its categories")
    public = public_keys(table, query.group_by) if query.group_by else None
    keys = tuple(public.collect().to_dicts()) if public is not None else ({},)
    if query.where is not None:
        predicate(table, query.where)  # unknown columns and bad literals are refused here
    column = table.column(spec.time_column)
    if column.dtype not in DATE_DTYPES:
        raise QueryError("not_a_date", f"the time column '{column.name}' is {column.dtype}, not a date",
                         hint="name a Date column of the dataset as time_column (GET /datasets/NAME lists them)")
    return Counting(table, spec, query, keys)


def window_dates(spec: StandingQuery, window: int) -> tuple[date, date]:
    """Window `window`'s first day and the day after its last."""
    first = spec.start + timedelta(days=window * spec.window_days)
    return first, first + timedelta(days=spec.window_days)


def release_time(spec: StandingQuery, window: int) -> datetime:
    """When window `window` is released: `lag_days` after it ends, at UTC midnight."""
    return datetime.combine(window_dates(spec, window)[1] + timedelta(days=spec.lag_days), time(), tzinfo=UTC)


def due(spec: StandingQuery, now: datetime) -> int:
    """How many windows are due for release at `now` (0 to horizon)."""
    days = (now.astimezone(UTC).date() - spec.start).days - spec.lag_days
    return max(0, min(spec.horizon, days // spec.window_days))


def window_counts(counting: Counting, rows: pl.LazyFrame, window: int) -> list[int]:
    """The true count of window `window` for every public group (in `counting.keys` order), after the
    per-patient truncation to `max_windows` cells. Reads the rows of windows 0..window only."""
    spec, query, unit = counting.spec, counting.query, counting.table.privacy_unit
    keys = query.group_by
    frame = rows if query.where is None else rows.filter(predicate(counting.table, query.where))
    day = pl.col(spec.time_column).cast(pl.Date)
    cells = (frame.filter(day.is_not_null())
             .select(pl.col(unit), ((day - pl.lit(spec.start)).dt.total_days() // spec.window_days).alias(_WINDOW),
                     *(pl.col(k) for k in keys))
             .filter((pl.col(_WINDOW) >= 0) & (pl.col(_WINDOW) <= window))
             .unique()
             .sort([unit, _WINDOW, *keys], nulls_last=True)
             .filter(pl.int_range(pl.len()).over(unit) < spec.max_windows)
             .filter(pl.col(_WINDOW) == window))
    if not keys:
        return [int(cells.select(pl.len()).collect().item())]
    found = {tuple(r[:-1]): int(r[-1]) for r in cells.group_by(keys).len().collect().iter_rows()}
    return [found.get(tuple(key[k] for k in keys), 0) for key in counting.keys]
