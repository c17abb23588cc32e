"""Find a noise scale (and a threshold) for a plan, with OpenDP's privacy map as the only judge.

OpenDP's `Context` searches the scale with ~1,000 measurement constructions (0.4-2 s a query).
Here one construction at scale 1 gives the plan's loss there; since every zCDP mechanism OpenDP
uses for these aggregates has a loss proportional to 1/scale^2, that gives a first guess, which
is then *checked by the measurement's own map* and nudged up until OpenDP certifies it.
Certified measurements are kept per (query, loss) by `prepared.py` and re-checked on every use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import opendp.prelude as dp
from opendp.mod import Measurement, OpenDPException

from veil.errors import QueryError
from veil.query.plan import Plan

NO_THRESHOLD = 2**32 - 1


@dataclass(frozen=True)
class Certified:
    """A measurement and the loss OpenDP's map certifies for it: what the ledger charges."""

    measurement: Measurement
    rho: float
    delta: float
    scale: float
    threshold: int | None


def _not_private(exc: OpenDPException) -> QueryError:
    message = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else repr(exc)
    return QueryError(
        "not_provably_private",
        f"OpenDP cannot prove this query differentially private: {message}",
        hint="use aggregates of bounded columns, filters and GROUP BY on declared columns",
    )


def certify(plan: Plan, rho: float, delta: float | None, min_threshold: int = 0) -> Certified:
    """A measurement for `plan` whose certified loss is at most rho (and delta when thresholding).

    A thresholded GROUP BY never releases a group below `min_threshold` (the privacy level's floor);
    a higher threshold than OpenDP needs only lowers delta."""
    measure, _ = dp.loss_of(rho=rho, delta=delta) if delta else dp.loss_of(rho=rho)
    approximate = bool(delta)

    def make(scale: float, threshold: int | None) -> Measurement:
        return dp.m.make_private_lazyframe(
            plan.domain, plan.metric, measure, plan.lazyframe,
            global_scale=scale, threshold=threshold if approximate else None,
        )

    def loss(m: Measurement) -> tuple[float, float]:
        out = m.map(plan.d_in)
        return (float(out[0]), float(out[1])) if approximate else (float(out), 0.0)

    try:
        scale = _find_scale(lambda s: make(s, NO_THRESHOLD if approximate else None), loss, rho)
        threshold = None
        if approximate:
            threshold = max(min_threshold, int(dp.binary_search(
                lambda t: _threshold_fits(make, loss, scale, t, delta), bounds=(0, 2**31 - 1))))
        m = make(scale, threshold)
        rho_got, delta_got = loss(m)
        certified = Certified(m, rho_got, delta_got, scale, threshold)
    except OpenDPException as exc:
        raise _not_private(exc) from None
    if not fits(certified, plan, rho, delta):  # the map is the judge; a guess it does not certify is never used
        raise QueryError("calibration_failed", "no noise scale could be certified for this loss",
                         hint="try a larger epsilon or a simpler query")
    return certified


def fits(certified: Certified, plan: Plan, rho: float, delta: float | None) -> bool:
    """Whether OpenDP's map, asked again now, puts the measurement within (rho, delta)."""
    out = certified.measurement.map(plan.d_in)
    got_rho, got_delta = (out[0], out[1]) if isinstance(out, tuple) else (out, 0.0)
    return got_rho <= rho and got_delta <= (delta or 0.0)


def _threshold_fits(make: Callable[[float, int | None], Measurement], loss: Callable[[Any], tuple[float, float]],
                    scale: float, threshold: int, delta: float) -> bool:
    """Whether OpenDP certifies `threshold` for `delta`; thresholds it rejects outright do not fit."""
    try:
        return loss(make(scale, threshold))[1] <= delta
    except OpenDPException:
        return False


def _find_scale(make: Callable[[float], Measurement], loss: Callable[[Any], tuple[float, float]], rho: float) -> float:
    """Smallest certified scale we can find quickly: guess from scale 1, then step up until it fits."""
    at_one = loss(make(1.0))[0]
    if at_one == 0.0:
        return 0.0  # nothing sensitive is released (e.g. only public keys)
    scale = math.sqrt(at_one / rho)
    for step in range(60):
        if loss(make(scale))[0] <= rho:
            return scale
        scale *= 1.0 + 1e-12 * 4**step
    # The loss is not proportional to 1/scale^2 for this plan: fall back to OpenDP's own search.
    return float(dp.binary_search(lambda s: loss(make(s))[0] <= rho, T=float))
