"""Combining per-site releases into one multi-center answer, by post-processing only.

Counts and sums add up; a mean is the summed DP sums over the summed DP counts. Intervals hold
jointly by the union bound: each site is asked for its intervals at level 1 - alpha/m (m = the
number of intervals that feed one combined statistic), so the combined interval holds at 1 - alpha.
"""

from __future__ import annotations

from typing import Any

from veil.errors import QueryError
from veil.wire import Aggregate, Release

Key = tuple[Any, ...]


def site_confidence(confidence: float, sites: int, aggregates: list[Aggregate]) -> float:
    """The level each site's intervals need so that the combined intervals hold at `confidence`."""
    per_site_intervals = 2 if any(a.fn == "mean" for a in aggregates) else 1
    return 1.0 - (1.0 - confidence) / (sites * per_site_intervals)


def site_aggregates(aggregates: list[Aggregate]) -> list[Aggregate]:
    """What each site releases: a mean becomes its DP sum and DP count (the same cost as a DP mean)."""
    out = []
    for agg in aggregates:
        if agg.fn in ("median", "quantile"):
            raise QueryError("not_combinable", f"{agg.fn} of '{agg.column}' cannot be combined across sites",
                             hint="release it per site (site.datasets[...]) instead of on the whole study")
        if agg.fn == "mean":
            out.append(Aggregate(fn="sum", column=agg.column, alias=f"{agg.name}__sum"))
            out.append(Aggregate(fn="count", column=agg.column, alias=f"{agg.name}__count"))
        else:
            out.append(agg)
    return out


def _interval(rows: list[dict[str, Any]], name: str) -> tuple[float, float, float]:
    return (sum(r[name] for r in rows), sum(r[f"{name}_lower"] for r in rows),
            sum(r[f"{name}_upper"] for r in rows))


def _mean(rows: list[dict[str, Any]], name: str, bounds: tuple[float, float] | None) -> tuple[Any, Any, Any]:
    s, s_lo, s_hi = _interval(rows, f"{name}__sum")
    n, n_lo, n_hi = _interval(rows, f"{name}__count")
    lo_b, hi_b = bounds if bounds else (float("-inf"), float("inf"))
    estimate = min(max(s / n, lo_b), hi_b) if n > 0 else None
    if n_lo <= 0:
        return estimate, (lo_b if bounds else None), (hi_b if bounds else None)
    corners = [a / b for a in (s_lo, s_hi) for b in (n_lo, n_hi)]
    return estimate, max(lo_b, min(corners)), min(hi_b, max(corners))


def combine(releases: dict[str, Release], aggregates: list[Aggregate], group_by: list[str],
            bounds: dict[str, tuple[float, float] | None]) -> tuple[list[dict[str, Any]], list[str]]:
    """Combined rows (keys, then estimate/_lower/_upper per statistic) and notes for the reader."""
    by_key: dict[Key, list[dict[str, Any]]] = {}
    for release in releases.values():
        for row in release.rows:
            by_key.setdefault(tuple(row[k] for k in group_by), []).append(row)
    notes = []
    thresholded = [site for site, r in releases.items() if r.threshold is not None]
    rows = []
    for key, site_rows in sorted(by_key.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        out: dict[str, Any] = dict(zip(group_by, key, strict=True))
        for agg in aggregates:
            name = agg.name
            if agg.fn == "mean":
                out[name], out[f"{name}_lower"], out[f"{name}_upper"] = _mean(site_rows, name, bounds.get(agg.column))
            else:
                out[name], out[f"{name}_lower"], out[f"{name}_upper"] = _interval(site_rows, name)
        if thresholded:
            out["sites_reporting"] = len(site_rows)
        rows.append(out)
    if thresholded:
        notes.append(f"groups below a site's release threshold are missing from that site's sum "
                     f"(thresholded at: {', '.join(thresholded)}); see sites_reporting")
    return rows, notes
