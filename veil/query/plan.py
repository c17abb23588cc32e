"""A query spec to a Polars plan of OpenDP expressions, built from a dataset's public metadata.

The plan is built over OpenDP's placeholder frame for the dataset's domain, never over the data:
OpenDP turns it into a measurement, certifies its privacy loss, and only then runs it on the scan.
Bounds, candidates and key sets come from the catalog (public), never from the data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import date
from typing import Any

import opendp.prelude as dp
import polars as pl
from opendp.domains import _lazyframe_from_domain, with_margin

from veil.errors import QueryError
from veil.query.table import DTYPES, Column, Table
from veil.wire import Aggregate, And, Comparison, Condition, Not, Or, QuerySpec

dp.enable_features("contrib")

MAX_PUBLIC_KEYS = 10_000
"""Largest public key set (product of the group columns' categories) a grouped query may use."""
EPOCH = date(1970, 1, 1)
QUANTILE_CANDIDATES = 201
"""Candidates on a float column's public range for quantiles: a finer grid costs nothing in privacy."""
ROW = "__veil_row"
"""The column a bare COUNT(*) reads: each row's index, made by the scan itself. Polars fills it from the file's
row count without decoding a column, so counting 10M rows costs what Polars' own count costs. It has one
row per dataset row, so the rows-per-patient bound holds for it as it does for the data."""
ROW_DTYPE = pl.LazyFrame().with_row_index(ROW).collect_schema()[ROW]


@dataclass(frozen=True)
class Part:
    """One expression of the plan: `name` in the released frame, feeding the statistic `statistic`."""

    name: str
    statistic: Aggregate
    role: str  # "value", or for a mean: "sum" / "count"


@dataclass(frozen=True)
class Plan:
    """What the measurement needs: domain, privacy unit, the plan and how its columns map back."""

    domain: Any
    metric: Any
    d_in: int
    lazyframe: pl.LazyFrame
    parts: list[Part]
    public_keys: bool
    group_by: list[str]
    columns: list[str]
    """The dataset columns the query reads (or `[ROW]`): the scan projects them before OpenDP sees the data."""

    def project(self, data: pl.LazyFrame) -> pl.LazyFrame:
        """The scan narrowed to what the measurement reads: its columns, or for a bare count each row's index."""
        if self.columns == [ROW]:
            return data.with_row_index(ROW).select(ROW)
        return data.select(self.columns)

    def input_schema(self, dataset: Table) -> pl.Schema:
        """The schema of `project`'s frame."""
        return _schema(dataset, self.columns)


def _schema(dataset: Table, columns: list[str]) -> pl.Schema:
    schema = dataset.schema()
    return pl.Schema({c: ROW_DTYPE if c == ROW else schema[c] for c in columns})


def _literal(column: Column, value: Any) -> Any:
    """Check a filter value against the column's dtype and convert it for Polars."""
    if column.dtype == "Date":
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            raise QueryError("bad_value", f"'{value}' is not a date for column '{column.name}'",
                             hint="write dates as 'YYYY-MM-DD'") from None
    if column.dtype == "String":
        if not isinstance(value, str):
            raise QueryError("bad_value", f"column '{column.name}' holds text; compare it with 'text', not {value!r}")
        return value
    if column.dtype == "Boolean":
        if not isinstance(value, bool):
            raise QueryError("bad_value", f"column '{column.name}' is boolean; compare it with TRUE or FALSE")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QueryError("bad_value", f"column '{column.name}' is numeric; compare it with a number, not {value!r}")
    return value


def predicate(dataset: Table, cond: Condition) -> pl.Expr:
    """The Polars filter of a WHERE condition, its literals checked against the columns' public types."""
    if isinstance(cond, And):
        return _fold([predicate(dataset, c) for c in cond.all], "and")
    if isinstance(cond, Or):
        return _fold([predicate(dataset, c) for c in cond.any], "or")
    if isinstance(cond, Not):
        return ~predicate(dataset, cond.negate)
    assert isinstance(cond, Comparison)
    column = dataset.column(cond.column)
    col = pl.col(column.name)
    if cond.op == "is_null":
        return col.is_null()
    if cond.op == "is_not_null":
        return col.is_not_null()
    if cond.op == "in":
        return _membership(column, col, [_literal(column, v) for v in cond.value])  # type: ignore[union-attr]
    value = _literal(column, cond.value)
    if column.dtype == "Date":  # OpenDP 0.16 takes no date literals: compare days since 1970-01-01
        col, value = col.cast(pl.Int32), (value - EPOCH).days
    value = pl.lit(value)
    return {"==": col == value, "!=": col != value, "<": col < value,
            "<=": col <= value, ">": col > value, ">=": col >= value}[cond.op]


def _membership(column: Column, col: pl.Expr, values: list[Any]) -> pl.Expr:
    """`col IN (values)` as one lookup: OpenDP 0.16 has no `is_in`, but it does take `replace_strict`, and a
    lookup of the value in the list costs the same however long the list is (an OR of equalities grows
    with it). A null stays null, so the row is left out, as SQL's IN does."""
    if column.dtype == "Date":  # OpenDP 0.16 takes no date literals: compare days since 1970-01-01
        col, values = col.cast(pl.Int32), [(v - EPOCH).days for v in values]
    old = pl.Series(values, dtype=pl.Int32 if column.dtype == "Date" else DTYPES[column.dtype])
    return col.replace_strict(old.unique(), True, default=False, return_dtype=pl.Boolean)


def _fold(exprs: list[pl.Expr], how: str) -> pl.Expr:
    """`e1 & e2 & ...` (or `|`) as a balanced tree: its depth grows with log2 of the terms, so OpenDP's
    recursion over the expression stays shallow (a left-deep chain of 2,000 terms overflows its stack)."""
    while len(exprs) > 1:
        pairs = [(exprs[i] & exprs[i + 1]) if how == "and" else (exprs[i] | exprs[i + 1])
                 for i in range(0, len(exprs) - 1, 2)]
        exprs = pairs + exprs[len(exprs) - len(exprs) % 2:]
    return exprs[0]


def _bounded(dataset: Table, agg: Aggregate) -> tuple[Column, tuple[Any, Any]]:
    column = dataset.column(agg.column)
    if not column.is_numeric:
        raise QueryError("unsupported_query", f"{agg.fn} needs a numeric column; '{column.name}' is {column.dtype}",
                         hint="group by it and count instead")
    if column.bounds is None:
        raise QueryError(
            "unbounded_column",
            f"column '{column.name}' has no public bounds, so its {agg.fn} has unbounded sensitivity",
            hint="ask the site's data steward to declare bounds for it in the catalog",
        )
    lo, hi = column.bounds
    return column, ((int(lo), int(hi)) if column.is_integer else (float(lo), float(hi)))


def _candidates(column: Column, bounds: tuple[Any, Any]) -> list[Any]:
    lo, hi = bounds
    if column.is_integer and hi - lo <= 1000:
        return list(range(lo, hi + 1))
    step = (hi - lo) / (QUANTILE_CANDIDATES - 1)
    grid = [lo + i * step for i in range(QUANTILE_CANDIDATES)]
    return sorted({int(round(x)) for x in grid}) if column.is_integer else grid


def _parts(dataset: Table, agg: Aggregate) -> list[tuple[Part, pl.Expr]]:
    name = agg.name
    if agg.fn == "count":
        if agg.column is None:
            return [(Part(name, agg, "value"), dp.len(signed=True).alias(name))]
        dataset.column(agg.column)
        return [(Part(name, agg, "value"), pl.col(agg.column).dp.count(signed=True).alias(name))]
    column, bounds = _bounded(dataset, agg)
    values = pl.col(column.name).drop_nulls()
    if agg.fn == "sum":
        return [(Part(name, agg, "value"), values.dp.sum(bounds).alias(name))]
    if agg.fn == "mean":  # released as a DP sum and a DP count, divided afterwards: same cost as dp.mean
        return [
            (Part(f"{name}__sum", agg, "sum"), values.dp.sum(bounds).alias(f"{name}__sum")),
            (Part(f"{name}__count", agg, "count"), values.dp.count(signed=True).alias(f"{name}__count")),
        ]
    q = 0.5 if agg.fn == "median" else agg.q
    return [(Part(name, agg, "value"), values.dp.quantile(q, _candidates(column, bounds)).alias(name))]


def public_keys(dataset: Table, group_by: list[str]) -> pl.LazyFrame | None:
    """The cartesian product of the group columns' public values (with null for a nullable column), or None
    if one is not public."""
    values = []
    for name in group_by:
        column = dataset.column(name)
        if column.categories is not None:
            values.append(list(column.categories))
        elif column.dtype == "Boolean":
            values.append([False, True])
        elif column.is_integer and column.bounds is not None and column.bounds[1] - column.bounds[0] <= 1000:
            values.append(list(range(int(column.bounds[0]), int(column.bounds[1]) + 1)))
        else:
            return None
        if column.nullable:  # rows whose key is null are a group of their own, shown as null
            values[-1].append(None)
    size = 1
    for v in values:
        size *= len(v)
    if size > MAX_PUBLIC_KEYS:
        raise QueryError("too_many_groups", f"grouping by {group_by} makes {size} public groups",
                         hint=f"group by fewer columns (at most {MAX_PUBLIC_KEYS} groups)")
    rows = list(itertools.product(*values))
    schema = {name: dataset.schema()[name] for name in group_by}
    return pl.LazyFrame(rows, schema=schema, orient="row")


def _condition_columns(cond: Condition) -> set[str]:
    if isinstance(cond, And):
        return set().union(*(_condition_columns(c) for c in cond.all))
    if isinstance(cond, Or):
        return set().union(*(_condition_columns(c) for c in cond.any))
    if isinstance(cond, Not):
        return _condition_columns(cond.negate)
    return {cond.column}


def _columns(dataset: Table, spec: QuerySpec, truncate: bool) -> list[str]:
    """The columns a query touches, in catalog order; unknown names are refused. The privacy unit is read
    when rows are truncated per patient; a bare COUNT(*) over rows of a verified bound reads only `ROW`."""
    used = {*spec.group_by, *(a.column for a in spec.aggregates if a.column)}
    if spec.where is not None:
        used |= _condition_columns(spec.where)
    for name in used:
        dataset.column(name)
    if not truncate and not used and ROW not in dataset.columns:
        return [ROW]
    if truncate or not used:
        used.add(dataset.privacy_unit)
    return [name for name in dataset.columns if name in used]


def build_plan(dataset: Table, spec: QuerySpec, verified_bound: bool, thresholded: bool) -> Plan:
    """Compile `spec` over the dataset's domain.

    With `verified_bound` the executor has checked that no patient has more rows than the catalog's
    `max_rows_per_unit`, so the unit is "k rows"; otherwise rows are truncated per patient in the plan.
    """
    columns = _columns(dataset, spec, truncate=not verified_bound)
    domain = dp.domain_of(pl.LazyFrame(schema=_schema(dataset, columns)), infer=True)
    for by in ([], spec.group_by) if spec.group_by else ([],):
        domain = with_margin(domain, dp.polars.Margin(by=by, max_length=dataset.max_rows))
    k = dataset.max_rows_per_unit
    if verified_bound:
        metric, d_in = dp.unit_of(contributions=k)
    else:  # each patient is one identifier; the truncation below keeps at most k of its rows
        metric, d_in = dp.unit_of(contributions=1, identifier=dataset.privacy_unit)
    frame = _lazyframe_from_domain(domain)
    if spec.where is not None:
        frame = frame.filter(predicate(dataset, spec.where))
    if not verified_bound:
        frame = frame.filter(pl.int_range(pl.len()).shuffle().over(dataset.privacy_unit) < k)
    named = [pe for agg in spec.aggregates for pe in _parts(dataset, agg)]
    names = [p.name for p, _ in named]
    if len(set(names)) != len(names) or set(names) & set(spec.group_by):
        raise QueryError("duplicate_name", f"output names collide: {names}", hint="give each aggregate its own alias")
    exprs = [e for _, e in named]
    keys = public_keys(dataset, spec.group_by) if spec.group_by else None
    if not spec.group_by:
        plan = frame.select(*exprs)
    elif keys is not None:
        plan = keys.join(frame.group_by(spec.group_by).agg(*exprs), on=spec.group_by, how="left", nulls_equal=True)
    else:
        if not thresholded:
            raise QueryError(
                "private_keys",
                f"the values of {spec.group_by} are not public, so releasing the groups needs thresholding",
                hint="pass delta (e.g. 1e-8) so that only groups with a large enough noisy count are released, "
                     "or ask the steward to declare the column's categories",
            )
        if not any(a.fn == "count" and a.column is None for a in spec.aggregates):
            raise QueryError("private_keys", "thresholded groups need a COUNT(*) in the query to threshold on",
                             hint="add COUNT(*) to the selected aggregates")
        plan = frame.group_by(spec.group_by).agg(*exprs)
    return Plan(domain, metric, d_in, plan, [p for p, _ in named], keys is not None, list(spec.group_by), columns)
