"""Combining per-site releases into one multi-center answer, by post-processing only.

Each site adds independent Gaussian noise (zCDP) and reports its scale. A sum of independent
Gaussians is Gaussian, so a combined count or sum is the sum of the sites' raw values, with scale
sqrt(sum of the sites' scales squared), and its interval is OpenDP's accuracy for that scale at the
requested level: exact, with no union bound and no wider than needed. A mean is the combined DP sum
over the combined DP count, each at level 1 - alpha/2 (the pair then holds at 1 - alpha). What is
shown follows the one rule of `veil.query.estimates`.
"""

from __future__ import annotations

import math
from typing import Any

from veil.errors import QueryError
from veil.query import estimates
from veil.wire import Aggregate, Release

Key = tuple[Any, ...]


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


def per_site_accuracy(accuracy: float, aggregates: list[Aggregate], sites: int) -> float:
    """The half-width each of `sites` sites must reach so that the combined counts and sums reach `accuracy`:
    equal Gaussian noises add up to sqrt(sites) times one site's scale, and OpenDP's Gaussian accuracy is
    proportional to the scale (a discrete Gaussian's is within a unit of that)."""
    if any(a.fn not in ("count", "sum") for a in aggregates):
        raise QueryError("accuracy_needs_count_or_sum",
                         "accuracy on a study applies to counts and sums; a mean's interval depends on the sizes "
                         "of its groups", hint="give epsilon for means, or ask for the accuracy of a count or sum")
    return accuracy / math.sqrt(sites)


def _scales(release: Release) -> dict[str, float]:
    """Each statistic's noise scale at this site; only Gaussian noise combines exactly."""
    scales = {}
    for stat in release.statistics:
        if stat.scale is None or "gaussian" not in (stat.distribution or "").lower():
            raise QueryError("not_combinable", f"site {release.site} released '{stat.name}' with "
                             f"{stat.distribution or 'unknown'} noise, which cannot be combined exactly",
                             hint="release it per site instead of on the whole study")
        scales[stat.name] = stat.scale
    return scales


class _Pooled:
    """One group's values from the sites that reported it: raw sums and their combined half-widths."""

    def __init__(self, parts: list[tuple[dict[str, Any], dict[str, float]]]) -> None:
        self.parts = parts  # (raw row, scales) per reporting site

    def total(self, name: str) -> float:
        values: list[float] = [raw[name] for raw, _ in self.parts]  # counts stay integers
        return sum(values)

    def accuracy(self, name: str, alpha: float) -> float:
        from opendp.accuracy import gaussian_scale_to_accuracy  # OpenDP loads on first use, not at start

        scale = math.sqrt(sum(scales[name] ** 2 for _, scales in self.parts))
        return float(gaussian_scale_to_accuracy(scale, alpha))


def combine(releases: dict[str, Release], aggregates: list[Aggregate], group_by: list[str],
            bounds: dict[str, tuple[float, float] | None], confidence: float,
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Combined rows (keys, then estimate/_lower/_upper per statistic), their raw values, and notes."""
    alpha = 1.0 - confidence
    by_key: dict[Key, list[tuple[dict[str, Any], dict[str, float]]]] = {}
    for release in releases.values():
        if len(release.raw) != len(release.rows):
            raise QueryError("not_combinable", f"site {release.site} sent no raw values with its release",
                             hint="the site runs an older Veil; release per site until it is updated")
        scales = _scales(release)
        for values in release.raw:
            by_key.setdefault(tuple(values[k] for k in group_by), []).append((values, scales))
    thresholded = [site for site, r in releases.items() if r.threshold is not None]
    rows, raws = [], []
    for key, parts in sorted(by_key.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        pooled = _Pooled(parts)
        out: dict[str, Any] = dict(zip(group_by, key, strict=True))
        raw: dict[str, Any] = dict(out)
        for agg in aggregates:
            name = agg.name
            if agg.fn == "mean":
                total, count = pooled.total(f"{name}__sum"), pooled.total(f"{name}__count")
                column_bounds = bounds.get(agg.column or "") or (-math.inf, math.inf)
                shown = estimates.ratio(total, count, pooled.accuracy(f"{name}__sum", alpha / 2),
                                        pooled.accuracy(f"{name}__count", alpha / 2), column_bounds)
                raw[name] = total / count if count > 0 else None
            else:
                raw[name] = pooled.total(name)
                shown = estimates.additive(agg.fn, raw[name], pooled.accuracy(name, alpha),
                                           bounds.get(agg.column or ""))
            out[name], out[f"{name}_lower"], out[f"{name}_upper"] = shown.estimate, shown.lower, shown.upper
        if thresholded:
            out["sites_reporting"] = len(parts)
        rows.append(out)
        raws.append(raw)
    notes = [f"exact {confidence:.0%} intervals from the sites' Gaussian noise scales; {estimates.COHERENCE_NOTE}"]
    if thresholded:
        notes.append(f"groups below a site's release threshold are missing from that site's sum "
                     f"(thresholded at: {', '.join(thresholded)}); see sites_reporting")
    return rows, raws, notes
