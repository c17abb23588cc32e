"""zCDP inside, (epsilon, delta) for people: conversions done by OpenDP's own combinators.

The ledger adds up rho (zero-concentrated DP composes by addition) and the delta spent on
thresholding. People set and read budgets in epsilon at the site's reporting delta; the
conversion is OpenDP's `make_zCDP_to_approxDP`, never a formula of ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import opendp.prelude as dp

from veil import limits

dp.enable_features("contrib")


_GAUSSIAN = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
_TO_APPROX_DP = dp.c.make_zCDP_to_approxDP(_GAUSSIAN)


MAX_STEPS = 200
"""No search below takes more steps than this: it can never loop, whatever floating point does."""


@lru_cache(maxsize=4096)
def epsilon_of(rho: float, delta: float) -> float:
    """The epsilon that rho-zCDP implies at `delta`: the least epsilon (to 1e-11 relative, rounded up) at which
    OpenDP's privacy profile of the conversion gives at most `delta`.

    The profile's `delta(epsilon)` is OpenDP's; only its inversion is searched here, from the textbook bound
    eps <= rho + 2 sqrt(rho ln(1/delta)): about ten evaluations of 0.1 ms each (a pure function of its
    arguments: every process gets the same figure) instead of the profile's own
    `epsilon(delta)` search (2.5 ms), which every release paid twice for the grant figures it returns."""
    if rho <= 0.0:
        return 0.0
    # A unit-scale Gaussian at input distance d has rho = d^2/2, so d = sqrt(2 rho) gives (at least) rho.
    d_in = math.sqrt(2.0 * rho)
    for _ in range(64):  # float rounding: never understate rho (one or two steps in practice)
        if _GAUSSIAN.map(d_in) >= rho:
            break
        d_in = math.nextafter(d_in, math.inf)
    else:
        raise ValueError(f"rho {rho!r} cannot be converted")
    profile = _TO_APPROX_DP.map(d_in)
    log_delta = math.log(delta)

    def excess(epsilon: float) -> float:  # > 0 where the profile's delta is under `delta`
        return log_delta - math.log(max(profile.delta(epsilon), 1e-300))

    hi = rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
    for _ in range(MAX_STEPS):
        f_hi = excess(hi)
        if f_hi > 0.0:
            break
        hi *= 2.0
    else:
        raise ValueError(f"rho {rho!r} cannot be converted at delta {delta!r}")
    f_lo = excess(0.0)
    if f_lo > 0.0:
        return 0.0
    return _bracket(excess, 0.0, hi, 1e-11, (f_lo, f_hi))[1]


def _bracket(f: Callable[[float], float], lo: float, hi: float, rel: float,
             known: tuple[float, float] | None = None) -> tuple[float, float]:
    """For an increasing `f` with f(lo) <= 0 < f(hi) (`known`, if the caller has them): a bracket [lo, hi] of its
    root no wider than `rel` * hi.
    Secant steps from the last two points, bisecting where one leaves the bracket; once a step lands on the
    root, a probe just past it closes the bracket. At most MAX_STEPS steps."""
    f_lo, f_hi = known or (f(lo), f(hi))
    x0, f0, x1, f1 = lo, f_lo, hi, f_hi
    for _ in range(MAX_STEPS):
        if hi - lo <= rel * hi:
            break
        x = x1 - f1 * (x1 - x0) / (f1 - f0) if f1 != f0 else (lo + hi) / 2.0
        if not lo < x < hi:
            x = (lo + hi) / 2.0
        fx = f(x)
        if fx <= 0.0:
            lo = x
        else:
            hi = x
        x0, f0, x1, f1 = x1, f1, x, fx
        probe = x + rel * hi / 2.0 if fx <= 0.0 else x - rel * hi / 2.0
        if abs(fx) < 1e-6 and hi - lo > rel * hi and lo < probe < hi:
            if f(probe) <= 0.0:
                lo = probe
            else:
                hi = probe
    return lo, hi


@lru_cache(maxsize=4096)
def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho (to 1e-10 relative) whose OpenDP conversion at `delta` gives at most `epsilon`.

    A root search on OpenDP's conversion (secant steps, see `_bracket`): about ten conversions
    instead of sixty for plain bisection, and never more than MAX_STEPS per phase. The textbook bound
    eps <= rho + 2 sqrt(rho ln(1/delta)) only brackets the search; the answer is always a rho whose
    conversion OpenDP puts at or under epsilon. Below MIN_EPSILON the answer is 0 (nothing to spend), and
    an epsilon above any budget the limits allow is a ValueError."""
    if not math.isfinite(epsilon) or epsilon > 10 * limits.MAX_BUDGET_EPSILON or not 0.0 < delta < 1.0:
        raise ValueError(f"epsilon {epsilon!r} at delta {delta!r} is outside what a budget may be")
    if epsilon < limits.MIN_EPSILON:
        return 0.0
    log_term = math.log(1.0 / delta)
    lo = (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2  # OpenDP's conversion is at least this tight
    for _ in range(MAX_STEPS):
        if epsilon_of(lo, delta) <= epsilon:
            break
        lo /= 2.0
    else:
        return 0.0
    hi = lo * 2.0
    for _ in range(MAX_STEPS):
        if epsilon_of(hi, delta) > epsilon:
            break
        lo, hi = hi, hi * 2.0
    else:
        raise ValueError(f"no rho converts to epsilon {epsilon!r} at delta {delta!r}")
    return _bracket(lambda rho: epsilon_of(rho, delta) - epsilon, lo, hi, 1e-10)[0]
