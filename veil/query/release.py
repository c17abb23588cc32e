"""Run a certified measurement on rows and shape its output as a release with intervals.

Intervals are post-processing of what OpenDP releases and reports (`summarize`): a count or sum
is its raw value +/- OpenDP's accuracy at the stated level; a mean is the DP sum over the DP count,
its interval spanned by the two at level 1 - alpha/2 each (so the pair holds at 1 - alpha). What is
shown follows one rule (`estimates.py`): the estimate inside its interval, both inside the public range.
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

from veil.query import estimates
from veil.query.calibrate import Certified
from veil.query.plan import Part, Plan
from veil.query.table import Table
from veil.wire import Aggregate, Statistic

QUANTILE_NOTE = "OpenDP gives no interval for quantiles (exponential mechanism over public candidates)"
MEAN_NOTE = ("interval from the DP sum and DP count, each at level 1 - alpha/2, within the public bounds; "
             "not informative (no estimate) when it spans half of them or more")


@dataclass(frozen=True)
class Output:
    """What a release shows: its rows, the raw noisy values behind them, how each statistic was made,
    and a digest for the audit log."""

    rows: list[dict[str, Any]]
    raw: list[dict[str, Any]]
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
        note = {"median": QUANTILE_NOTE, "quantile": QUANTILE_NOTE, "mean": MEAN_NOTE}.get(
            agg.fn, estimates.COHERENCE_NOTE)
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
    release = certified.measurement(plan.project(data))
    frame: pl.DataFrame = release.lazy().collect(engine="streaming") if streaming else release.collect()
    if plan.group_by:
        frame = frame.sort(plan.group_by, nulls_last=True)
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for record in frame.iter_rows(named=True):
        out = {key: _plain(record[key]) for key in plan.group_by}
        noisy = dict(out)
        for stat in description.statistics:
            bounds = dataset.column(stat.column).bounds if stat.column else None
            if stat.fn == "mean":
                s, n = float(record[f"{stat.name}__sum"]), float(record[f"{stat.name}__count"])
                half = description.accuracy_half
                shown = estimates.ratio(s, n, half[f"{stat.name}__sum"]["accuracy"],
                                        half[f"{stat.name}__count"]["accuracy"], bounds)  # type: ignore[arg-type]
                noisy[stat.name] = s / n if n > 0 else None
            else:
                value = _plain(record[description.parts[stat.name][0].name])
                shown = (estimates.additive(stat.fn, value, stat.accuracy, bounds)
                         if stat.fn in ("count", "sum") else estimates.Shown(value, None, None))
                noisy[stat.name] = value
            out[stat.name], out[f"{stat.name}_lower"], out[f"{stat.name}_upper"] = (
                shown.estimate, shown.lower, shown.upper)
        rows.append(out)
        raw.append(noisy)
    digest = hashlib.sha256(json.dumps([rows, raw], sort_keys=True, default=str).encode()).hexdigest()
    return Output(rows, raw, description.statistics, digest)
