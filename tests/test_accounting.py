"""The rho-to-epsilon conversion: OpenDP's privacy profile, inverted here, agrees with OpenDP's own search."""

from __future__ import annotations

import math
import random

from veil.query.accounting import _TO_APPROX_DP, epsilon_of, rho_for_epsilon


def test_epsilon_of_is_opendps_conversion_to_the_last_digits_and_never_understates() -> None:
    rng = random.Random(7)
    for _ in range(200):
        rho, delta = 10 ** rng.uniform(-9, 1.5), 10 ** rng.uniform(-12, -3)
        profile = _TO_APPROX_DP.map(math.sqrt(2.0 * rho))
        opendp_epsilon = profile.epsilon(delta)
        ours = epsilon_of(rho, delta)
        assert profile.delta(ours) <= delta  # a valid (epsilon, delta) by OpenDP's own profile
        if opendp_epsilon == 0.0:
            assert ours == 0.0
        else:
            assert abs(ours - opendp_epsilon) <= 1e-10 * opendp_epsilon


def test_rho_for_epsilon_is_the_largest_rho_within_the_epsilon() -> None:
    for epsilon in (0.05, 0.5, 1.0, 3.0, 10.0):
        rho = rho_for_epsilon(epsilon, 1e-6)
        assert epsilon_of(rho, 1e-6) <= epsilon < epsilon_of(rho * (1 + 1e-9), 1e-6)
