"""A Polars-like query builder that compiles to the executor's JSON query spec (`wire.QuerySpec`).

    from veil.kernel import col, count
    ds.filter((col("age") < 6) & col("sex").is_in(["F"])).group_by("region").agg(count(), col("age").mean())
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from veil.wire import Aggregate, And, Comparison, Condition, Not, Or, Scalar


@dataclass(frozen=True)
class Cond:
    """A filter condition; combine with `&`, `|` and `~`."""

    condition: Condition

    def __and__(self, other: Cond) -> Cond:
        return Cond(And(all=[self.condition, other.condition]))

    def __or__(self, other: Cond) -> Cond:
        return Cond(Or(any=[self.condition, other.condition]))

    def __invert__(self) -> Cond:
        return Cond(Not(negate=self.condition))


@dataclass(frozen=True)
class Agg:
    """One DP statistic to release; `.alias(name)` names its output column."""

    aggregate: Aggregate

    def alias(self, name: str) -> Agg:
        return Agg(self.aggregate.model_copy(update={"alias": name}))


@dataclass(frozen=True)
class Col:
    """A column of the dataset, for filters and aggregates."""

    name: str

    def _cmp(self, op: str, value: Any) -> Cond:
        return Cond(Comparison(column=self.name, op=op, value=value))

    def __eq__(self, value: Scalar) -> Cond:  # type: ignore[override]
        return self._cmp("==", value)

    def __ne__(self, value: Scalar) -> Cond:  # type: ignore[override]
        return self._cmp("!=", value)

    def __lt__(self, value: Scalar) -> Cond:
        return self._cmp("<", value)

    def __le__(self, value: Scalar) -> Cond:
        return self._cmp("<=", value)

    def __gt__(self, value: Scalar) -> Cond:
        return self._cmp(">", value)

    def __ge__(self, value: Scalar) -> Cond:
        return self._cmp(">=", value)

    def __hash__(self) -> int:
        return hash(self.name)

    def is_in(self, values: list[Scalar]) -> Cond:
        return self._cmp("in", list(values))

    def is_null(self) -> Cond:
        return Cond(Comparison(column=self.name, op="is_null"))

    def is_not_null(self) -> Cond:
        return Cond(Comparison(column=self.name, op="is_not_null"))

    def count(self) -> Agg:
        return Agg(Aggregate(fn="count", column=self.name))

    def sum(self) -> Agg:
        return Agg(Aggregate(fn="sum", column=self.name))

    def mean(self) -> Agg:
        return Agg(Aggregate(fn="mean", column=self.name))

    def median(self) -> Agg:
        return Agg(Aggregate(fn="median", column=self.name))

    def quantile(self, q: float) -> Agg:
        return Agg(Aggregate(fn="quantile", column=self.name, q=q))


def col(name: str) -> Col:
    """A column by name."""
    return Col(name)


def count() -> Agg:
    """COUNT(*): the number of rows (after filters), per group."""
    return Agg(Aggregate(fn="count"))


@dataclass(frozen=True)
class Shape:
    """The data-free part of a query: filter, grouping and statistics (no dataset, no loss yet)."""

    where: Condition | None = None
    group_by: tuple[str, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()

    def filter(self, cond: Cond) -> Shape:
        where = cond.condition if self.where is None else And(all=[self.where, cond.condition])
        return replace(self, where=where)

    def grouped(self, *columns: str | Col) -> Shape:
        return replace(self, group_by=tuple(c.name if isinstance(c, Col) else c for c in columns))

    def with_aggregates(self, *aggs: Agg) -> Shape:
        return replace(self, aggregates=tuple(a.aggregate for a in aggs))
