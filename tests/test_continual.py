"""The standing-count mechanism (`veil.query.continual`): certified loss, stated error against simulation,
state that survives a restart without re-noising, the tree against the naive split, refusals.

OpenDP's sampling cannot be seeded, so the statistical checks use enough draws that a correct mechanism
fails them with probability far below 1e-6 (the margins are worked out next to each)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest

from veil.errors import QueryError
from veil.query import continual
from veil.query.accounting import rho_for_epsilon

RHO = rho_for_epsilon(1.0, 1e-6)


def test_certified_rho_is_opendps_map_and_within_budget() -> None:
    for k, levels in ((1, None), (4, None), (52, None), (3, 1), (5, 4)):
        plan = continual.plan_counter(52, k, RHO, levels=levels)
        assert plan.rho == plan.measurement.map(plan.sensitivity)
        assert RHO * (1 - 1e-6) <= plan.rho <= RHO
        assert plan.sensitivity**2 >= continual.sensitivity_squared(52, plan.max_windows, plan.levels)
    again = continual.plan_rerelease(52, 4, RHO)
    d_ins = [math.nextafter(math.sqrt(min(4, n)), math.inf) for n in range(1, 53)]
    assert again.rho == math.fsum(m.map(d) for (m, _), d in zip(again.releases, d_ins))
    assert RHO * (1 - 1e-6) <= again.rho <= RHO


def test_sensitivity_bounds_every_patient_and_is_tight_for_powers_of_2() -> None:
    """Brute force: every set of at most k windows one patient may count in, for horizons up to 9."""
    for horizon in range(1, 10):
        for levels in range(1, continual.full_levels(horizon) + 1):
            nodes = continual.plan_counter(horizon, 1, RHO, levels=levels).nodes
            by_size = [max(sum(sum(n.start <= w < n.end for w in ws) ** 2 for n in nodes)
                           for ws in itertools.combinations(range(horizon), size)) for size in range(1, horizon + 1)]
            for k in range(1, horizon + 1):
                worst, bound = max(by_size[:k]), continual.sensitivity_squared(horizon, k, levels)
                assert worst <= bound
                if k & (k - 1) == 0:  # a power of 2: windows [0, k) reach the bound at every level
                    assert worst == bound
                if k == 1:
                    assert bound == levels


def test_prefix_nodes_tile_the_first_windows() -> None:
    for horizon in range(1, 40):
        for levels in range(1, continual.full_levels(horizon) + 1):
            for length in range(1, horizon + 1):
                nodes = continual.prefix(horizon, levels, length)
                assert [n.start for n in nodes] == [0, *(n.end for n in nodes[:-1])] and nodes[-1].end == length
                if levels == continual.full_levels(horizon):
                    assert len(nodes) <= levels - 1 or length == horizon


def covered(series: continual.Series, counts: np.ndarray) -> tuple[float, float]:
    """Share of window counts and running totals whose error is below the stated half-width."""
    window = np.abs(series.windows - counts) < series.window_accuracy
    total = np.abs(series.totals - counts.cumsum(axis=1)) < series.total_accuracy
    return float(window.mean()), float(total.mean())


@pytest.mark.parametrize("k", [1, 3])
def test_stated_intervals_cover_95_percent(k: int) -> None:
    """4000 runs x 52 weeks. Window counts: 208,000 independent leaves, sd of the share 0.0005, so the
    band 93-97% is 40 sd wide on each side. Running totals: even if the 52 weeks of a run were one draw,
    4000 runs give sd 0.0034 and the band is 5.8 sd (two-sided p < 1e-8)."""
    plan = continual.plan_counter(52, k, RHO)
    counts = np.random.default_rng(1).poisson(30, size=(4000, 52))
    window, total = covered(continual.simulate(plan, counts), counts)
    assert 0.93 <= window <= 0.97 and 0.93 <= total <= 0.97


def test_rerelease_intervals_cover_95_percent() -> None:
    plan = continual.plan_rerelease(8, 2, RHO)
    counts = np.random.default_rng(2).poisson(30, size=(4000, 8))
    window, total = covered(continual.simulate_rerelease(plan, counts), counts)
    assert 0.93 <= window <= 0.97 and 0.93 <= total <= 0.97


def test_tree_beats_the_naive_split_at_52_weeks() -> None:
    """k = 1: the tree's window counts have sd sqrt(7) x that of rho/1 per leaf vs sqrt(52) for the split at
    rho/52 (ratio 0.37); its running totals sum at most 6 nodes vs up to 52 windows (pooled over the weeks,
ratio about 0.12). 1000 runs x 52 weeks
    estimate each RMSE to within about 1%, far inside the margins asserted."""
    counts = np.random.default_rng(3).poisson(40, size=(1000, 52))
    truths = {"windows": counts, "totals": counts.cumsum(axis=1)}
    tree = continual.simulate(continual.plan_counter(52, 1, RHO), counts)
    naive = continual.simulate(continual.plan_split(52, RHO), counts)

    def rmse(series: continual.Series, what: str) -> float:
        return float(np.sqrt(np.mean((getattr(series, what) - truths[what]) ** 2)))

    assert rmse(tree, "windows") < 0.5 * rmse(naive, "windows")
    assert rmse(tree, "totals") < 0.25 * rmse(naive, "totals")


def test_window_released_once_and_state_round_trips() -> None:
    plan = continual.plan_counter(13, 2, RHO)
    state = continual.start(plan)
    firsts = []
    for window in range(6):
        state, released = continual.release_window(plan, state, window, 10 + window)
        firsts.append(released)
    restored = continual.CounterState.from_json(state.to_json())
    assert restored == state
    again, released = continual.release_window(plan, restored, 3, 999)
    assert again == restored and released == firsts[3]
    for window in range(6, 13):
        restored, released = continual.release_window(plan, restored, window, 10 + window)
    assert len(restored.released) == len(plan.nodes) and not restored.pending
    assert all(continual.release_window(plan, restored, w, 0)[1] == r for w, r in enumerate(firsts))
    nodes = continual.prefix(13, plan.levels, 5)  # windows 0..4: the nodes [0, 4) and [4, 5)
    assert firsts[4].total == sum(restored.released[n.key] for n in nodes)
    assert firsts[4].total_accuracy == continual.accuracy(plan.scale, 2, 0.95) > firsts[4].count_accuracy


@pytest.mark.parametrize(("call", "code"), [
    (lambda: continual.plan_counter(0, 1, RHO), "invalid_horizon"),
    (lambda: continual.plan_counter(52, 0, RHO), "invalid_max_windows"),
    (lambda: continual.plan_counter(52, 1, 0.0), "invalid_budget"),
    (lambda: continual.plan_counter(52, 1, RHO, levels=8), "invalid_levels"),
    (lambda: continual.plan_counter(52, 1, RHO, confidence=1.0), "invalid_confidence"),
    (lambda: continual.CounterState.from_json("{}"), "invalid_counter_state"),
])
def test_bad_plans_are_refused_with_a_hint(call: Callable[[], object], code: str) -> None:
    with pytest.raises(QueryError) as err:
        call()
    assert err.value.code == code and err.value.hint


@pytest.mark.parametrize(("window", "count", "code"), [
    (52, 1, "window_out_of_range"), (-1, 1, "window_out_of_range"), (2, 1, "window_not_next"),
    (1, -1, "invalid_count"), (1, 2.5, "invalid_count"),
])
def test_bad_releases_are_refused_with_a_hint(window: int, count: int, code: str) -> None:
    plan = continual.plan_counter(52, 1, RHO)
    state, _ = continual.release_window(plan, continual.start(plan), 0, 5)
    with pytest.raises(QueryError) as err:
        continual.release_window(plan, state, window, count)
    assert err.value.code == code and err.value.hint
    other = continual.plan_counter(52, 2, RHO)
    with pytest.raises(QueryError) as err:
        continual.release_window(other, state, 1, 5)
    assert err.value.code == "counter_state_mismatch" and err.value.hint
