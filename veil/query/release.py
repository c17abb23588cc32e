"""Run a certified measurement on rows and shape its output as a release with intervals.

Intervals are post-processing of what OpenDP releases and reports (`summarize`): a count or sum
is estimate +/- OpenDP's accuracy at the stated level; a mean is the DP sum over the DP count,
its interval spanned by the two at level 1 - alpha/2 each (so the pair holds at 1 - alpha).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import polars as pl
from opendp.accuracy import summarize_polars_measurement

from veil.query.calibrate import Certified
from veil.query.plan import Part, Plan
from veil.query.table import Table
from veil.wire import Aggregate, Statistic

QUANTILE_NOTE = "OpenDP gives no interval for quantiles (exponential mechanism over public candidates)"
MEAN_NOTE = "interval from the DP sum and DP count, each at level 1 - alpha/2; clamped to the public bounds"


@dataclass(frozen=True)
class Output:
    """What a release shows: its rows, how each statistic was made, and a digest for the audit log."""

    rows: list[dict[str, Any]]
    statistics: list[Statistic]
    digest: str


def _accuracies(certified: Certified, alpha: float) -> dict[str, dict[str, Any]]:
    table = summarize_polars_measurement(certified.measurement, alpha)
    return {row["column"]: row for row in table.iter_rows(named=True)}


def _plain(value: Any) -> Any:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean_interval(s: float, n: float, a_s: float, a_n: float, bounds: tuple[float, float]) -> tuple[Any, Any, Any]:
    lo_b, hi_b = float(bounds[0]), float(bounds[1])
    estimate = min(max(s / n, lo_b), hi_b) if n > 0 else None
    if n - a_n <= 0:
        return estimate, lo_b, hi_b
    corners = [(s + ds) / (n + dn) for ds in (-a_s, a_s) for dn in (-a_n, a_n)]
    return estimate, max(lo_b, min(corners)), min(hi_b, max(corners))


@dataclass(frozen=True)
class Description:
    """How each statistic of a certified measurement is made and how accurate it is (data-free)."""

    statistics: list[Statistic]
    parts: dict[str, list[Part]]
    accuracy: dict[str, dict[str, Any]]
    accuracy_half: dict[str, dict[str, Any]]


def describe(plan: Plan, certified: Certified, confidence: float) -> Description:
    """OpenDP's summary of the measurement at the requested confidence, per released statistic."""
    alpha = 1.0 - confidence
    acc = _accuracies(certified, alpha)
    has_mean = any(p.role == "sum" for p in plan.parts)
    acc_half = _accuracies(certified, alpha / 2) if has_mean else {}
    by_stat: dict[str, list[Part]] = {}
    for part in plan.parts:
        by_stat.setdefault(part.statistic.name, []).append(part)
    statistics = []
    for name, parts in by_stat.items():
        agg: Aggregate = parts[0].statistic
        row = acc[parts[0].name]
        note = QUANTILE_NOTE if agg.fn in ("median", "quantile") else MEAN_NOTE if agg.fn == "mean" else None
        accuracy = row.get("accuracy") if agg.fn in ("count", "sum") else None
        statistics.append(Statistic(
            name=name, fn=agg.fn, column=agg.column, distribution=row.get("distribution"),
            scale=row.get("scale"), accuracy=accuracy, note=note,
        ))
    return Description(statistics, by_stat, acc, acc_half)


def run(data: pl.LazyFrame, dataset: Table, plan: Plan, certified: Certified, description: Description,
        streaming: bool = False) -> Output:
    """Invoke the measurement on `data` (projected to the plan's columns here); add intervals; digest.

    OpenDP's OnceFrame collects with the in-memory engine. With `streaming` the caller collects the lazy
    result once on the streaming engine instead, which needs OpenDP's "honest-but-curious" feature:
    only the executor, the trusted party that flag speaks of, enables it (`executor/queries.py`).
    The rows are sorted so that their order carries nothing."""
    release = certified.measurement(data.select(plan.columns))
    frame: pl.DataFrame = release.lazy().collect(engine="streaming") if streaming else release.collect()
    if plan.group_by:
        frame = frame.sort(plan.group_by, nulls_last=True)
    rows: list[dict[str, Any]] = []
    for record in frame.iter_rows(named=True):
        out = {key: _plain(record[key]) for key in plan.group_by}
        for stat in description.statistics:
            if stat.fn == "mean":
                bounds = dataset.column(stat.column).bounds  # type: ignore[arg-type]
                s, n = record[f"{stat.name}__sum"], record[f"{stat.name}__count"]
                half = description.accuracy_half
                a_s, a_n = half[f"{stat.name}__sum"]["accuracy"], half[f"{stat.name}__count"]["accuracy"]
                estimate, lower, upper = _mean_interval(float(s), float(n), a_s, a_n, bounds)  # type: ignore[arg-type]
            else:
                estimate = _plain(record[description.parts[stat.name][0].name])
                lower = upper = None
                if stat.accuracy is not None and estimate is not None:
                    lower, upper = estimate - stat.accuracy, estimate + stat.accuracy
                    if stat.fn == "count":
                        lower = max(0.0, lower)
            out[stat.name] = estimate
            out[f"{stat.name}_lower"] = lower
            out[f"{stat.name}_upper"] = upper
        rows.append(out)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    return Output(rows, description.statistics, digest)
