"""What a release shows: the coherence rule on edge cases, and the coverage of combined intervals,
checked by simulation: noise drawn by OpenDP's own Gaussian mechanisms (from the OS's randomness, so
the bounds allow for chance: each test fails by chance well under once in 10,000 runs)."""

from __future__ import annotations

import math

import opendp.prelude as dp
import pytest

from veil.kernel.combine import combine
from veil.query import estimates
from veil.wire import Aggregate, Cost, Release, Statistic

dp.enable_features("contrib")


# ---------------------------------------------------------------- the rule, on edge cases


@pytest.mark.parametrize("raw", [-1313, -8, -1, 0, 3, 500])
def test_a_count_lies_inside_its_interval_and_is_never_negative(raw: int) -> None:
    shown = estimates.additive("count", raw, 42.0, None)
    assert shown.lower is not None and shown.upper is not None and shown.estimate is not None
    assert 0 <= shown.lower <= shown.estimate <= shown.upper
    assert isinstance(shown.estimate, int)
    if raw + 42 < 0:  # far below zero: the interval collapses to the only value it can still cover
        assert shown.lower == shown.upper == shown.estimate == 0


def test_a_sum_keeps_the_sign_its_columns_bounds_allow() -> None:
    assert estimates.additive("sum", -50.0, 20.0, (0.0, 10.0)) == estimates.Shown(0.0, 0.0, 0.0)
    assert estimates.additive("sum", 50.0, 20.0, (-10.0, -1.0)) == estimates.Shown(0.0, 0.0, 0.0)
    assert estimates.additive("sum", -50.0, 20.0, (-10.0, 10.0)) == estimates.Shown(-50.0, -70.0, -30.0)


def test_a_mean_of_a_tiny_group_is_not_informative_instead_of_a_bound() -> None:
    # a DP count of 3 +/- 40: the group may be empty; its mean says nothing the bounds do not
    shown = estimates.ratio(total=54.0, count=3.0, total_accuracy=3000.0, count_accuracy=40.0, bounds=(18.0, 100.0))
    assert shown.estimate is None and (shown.lower, shown.upper) == (18.0, 100.0)
    # an empty group (negative DP count)
    assert estimates.ratio(-40.0, -2.0, 300.0, 4.0, (0.0, 300.0)).estimate is None


def test_a_mean_of_a_large_group_lies_inside_its_interval_within_the_bounds() -> None:
    shown = estimates.ratio(total=62_800.0, count=1_000.0, total_accuracy=900.0, count_accuracy=12.0,
                            bounds=(18.0, 100.0))
    assert shown.estimate is not None and shown.lower is not None and shown.upper is not None
    assert 18.0 <= shown.lower <= shown.estimate <= shown.upper <= 100.0
    assert shown.upper - shown.lower < 5.0
    # every corner above the upper bound: a point interval at the bound, the estimate on it
    high = estimates.ratio(total=150_000.0, count=1_000.0, total_accuracy=10.0, count_accuracy=1.0, bounds=(0, 100))
    assert high == estimates.Shown(100.0, 100.0, 100.0)


# ---------------------------------------------------------------- combined intervals, by simulation

SCALES = {"north": 9.0, "central": 14.0, "valley": 5.0}
TRUE = {"north": (130, 9_100.0), "central": (410, 26_650.0), "valley": (55, 3_520.0)}  # (count, sum of age)
DRAWS = 2000


def _noise(scale: float, integer: bool) -> dp.Measurement:
    domain = dp.atom_domain(T=int) if integer else dp.atom_domain(T=float, nan=False)
    metric = dp.absolute_distance(T=int if integer else float)
    return dp.m.make_gaussian(domain, metric, scale)


def _release(site: str, count: int, total: float) -> Release:
    statistics = [
        Statistic(name="n", fn="count", column=None, distribution="Integer Gaussian", scale=SCALES[site],
                  accuracy=None),
        Statistic(name="age__sum", fn="sum", column="age", distribution="Float Gaussian", scale=10 * SCALES[site],
                  accuracy=None),
        Statistic(name="age__count", fn="count", column="age", distribution="Integer Gaussian",
                  scale=SCALES[site], accuracy=None),
    ]
    raw = {"n": count, "age__sum": total, "age__count": count}
    return Release(site=site, dataset="patients", project="p", query="q", confidence=0.95, group_by=[],
                   statistics=statistics, rows=[dict(raw)], raw=[raw],
                   cost=Cost(rho=0.1, delta=0.0, epsilon=1.0, epsilon_delta=1e-7), receipt="r", released_at="t")


def _draws() -> list[dict[str, Release]]:
    counts = {s: _noise(SCALES[s], True) for s in SCALES}
    sums = {s: _noise(10 * SCALES[s], False) for s in SCALES}
    return [{s: _release(s, counts[s](TRUE[s][0]), sums[s](TRUE[s][1])) for s in SCALES} for _ in range(DRAWS)]


@pytest.fixture(scope="module")
def combined() -> list[dict[str, object]]:
    aggregates = [Aggregate(fn="count", alias="n"), Aggregate(fn="mean", column="age", alias="age")]
    out = []
    for releases in _draws():
        rows, raw, _ = combine(releases, aggregates, [], {"age": (0.0, 120.0)}, 0.95)
        out.append({**rows[0], "raw_n": raw[0]["n"]})
    return out


def test_a_combined_count_covers_at_the_nominal_rate_and_no_more(combined: list[dict[str, float]]) -> None:
    truth = sum(c for c, _ in TRUE.values())
    covered = sum(r["n_lower"] <= truth <= r["n_upper"] for r in combined) / DRAWS
    # 95% nominal: with 2,000 draws one sd is 0.49 points, so this is +/-4 sd; a union bound over three
    # sites (each at 98.3%, widths added) would cover about 99.9%
    assert 0.93 <= covered <= 0.97, covered
    width = sum(r["n_upper"] - r["n_lower"] for r in combined) / DRAWS
    exact = 2 * 1.96 * math.sqrt(sum(s * s for s in SCALES.values()))
    assert width == pytest.approx(exact, rel=0.02)
    assert sum(r["raw_n"] for r in combined) / DRAWS == pytest.approx(truth, abs=3 * 18 / math.sqrt(DRAWS) + 1)


def test_a_combined_mean_covers_at_least_the_nominal_rate(combined: list[dict[str, float]]) -> None:
    truth = sum(s for _, s in TRUE.values()) / sum(c for c, _ in TRUE.values())
    covered = sum(r["age_lower"] <= truth <= r["age_upper"] for r in combined) / DRAWS
    assert covered >= 0.93, covered
    assert all(r["age_lower"] <= r["age"] <= r["age_upper"] for r in combined)
