"""zCDP inside, (epsilon, delta) for people: conversions done by OpenDP's own combinators.

The ledger adds up rho (zero-concentrated DP composes by addition) and the delta spent on
thresholding. People set and read budgets in epsilon at the site's reporting delta; the
conversion is OpenDP's `make_zCDP_to_approxDP`, never a formula of ours.
"""

from __future__ import annotations

import math
from functools import lru_cache

import opendp.prelude as dp

dp.enable_features("contrib")


@lru_cache(maxsize=4096)
def epsilon_of(rho: float, delta: float) -> float:
    """The epsilon that rho-zCDP implies at `delta` (OpenDP's conversion)."""
    if rho <= 0.0:
        return 0.0
    # A unit-scale Gaussian at input distance d has rho = d^2/2, so d = sqrt(2 rho) gives (at least) rho.
    gaussian = dp.m.make_gaussian(dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0)
    d_in = math.sqrt(2.0 * rho)
    while gaussian.map(d_in) < rho:  # float rounding: never understate rho
        d_in = math.nextafter(d_in, math.inf)
    return float(dp.c.make_zCDP_to_approxDP(gaussian).map(d_in).epsilon(delta))


@lru_cache(maxsize=4096)
def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """The largest rho whose OpenDP conversion at `delta` gives at most `epsilon`."""
    lo, hi = 0.0, max(1.0, epsilon)
    while epsilon_of(hi, delta) <= epsilon:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if epsilon_of(mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo
