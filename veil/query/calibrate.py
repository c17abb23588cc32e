"""Find a noise scale (and a threshold) for a plan, with OpenDP's privacy map as the only judge.

OpenDP's `Context` searches the scale with ~1,000 measurement constructions (0.4-2 s a query).
Here one construction at scale 1 gives the plan's loss there; since every zCDP mechanism OpenDP
uses for these aggregates has a loss proportional to 1/scale^2, that gives a first guess, which
is then *checked by the measurement's own map* and nudged up until OpenDP certifies it.
Certified measurements are kept per (query, loss) by `prepared.py` and re-checked on every use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import opendp.prelude as dp
from opendp.accuracy import summarize_polars_measurement
from opendp.mod import Measurement, OpenDPException

from veil import limits
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


class _Maker:
    """Measurements of one plan at any noise scale (and threshold), and OpenDP's loss for each."""

    def __init__(self, plan: Plan, rho: float | None, delta: float | None) -> None:
        self.plan, self.approximate = plan, bool(delta)
        loss = rho or 0.1  # only the measure's type is used: (approximate) zCDP
        self.measure, _ = dp.loss_of(rho=loss, delta=delta) if delta else dp.loss_of(rho=loss)

    def make(self, scale: float, threshold: int | None = None) -> Measurement:
        """The plan's measurement at `scale`; a thresholded one at `threshold` (NO_THRESHOLD if None)."""
        return dp.m.make_private_lazyframe(
            self.plan.domain, self.plan.metric, self.measure, self.plan.lazyframe, global_scale=scale,
            threshold=(NO_THRESHOLD if threshold is None else threshold) if self.approximate else None)

    def loss(self, m: Measurement) -> tuple[float, float]:
        out = m.map(self.plan.d_in)
        return (float(out[0]), float(out[1])) if self.approximate else (float(out), 0.0)

    def certified(self, scale: float, delta: float | None, min_threshold: int) -> Certified:
        """The measurement at `scale`, with the lowest threshold OpenDP certifies for `delta` (not below
        `min_threshold`) when the groups' keys are private; its loss as OpenDP's map gives it."""
        threshold = None
        if self.approximate and delta:
            threshold = max(min_threshold, int(dp.binary_search(
                lambda t: self._threshold_fits(scale, t, delta), bounds=(0, 2**31 - 1))))
        m = self.make(scale, threshold)
        rho_got, delta_got = self.loss(m)
        return Certified(m, rho_got, delta_got, scale, threshold)

    def _threshold_fits(self, scale: float, threshold: int, delta: float) -> bool:
        """Whether OpenDP certifies `threshold` for `delta`; thresholds it rejects outright do not fit."""
        try:
            return self.loss(self.make(scale, threshold))[1] <= delta
        except OpenDPException:
            return False


def certify(plan: Plan, rho: float, delta: float | None, min_threshold: int = 0) -> Certified:
    """A measurement for `plan` whose certified loss is at most rho (and delta when thresholding).

    A thresholded GROUP BY never releases a group below `min_threshold` (the privacy level's floor);
    a higher threshold than OpenDP needs only lowers delta."""
    maker = _Maker(plan, rho, delta)
    try:
        certified = maker.certified(_find_scale(maker, rho), delta, min_threshold)
    except OpenDPException as exc:
        raise _not_private(exc) from None
    if not fits(certified, plan, rho, delta):  # the map is the judge; a guess it does not certify is never used
        raise QueryError("calibration_failed", "no noise scale could be certified for this loss",
                         hint="try a larger epsilon or a simpler query")
    return certified


def certify_accuracy(plan: Plan, accuracy: float, confidence: float, delta: float | None,
                     min_threshold: int = 0) -> Certified:
    """The cheapest measurement we find for `plan` whose every count and sum has a half-width of at most
    `accuracy` at `confidence`, as OpenDP's accuracy summary states it; its loss is what OpenDP's map gives.

    OpenDP converts the accuracy to each statistic's noise scale (`accuracy_to_*_scale`); the plan's one
    global scale is set so that the least accurate of them gets there, then the summary of the measurement
    itself is the judge. An accuracy cheaper than MIN_RHO is given at MIN_RHO (more accurate than asked)."""
    targets = [p.name for p in plan.parts if p.role == "value" and p.statistic.fn in ("count", "sum")]
    if not targets:
        raise QueryError("accuracy_needs_count_or_sum",
                         "accuracy applies to the counts and sums of a query, and this one has none",
                         hint="give epsilon for means and quantiles (their intervals depend on the group sizes), "
                              "or add COUNT(*) and ask for its accuracy")
    alpha = 1.0 - confidence
    maker = _Maker(plan, None, delta)
    try:
        at_one = summarize_polars_measurement(maker.make(1.0), alpha)
        scales = [float(r["scale"]) for r in at_one.iter_rows(named=True) if r["column"] in targets]
        if max(scales) == 0.0:
            return certify(plan, limits.MIN_RHO, delta, min_threshold)  # nothing noisy to make accurate
        # OpenDP's Gaussian conversion for the first guess (its discrete one takes time in proportion to the
        # accuracy); the summary of the measurement itself then finds the largest scale that reaches it.
        guess = float(dp.accuracy_to_gaussian_scale(float(accuracy), alpha)) / max(scales)
        if maker.loss(maker.make(guess))[0] < limits.MIN_RHO:  # (and OpenDP's summary is slow at such scales)
            return certify(plan, limits.MIN_RHO, delta, min_threshold)

        def reaches(scale: float) -> bool:
            return _widest(maker.make(scale), alpha, targets) <= accuracy

        if not reaches(guess / 4):
            raise QueryError("accuracy_unreachable", f"OpenDP certifies no noise that gives this query's counts and "
                             f"sums a half-width of {accuracy:g}",
                             hint="ask for a half-width of at least 1 (a count's noise is a whole number), or give "
                                  "epsilon")
        scale = float(dp.binary_search(reaches, bounds=(guess / 4, guess * 4), T=float))
        certified = maker.certified(scale, delta, min_threshold)
    except OpenDPException as exc:
        raise _not_private(exc) from None
    return certified


def _widest(m: Measurement, alpha: float, targets: list[str]) -> float:
    """The largest half-width, in OpenDP's summary of `m`, of the statistics named in `targets`."""
    summary = summarize_polars_measurement(m, alpha)
    return max(float(r["accuracy"]) for r in summary.iter_rows(named=True) if r["column"] in targets)


def fits(certified: Certified, plan: Plan, rho: float, delta: float | None) -> bool:
    """Whether OpenDP's map, asked again now, puts the measurement within (rho, delta)."""
    out = certified.measurement.map(plan.d_in)
    got_rho, got_delta = (out[0], out[1]) if isinstance(out, tuple) else (out, 0.0)
    return got_rho <= rho and got_delta <= (delta or 0.0)


def _find_scale(maker: _Maker, rho: float) -> float:
    """Smallest certified scale we can find quickly: guess from scale 1, then step up until it fits."""
    at_one = maker.loss(maker.make(1.0))[0]
    if at_one == 0.0:
        return 0.0  # nothing sensitive is released (e.g. only public keys)
    scale = math.sqrt(at_one / rho)
    for step in range(60):
        if maker.loss(maker.make(scale))[0] <= rho:
            return scale
        scale *= 1.0 + 1e-12 * 4**step
    # The loss is not proportional to 1/scale^2 for this plan: fall back to OpenDP's own search.
    return float(dp.binary_search(lambda s: maker.loss(maker.make(s))[0] <= rho, T=float))
