"""zCDP inside, (epsilon, delta) for people: conversions done by OpenDP's own combinators.

The ledger adds up rho (zero-concentrated DP composes by addition) and the delta spent on
thresholding. People set and read budgets in epsilon at the site's reporting delta; the
conversion is OpenDP's `make_zCDP_to_approxDP`, never a formula of ours.
"""

from __future__ import annotations

import math
from functools import lru_cache

import opendp.prelude as dp

from veil import limits

dp.enable_features("contrib")


_GAUSSIAN = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
_TO_APPROX_DP = dp.c.make_zCDP_to_approxDP(_GAUSSIAN)


@lru_cache(maxsize=4096)
def epsilon_of(rho: float, delta: float) -> float:
    """The epsilon that rho-zCDP implies at `delta` (OpenDP's conversion)."""
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
    return float(_TO_APPROX_DP.map(d_in).epsilon(delta))


MAX_STEPS = 200
"""No search below takes more steps than this: it can never loop, whatever floating point does."""


@lru_cache(maxsize=4096)
def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho (to 1e-10 relative) whose OpenDP conversion at `delta` gives at most `epsilon`.

    A root search on OpenDP's conversion (regula falsi, Illinois variant): about ten conversions
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
    f_lo, f_hi, side = epsilon_of(lo, delta) - epsilon, epsilon_of(hi, delta) - epsilon, 0
    for _ in range(MAX_STEPS):
        if hi - lo <= 1e-10 * hi:
            break
        mid = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        if not lo < mid < hi:
            mid = (lo + hi) / 2.0
        f_mid = epsilon_of(mid, delta) - epsilon
        if f_mid <= 0.0:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2.0
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2.0
            side = 1
    return lo
