"""What a release shows for one statistic: one rule, at a site and when sites are combined.

The rule (also in each statistic's `note`): an estimate lies inside its interval, and both lie inside
the statistic's public range. A count is never below 0; a sum is never below 0 when its column's
public bounds are >= 0 (nor above 0 when they are <= 0); a mean lies within its column's bounds. The
interval is OpenDP's (raw value +/- accuracy) cut to that range, and the estimate is the raw noisy
value moved into the interval. The raw values stay available (`Release.raw`): they are unbiased, so
sums over groups or sites add the raw values, never the shown estimates.

A mean whose interval covers at least half of its column's public range says little more than the
bounds do (a small or empty group): it is shown as not informative (no estimate, that interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COHERENCE_NOTE = ("estimate moved into its interval and the public range (a count is never negative); "
                  "raw noisy values in .raw")
UNINFORMATIVE_SHARE = 0.5
"""A mean interval at least this share of its column's public range is shown as not informative."""

Bounds = tuple[float, float]


@dataclass(frozen=True)
class Shown:
    """One statistic of one row as released: estimate (None: not informative) and interval."""

    estimate: float | None
    lower: float | None
    upper: float | None


def public_range(fn: str, bounds: Bounds | None) -> Bounds:
    """The values a count or sum can take, whatever the data: from the statistic and its column's bounds."""
    if fn == "count":
        return 0.0, math.inf
    if fn == "sum" and bounds is not None:
        return (0.0 if bounds[0] >= 0 else -math.inf), (0.0 if bounds[1] <= 0 else math.inf)
    return -math.inf, math.inf


def _clamp(value: float, lo: float, hi: float) -> float:
    return min(max(value, lo), hi)


def additive(fn: str, raw: float | None, accuracy: float | None, bounds: Bounds | None) -> Shown:
    """A count or sum: OpenDP's raw value and accuracy (half-width), made coherent with the public range."""
    if raw is None:
        return Shown(None, None, None)
    lo, hi = public_range(fn, bounds)
    if accuracy is None:
        return Shown(_clamp(raw, lo, hi), None, None)
    lower, upper = _clamp(raw - accuracy, lo, hi), _clamp(raw + accuracy, lo, hi)
    estimate = _clamp(raw, lower, upper)
    return Shown(type(raw)(estimate) if isinstance(raw, int) else estimate, lower, upper)


def ratio(total: float, count: float, total_accuracy: float, count_accuracy: float, bounds: Bounds) -> Shown:
    """A mean from a DP sum and a DP count with their half-widths (each at level 1 - alpha/2, so the pair
    holds at 1 - alpha): the interval spans the ratios of the two intervals' corners, within the bounds."""
    lo_b, hi_b = float(bounds[0]), float(bounds[1])
    if count - count_accuracy <= 0:
        lower, upper = lo_b, hi_b
    else:
        corners = [(total + ds) / (count + dn) for ds in (-total_accuracy, total_accuracy)
                   for dn in (-count_accuracy, count_accuracy)]
        lower, upper = _clamp(min(corners), lo_b, hi_b), _clamp(max(corners), lo_b, hi_b)
    if count <= 0 or upper - lower >= UNINFORMATIVE_SHARE * (hi_b - lo_b):
        return Shown(None, lower, upper)
    return Shown(_clamp(total / count, lower, upper), lower, upper)


def cell_text(row: Mapping[str, Any], name: str, digits: int = 2) -> str:
    """One statistic of a release row as text: 'estimate [lower, upper]', 'not informative [lower, upper]'."""
    estimate, lower, upper = row.get(name), row.get(f"{name}_lower"), row.get(f"{name}_upper")
    interval = f" [{lower:,.{digits}f}, {upper:,.{digits}f}]" if lower is not None and upper is not None else ""
    if estimate is None:
        return f"not informative{interval}" if interval else "n/a"
    return (f"{estimate:,.{digits}f}" if isinstance(estimate, float) else f"{estimate:,}") + interval
