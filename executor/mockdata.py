"""DP synthetic mock rows for a dataset, fitted to the real data by OpenDP's MST synthesizer (`dp.mbi`).

Columns are discretized from public metadata only (category sets, bounds, a fixed date range), OpenDP
releases a contingency table (noisy 1- and 2-way marginals chosen by MST, fitted by Private-PGM) in
one measurement whose privacy loss OpenDP's map certifies, and rows are sampled from that table: the
row count, the bins' decoding and the made-up patient ids are post-processing. The privacy unit is the
patient: rows are truncated to `max_rows_per_unit` per patient unless the file is known to respect it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Any

import numpy as np
import opendp.prelude as dp
import polars as pl
from opendp._internal import _new_pure_function
from opendp.combinators import make_adaptive_composition
from opendp.domains import _lazyframe_from_domain, with_margin
from opendp.extras.mbi._mst import _make_mst_select
from opendp.extras.mbi._utilities import (
    get_associated_metric,
    make_noise_marginals,
    make_stable_marginals,
    prior,
)
from opendp.mod import binary_search_chain

from veil.errors import VeilError
from veil.executor.catalog import Dataset
from veil.query.table import DTYPES, Column

dp.enable_features("contrib")

BINS = 10
"""Equal-width bins per bounded number or date (integers with at most EXACT values keep each one)."""
EXACT = 20
MIN_ROWS = 100
DATES = (date(2015, 1, 1), date(2025, 12, 31))
"""The public range of a date column without declared bounds (the same as the schema-only mock's)."""
_EPOCH = date(1970, 1, 1)
_NUMPY_RANDOM = threading.Lock()  # mbi samples with numpy's global generator: seed it under a lock


class MockError(VeilError):
    """The synthetic mock cannot be made as asked (bad loss or size, nothing to fit, loss not certified)."""


@dataclass(frozen=True)
class SyntheticMock:
    """Synthetic rows with the catalog's schema, and the privacy loss OpenDP certified for making them."""

    frame: pl.DataFrame
    rho: float
    delta: float
    columns_fitted: tuple[str, ...]
    columns_not_fitted: tuple[str, ...]
    """Columns without public bounds or categories: schema-only values, nothing learned from the data."""


SCALES = (1e-9, 1e15)
"""Where the noise scales are searched: OpenDP's search without bounds takes ~6x as many tries."""


class _MST(dp.mbi.MST):
    """MST (OpenDP 0.16's `dp.mbi.MST.make_marginals`, reworked): 1-way marginals, a spanning tree of 2-way
    marginals chosen by OpenDP's private selection, then those marginals, all in one adaptive composition.

    Two changes, neither to the accounting, which OpenDP's combinators and maps do throughout. The selection
    asks for a billionth less than its share: OpenDP splits it into parts one ulp under an exact share
    that its composition, rounding up, often adds up to more than the whole, so the release fails for most
    budgets once 6 or more edges are selected (opendp/opendp#2789). And noise scales are searched within
    SCALES; use with `oneway="unkeyed"` so that the 1-way marginals are measured here, not in a search
    six times as long."""

    def make_marginals(  # type: ignore[override]
        self, input_domain: Any, input_metric: Any, output_measure: Any, d_in: Any, d_out: float, *,
        marginals: Any, model: Any,
    ) -> dp.Measurement:
        d_oneway = d_out / 2
        d_measure = (d_out - d_oneway) * self.measure_split
        d_select = prior(prior(d_out - d_oneway - d_measure))
        metric = get_associated_metric(output_measure)
        columns = [(c,) for c in input_domain.columns]
        edges = list(itertools.combinations(input_domain.columns, 2))
        t_oneway = make_stable_marginals(input_domain, input_metric, metric, columns)
        t_edges = make_stable_marginals(input_domain, input_metric, metric, edges)
        d_edges = t_edges.map(d_in)

        def noisy(t: dp.Transformation, cliques: list[tuple[str, ...]], d: float) -> dp.Measurement:
            return t >> binary_search_chain(
                lambda s: make_noise_marginals(*t.output_space, output_measure, cliques, scale=s),
                d_in=t.map(d_in), d_out=d, bounds=SCALES, T=float)

        m_oneway = noisy(t_oneway, columns, d_oneway)

        def function(qbl: Any) -> tuple[Any, Any]:
            measured = marginals.add(*qbl(m_oneway))
            fitted = self.estimator(model.domain, measured.flatten(), potentials=model.potentials)
            m_select = _make_mst_select(*t_edges.output_space, output_measure, d_in=d_edges,
                                        d_out=d_select * (1 - 1e-9), edges=edges, model=fitted,
                                        num_selections=self.num_selections)
            selected = qbl(t_edges >> m_select)
            measured = measured.add(*qbl(noisy(t_edges, selected, d_measure)))
            return measured, self.estimator(model.domain, measured.flatten(), potentials=fitted.potentials)

        steps = make_adaptive_composition(input_domain, input_metric, output_measure, d_in=d_in,
                                          d_mids=[d_oneway, d_select, d_measure])
        return steps >> _new_pure_function(function)


@dataclass(frozen=True)
class _Coder:
    """How one column enters the contingency table, and how its bin indices become values again."""

    expr: pl.Expr
    keys: list[Any] | None
    cuts: list[int | float] | None
    decode: Callable[[np.ndarray, pl.Series, np.random.Generator], pl.Series]


def _days(value: date | str) -> int:
    return ((value if isinstance(value, date) else date.fromisoformat(value)) - _EPOCH).days


def _categorical(column: Column, keys: list[Any]) -> _Coder:
    def decode(codes: np.ndarray, labels: pl.Series, rng: np.random.Generator) -> pl.Series:
        values = labels.gather(codes)
        if column.nullable:
            return values
        fill = pl.Series(keys, dtype=labels.dtype).gather(rng.integers(0, len(keys), len(codes)))
        return values.zip_with(values.is_not_null(), fill)  # null key: values outside the set

    return _Coder(pl.col(column.name), keys, None, decode)


def _binned(column: Column, lo: int | float, hi: int | float, integer: bool, expr: pl.Expr) -> _Coder:
    """Equal-width bins over [lo, hi] (left-open cuts, as in OpenDP's `cut`), a null bin below if nullable."""
    if integer:
        if hi - lo + 1 <= EXACT:
            edges = np.arange(lo - 1, hi + 1)
        else:
            edges = np.unique(np.round(np.linspace(lo - 1, hi, BINS + 1))).astype(np.int64)
        low, high = edges[:-1] + 1, edges[1:]  # bin i holds the integers low[i]..high[i]
    else:
        edges = np.linspace(lo, hi, BINS + 1)
        low, high = edges[:-1], edges[1:]
    cuts = [e.item() for e in edges[1:-1]]
    expr = expr.clip(lo, hi)
    if column.nullable:
        sentinel = lo - 1
        expr, cuts = expr.fill_null(sentinel), [sentinel, *cuts]

    def decode(codes: np.ndarray, labels: pl.Series, rng: np.random.Generator) -> pl.Series:
        index = codes - 1 if column.nullable else codes
        safe = np.clip(index, 0, len(low) - 1)
        if integer:
            values = pl.Series(column.name, rng.integers(low[safe], high[safe] + 1))
        else:
            values = pl.Series(column.name, rng.uniform(low[safe], high[safe]))
        return values.scatter(np.flatnonzero(index < 0), None) if column.nullable else values

    return _Coder(expr.alias(column.name), None, cuts, decode)


def _coder(column: Column) -> _Coder | None:
    """The column's public discretization, or None when nothing public bounds it."""
    if column.categories is not None:
        return _categorical(column, list(column.categories))
    if column.dtype == "Boolean":
        return _categorical(column, [False, True])
    if column.dtype == "Date":
        lo, hi = (_days(b) for b in column.bounds or DATES)
        return _binned(column, lo, hi, True, pl.col(column.name).cast(pl.Int32))  # days since 1970, cast back
    if column.is_numeric and column.bounds is not None:
        lo, hi = column.bounds
        if column.is_integer:
            return _binned(column, math.ceil(lo), math.floor(hi), True, pl.col(column.name))
        return _binned(column, float(lo), float(hi), False, pl.col(column.name))
    return None


def _schema_only(column: Column, n: int, rng: np.random.Generator) -> pl.Series:
    """Values for a column nothing public describes: they carry no information about the data."""
    if column.is_integer:
        return pl.Series(column.name, rng.integers(0, 101, n))
    if column.is_numeric:
        return pl.Series(column.name, rng.uniform(0.0, 1.0, n))
    return pl.Series(column.name, [f"{column.name}_{i}" for i in rng.integers(0, 7, n)])


def _unit_ids(dataset: Dataset, n: int, rng: np.random.Generator) -> pl.Series:
    """Made-up patient ids 1, 2, ...: each gets 1 to `max_rows_per_unit` consecutive rows."""
    sizes = rng.integers(1, dataset.max_rows_per_unit + 1, n)
    ids = np.repeat(np.arange(1, n + 1), sizes)[:n]
    if dataset.column(dataset.privacy_unit).dtype == "String":
        return pl.Series(dataset.privacy_unit, [f"mock_{i}" for i in ids])
    return pl.Series(dataset.privacy_unit, ids)


@cache
def _configure_jax() -> None:
    """Private-PGM fits with JAX: small models compile faster than they run, so skip XLA's optimizations."""
    import jax

    jax.config.update("jax_disable_most_optimizations", True)


def _sample(model: Any, rows: int, seed: int | None) -> dict[str, np.ndarray]:
    """Bin indices per column, sampled from the fitted model (seeded: mbi draws from numpy's global RNG)."""
    with _NUMPY_RANDOM:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            return model.synthetic_data(rows, "sample").to_dict()
        finally:
            np.random.set_state(state)


def synthesize_mock(
    dataset: Dataset,
    rho: float,
    rows: int | None = None,
    seed: int | None = None,
    verified_bound: bool = False,
) -> SyntheticMock:
    """DP synthetic rows for `dataset` at zCDP loss at most `rho` (OpenDP's MST, patient-level unit).

    `rows` fixes the size; by default it is the table's DP total, kept between MIN_ROWS and `max_rows`.
    `verified_bound` says the file is known to hold at most `max_rows_per_unit` rows per patient (else
    rows are truncated per patient). `seed` fixes only the sampling from the released table."""
    if not (math.isfinite(rho) and rho > 0):
        raise MockError("bad_loss", f"rho must be a positive number, not {rho}", hint="e.g. rho=0.5")
    if rows is not None and not 1 <= rows <= dataset.max_rows:
        raise MockError("bad_rows", f"rows must be between 1 and {dataset.max_rows}, not {rows}",
                        hint="leave rows unset to use the DP row count")
    coders = {name: coder for name, column in dataset.columns.items()
              if name != dataset.privacy_unit and (coder := _coder(column)) is not None}
    if not coders:
        raise MockError("nothing_to_fit", f"dataset '{dataset.name}' declares no bounds or categories to fit",
                        hint="declare bounds or categories in the catalog, or use the schema-only mock")
    _configure_jax()

    schema = dataset.schema()
    domain = with_margin(dp.domain_of(pl.LazyFrame(schema=schema), infer=True),
                         dp.polars.Margin(by=[], max_length=dataset.max_rows))
    k = dataset.max_rows_per_unit
    frame = _lazyframe_from_domain(domain)
    if verified_bound:
        metric, d_in = dp.unit_of(contributions=k)
    else:  # one identifier per patient, at most k of its rows kept
        metric, d_in = dp.unit_of(contributions=1, identifier=dataset.privacy_unit)
        frame = frame.filter(pl.int_range(pl.len()).shuffle().over(dataset.privacy_unit) < k)
    t_plan = dp.t.make_stable_lazyframe(domain, metric, frame.select([c.expr for c in coders.values()]),
                                        MO="FrameDistance<SymmetricDistance>")
    one_column = dp.mbi.Fixed(queries=[dp.mbi.Count(tuple(coders))])  # MST needs two columns to pair
    algorithm = _MST(oneway="unkeyed") if len(coders) > 1 else one_column
    m_table, _, _ = dp.mbi.make_contingency_table(
        t_plan.output_domain, t_plan.output_metric, dp.zero_concentrated_divergence(), t_plan.map(d_in), rho,
        keys={n: c.keys for n, c in coders.items() if c.keys is not None},
        cuts={n: c.cuts for n, c in coders.items() if c.cuts is not None},
        algorithm=algorithm,
    )
    measurement = t_plan >> m_table
    certified = float(measurement.map(d_in))
    if certified > rho:
        raise MockError("loss_not_certified", f"OpenDP certifies rho={certified}, more than the {rho} asked",
                        hint="nothing was released; report this to the site's maintainers")
    table = measurement(dataset.scan().select(list(dataset.columns)))

    n = rows or min(dataset.max_rows, max(MIN_ROWS, round(float(table.model.total))))
    codes = _sample(table.model, n, seed)
    rng = np.random.default_rng(seed)
    columns = []
    for name, column in dataset.columns.items():
        if name == dataset.privacy_unit:
            columns.append(_unit_ids(dataset, n, rng))
        elif name in coders:
            indices = np.asarray(codes[name], dtype=np.int64)
            columns.append(coders[name].decode(indices, table.keys[name], rng).alias(name))
        else:
            columns.append(_schema_only(column, n, rng))
    out = pl.DataFrame(columns).cast({name: DTYPES[c.dtype] for name, c in dataset.columns.items()})
    return SyntheticMock(
        frame=out,
        rho=certified,
        delta=0.0,
        columns_fitted=tuple(coders),
        columns_not_fitted=tuple(n for n in dataset.columns if n not in coders and n != dataset.privacy_unit),
    )
