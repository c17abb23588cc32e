"""Standing weekly counts: a count released once per window over a fixed public horizon, for the same
patients, with the privacy loss of the whole horizon certified (and charged) once, up front.

The mechanism: the binary tree (dyadic intervals). Window t of a horizon of T windows belongs to one
node per level h = 0 .. ceil(log2 T), the node covering windows [j 2^h, min((j+1) 2^h, T)) with
j = t >> h. Each node's true count gets independent discrete Gaussian noise from ONE OpenDP measurement,
`dp.m.make_gaussian` on integer vectors under the L2 distance, the same measurement for every node. A node
is noised once, when its last window closes. A window's count is its leaf (one node); the running total
of windows 0..t is the sum of the at most ceil(log2 T) nodes of t+1's binary decomposition.

Sensitivity (one patient added or removed; `max_windows` = k is public: a patient counts in at most k
windows, at most 1 in each). Every node's count moves in the same direction by at most its number of the
patient's windows. At level h the node counts move by c_j >= 0 with sum c_j <= k and c_j <= the node's
width, so sum c_j^2 is at most what filling the widest nodes first gives (the sum of squares is convex):
k min(2^h, k) when the widths are 2^h. The squared L2 change of the whole node vector is at most the sum
of these over the levels (`sensitivity_squared`, exact integers; tests/test_continual.py checks it against
every set of windows for small horizons). It is `levels` for k = 1, but for larger k it is more than
k * levels: sqrt(k * levels) would UNDERSTATE it (two of one patient's windows under one node move that
node by 2, a squared change of 4). OpenDP's map of the measurement at that L2 distance is the loss,
`CounterPlan.rho`, with the scale found by `dp.binary_search_param` for a target rho over the whole horizon.

Why noising nodes one by one costs what the whole vector does: the measurement adds independent noise
of one scale to each coordinate, so the released nodes of a horizon have exactly the distribution of one
invocation on the whole node vector, the mechanism OpenDP certifies. This holds for a count series fixed
in advance (the patients' windows do not depend on what was released), the usual continual-release setting.

Stated error. A node's interval is OpenDP's `discrete_gaussian_scale_to_accuracy(scale, alpha)`:
P(|error| >= accuracy) <= alpha (integer errors; covered means |error| < accuracy). A running total sums
m independent nodes; its interval is the same helper at scale sqrt(m) * scale. That is exact for m = 1;
for m > 1 the sum of independent discrete Gaussians of scale >= 1 is within a negligible statistical
distance of the discrete Gaussian of the summed variance (Canonne, Kamath and Steinke 2020), so it is
exact up to that distance (tests/test_continual.py checks the coverage by simulation).

State. A site persists `CounterState` (`to_json`): the plan's fingerprint, the number of windows closed,
the released noisy nodes (public) and the true partial counts of the nodes still open (PRIVATE: the
site's data, kept with its ledger, never shown). `release_window` is pure: it returns a new state and the
release; a window already closed returns its stored release, and no node is ever noised twice.

What it is good for (bench/continual.py: T = 52, epsilon 1 at delta 1e-6, RMSE pooled over the weeks).
Against one-off weekly queries from a budget split over the weeks (rho / 52 each), at k = 1 the tree cuts
the error of weekly counts to 0.37x and of running totals to 0.12x. But the public bound k also lets the
windows share the budget in parallel (each window alone at rho / k, `plan_split(..., max_windows=k)`,
a tree of one level), and that beats the tree on weekly counts at every k (RMSE 4.6 vs 12 at k = 1: a
window's count is one leaf, noised at the tree's scale) and on running totals from k = 2 on at T = 52. The
tree wins on running totals at small k (19 vs 24 at k = 1; 12 vs 35 at week 52), more so over longer
horizons (at T = 520 and k = 1, 29 vs 73 with 8 levels), and it does best with fewer levels than the
full tree (`levels`). All these errors are stated before any data is read, so a service can choose.

Baselines, for comparison (bench/continual.py), also from OpenDP: `plan_split` releases each window once
on its own (a tree of one level), and `plan_rerelease` re-releases the whole series so far every window.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import opendp.prelude as dp
from opendp.accuracy import discrete_gaussian_scale_to_accuracy, gaussian_scale_to_accuracy
from opendp.mod import Measurement

from veil.errors import QueryError

dp.enable_features("contrib")

MAX_HORIZON = 10_000
"""The most windows a standing count may have (about 190 years of weeks)."""

_COUNTS = dp.vector_domain(dp.atom_domain(T="i64"))
_L2 = dp.l2_distance(T=float)


@dataclass(frozen=True)
class Node:
    """A dyadic interval of windows [start, end) at `level` (width 2^level, the last one cut at the horizon)."""

    level: int
    index: int
    start: int
    end: int

    @property
    def key(self) -> str:
        return f"{self.level}/{self.index}"


def node(horizon: int, level: int, index: int) -> Node:
    """The `index`-th node of `level` in a horizon of `horizon` windows."""
    return Node(level, index, index << level, min((index + 1) << level, horizon))


def full_levels(horizon: int) -> int:
    """ceil(log2 horizon) + 1: the levels of a tree whose top node covers the whole horizon."""
    return (horizon - 1).bit_length() + 1


def sensitivity_squared(horizon: int, max_windows: int, levels: int) -> int:
    """The most the squared L2 norm of the node vector moves when one patient, counted at most once in
    each of at most `max_windows` windows, is added or removed (per level: fill the widest nodes first)."""
    total = 0
    for level in range(levels):
        nodes = (node(horizon, level, j) for j in range(_nodes_at(horizon, level)))
        widths = sorted((n.end - n.start for n in nodes), reverse=True)
        left = max_windows
        for width in widths:
            take = min(width, left)
            total, left = total + take * take, left - take
    return total


def _nodes_at(horizon: int, level: int) -> int:
    return -(-horizon // (1 << level))


@functools.lru_cache(maxsize=512)
def _calibrated(sens_squared: int, rho: float) -> tuple[Measurement, float, float, float]:
    """(measurement, L2 distance, scale, OpenDP's loss at that distance) for the smallest scale OpenDP's
    own search certifies within `rho` at L2 distance sqrt(sens_squared), rounded up."""
    d_in = math.nextafter(math.sqrt(sens_squared), math.inf)

    def make(scale: float) -> Measurement:
        return dp.m.make_gaussian(_COUNTS, _L2, scale=scale)

    scale = float(dp.binary_search_param(make, d_in=d_in, d_out=rho, T=float))
    measurement = make(scale)
    certified = float(measurement.map(d_in))
    if certified > rho:  # the map is the judge
        raise QueryError("calibration_failed", f"OpenDP certifies no noise scale within rho {rho:g}",
                         hint="give a larger privacy budget for the standing count")
    return measurement, d_in, scale, certified


@dataclass(frozen=True)
class CounterPlan:
    """A standing count's public plan: its nodes, OpenDP measurement and certified whole-horizon loss."""

    horizon: int
    max_windows: int
    """k: the most windows one patient counts in (capped at the horizon)."""
    levels: int
    sensitivity: float
    """The L2 distance the loss is certified at (sqrt of `sensitivity_squared`, rounded up)."""
    scale: float
    rho: float
    """OpenDP's map of the measurement at `sensitivity`: the whole horizon's loss, charged once."""
    confidence: float
    measurement: Measurement = field(repr=False, compare=False)
    nodes: tuple[Node, ...] = field(repr=False, compare=False)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a state must match to be resumed with this plan."""
        return {"horizon": self.horizon, "max_windows": self.max_windows, "levels": self.levels,
                "scale": self.scale}


def plan_counter(horizon: int, max_windows: int, rho: float, *, levels: int | None = None,
                 confidence: float = 0.95) -> CounterPlan:
    """Plan a standing count of `horizon` windows (binary tree of `levels`, all by default) whose whole
    horizon costs at most `rho` (zCDP), as OpenDP's map certifies it. Data-free."""
    k = _checked(horizon, max_windows, rho, confidence)
    top = full_levels(horizon)
    levels = top if levels is None else levels
    if not (isinstance(levels, int) and 1 <= levels <= top):
        raise QueryError("invalid_levels", f"a tree over {horizon} windows has 1 to {top} levels, got {levels!r}",
                         hint=f"leave levels unset for the full tree ({top}), or 1 for windows released alone")
    measurement, d_in, scale, certified = _calibrated(sensitivity_squared(horizon, k, levels), float(rho))
    nodes = tuple(node(horizon, h, j) for h in range(levels) for j in range(_nodes_at(horizon, h)))
    return CounterPlan(horizon, k, levels, d_in, scale, certified, confidence, measurement, nodes)


def plan_split(horizon: int, rho: float, max_windows: int | None = None, confidence: float = 0.95) -> CounterPlan:
    """Baseline: each window's count released once, alone (a tree of one level). With `max_windows`
    unset a patient may count in every window and each window gets rho / horizon (a one-off weekly query
    from a split budget); with the public bound k it gets rho / k."""
    return plan_counter(horizon, horizon if max_windows is None else max_windows, rho, levels=1,
                        confidence=confidence)


def _checked(horizon: int, max_windows: int, rho: float, confidence: float) -> int:
    """Refuse a plan's bad inputs; the per-patient bound k, capped at the horizon."""
    _check_positive_int("horizon", horizon, "give the number of windows of the standing count (e.g. 52 weeks)")
    if horizon > MAX_HORIZON:
        raise QueryError("invalid_horizon", f"a horizon of {horizon} windows is more than {MAX_HORIZON}",
                         hint="use longer windows, or plan a new standing count when this one ends")
    _check_positive_int("max_windows", max_windows, "give the most windows one patient can count in (1 or more)")
    if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise QueryError("invalid_budget", f"rho must be a positive number, got {rho!r}",
                         hint="convert the epsilon of the standing count with accounting.rho_for_epsilon")
    if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
        raise QueryError("invalid_confidence", f"confidence must be strictly between 0 and 1, got {confidence!r}",
                         hint="give e.g. 0.95")
    return min(max_windows, horizon)


def _check_positive_int(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QueryError(f"invalid_{name}", f"{name} must be a whole number of at least 1, got {value!r}", hint=hint)


def prefix(horizon: int, levels: int, length: int) -> list[Node]:
    """The fewest nodes whose counts sum to the first `length` windows, highest levels first (below the
    top level, each level at most once: the binary decomposition of `length`)."""
    nodes, start = [], 0
    for level in reversed(range(levels)):
        while start < length and node(horizon, level, start >> level).end <= length:
            nodes.append(node(horizon, level, start >> level))
            start = nodes[-1].end
    return nodes


@functools.lru_cache(maxsize=4096)
def accuracy(scale: float, nodes: int, confidence: float) -> float:
    """Half-width of the interval of a sum of `nodes` noisy nodes: OpenDP's discrete Gaussian accuracy
    at scale sqrt(nodes) * scale (P(|error| >= it) <= 1 - confidence)."""
    return float(discrete_gaussian_scale_to_accuracy(math.sqrt(nodes) * scale, 1.0 - confidence))


@dataclass(frozen=True)
class Released:
    """One window's release: its DP count and the DP running total up to it, with their intervals'
    half-widths at the plan's confidence (the error is below them with that probability)."""

    window: int
    count: int
    count_accuracy: float
    total: int
    total_accuracy: float
    confidence: float


@dataclass(frozen=True)
class CounterState:
    """What a site persists for a standing count. `released` is public; `pending` (true partial counts of
    the open nodes) is the site's private data."""

    plan: dict[str, Any]
    windows: int = 0
    released: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"plan": self.plan, "windows": self.windows, "released": self.released,
                           "pending": self.pending}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CounterState:
        try:
            data = json.loads(text)
            return cls(dict(data["plan"]), int(data["windows"]),
                       {str(k): int(v) for k, v in data["released"].items()},
                       {str(k): int(v) for k, v in data["pending"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QueryError("invalid_counter_state", f"the standing count's saved state cannot be read: {exc}",
                             hint="restore the state file from the site's backup; never start it afresh, "
                                  "that would noise released windows again") from None


def start(plan: CounterPlan) -> CounterState:
    """The state of a standing count before its first window closes."""
    return CounterState(plan.fingerprint)


def release_window(plan: CounterPlan, state: CounterState, window: int,
                   true_count: int) -> tuple[CounterState, Released]:
    """Close `window` with its true count: noise the nodes it completes (one OpenDP invocation) and
    release its count and running total. A window already closed returns its stored release, unchanged."""
    if state.plan != plan.fingerprint:
        raise QueryError("counter_state_mismatch", "this state belongs to another standing count plan",
                         hint="resume with the plan the state was started with (same horizon, bound, levels, budget)")
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < plan.horizon:
        raise QueryError("window_out_of_range", f"window {window!r} is not in 0..{plan.horizon - 1}",
                         hint="windows are numbered from 0 within the standing count's horizon")
    if window < state.windows:
        return state, _released(plan, state.released, window)
    if window > state.windows:
        raise QueryError("window_not_next", f"window {window} cannot close before window {state.windows}",
                         hint=f"release window {state.windows} first: windows close in order")
    if isinstance(true_count, bool) or not isinstance(true_count, int) or true_count < 0:
        raise QueryError("invalid_count", f"a window's count is a whole number of at least 0, got {true_count!r}",
                         hint="count the patients seen in the window")
    pending, closing = dict(state.pending), []
    for level in range(plan.levels):
        current = node(plan.horizon, level, window >> level)
        pending[current.key] = pending.get(current.key, 0) + true_count
        if current.end == window + 1:
            closing.append(current)
    noisy = plan.measurement([pending.pop(n.key) for n in closing])
    released = {**state.released, **{n.key: int(v) for n, v in zip(closing, noisy)}}
    new = replace(state, windows=window + 1, released=released, pending=pending)
    return new, _released(plan, released, window)


def _released(plan: CounterPlan, released: dict[str, int], window: int) -> Released:
    """Post-processing of the released nodes: window `window`'s leaf and its running total."""
    nodes = prefix(plan.horizon, plan.levels, window + 1)
    return Released(window, released[node(plan.horizon, 0, window).key], accuracy(plan.scale, 1, plan.confidence),
                    sum(released[n.key] for n in nodes), accuracy(plan.scale, len(nodes), plan.confidence),
                    plan.confidence)


@dataclass(frozen=True)
class Series:
    """Many simulated runs of a mechanism: DP window counts and running totals (runs x windows), as
    released when each window closed, and the stated half-widths per window."""

    windows: np.ndarray
    totals: np.ndarray
    window_accuracy: np.ndarray
    total_accuracy: np.ndarray


def simulate(plan: CounterPlan, counts: np.ndarray) -> Series:
    """Benchmarks and tests: `counts` (runs x horizon true window counts) through the plan's nodes, its
    measurement (one invocation for all runs) and the post-processing `release_window` uses."""
    runs, horizon = counts.shape
    position = {n.key: i for i, n in enumerate(plan.nodes)}
    sums = np.stack([counts[:, n.start:n.end].sum(axis=1) for n in plan.nodes], axis=1)
    noisy = np.asarray(plan.measurement(sums.ravel().tolist()), dtype=np.int64).reshape(sums.shape)
    prefixes = [prefix(horizon, plan.levels, t + 1) for t in range(horizon)]
    totals = np.stack([noisy[:, [position[n.key] for n in p]].sum(axis=1) for p in prefixes], axis=1)
    leaves = noisy[:, [position[node(horizon, 0, t).key] for t in range(horizon)]]
    return Series(leaves, totals, np.full(horizon, accuracy(plan.scale, 1, plan.confidence)),
                  np.array([accuracy(plan.scale, len(p), plan.confidence) for p in prefixes]))


@dataclass(frozen=True)
class RereleasePlan:
    """Baseline: at every window, the whole series so far again (one OpenDP vector release at rho / horizon,
    L2 distance sqrt(min(k, windows so far))); each window's estimate is the inverse-variance weighted mean
    of its releases so far."""

    horizon: int
    max_windows: int
    rho: float
    """The sum of the releases' certified losses."""
    confidence: float
    releases: tuple[tuple[Measurement, float], ...] = field(repr=False, compare=False)
    """(measurement, scale) of the release at the close of each window."""


def plan_rerelease(horizon: int, max_windows: int, rho: float, confidence: float = 0.95) -> RereleasePlan:
    """Plan the re-release baseline; its total certified loss is at most `rho`."""
    k = _checked(horizon, max_windows, rho, confidence)
    each = math.nextafter(rho / horizon, 0.0) * (1.0 - 1e-12)  # the float sum over the releases stays <= rho
    releases = [_calibrated(sensitivity_squared(n, min(k, n), 1), each) for n in range(1, horizon + 1)]
    return RereleasePlan(horizon, k, math.fsum(r[3] for r in releases), confidence,
                         tuple((r[0], r[2]) for r in releases))


def simulate_rerelease(plan: RereleasePlan, counts: np.ndarray) -> Series:
    """Benchmarks: `counts` (runs x horizon) through the re-release baseline. Its intervals are OpenDP's
    continuous Gaussian accuracy at the weighted means' standard deviation (a normal approximation)."""
    runs, horizon = counts.shape
    weighted, weights = np.zeros((runs, horizon)), np.zeros(horizon)
    windows, totals = np.zeros((runs, horizon)), np.zeros((runs, horizon))
    window_sd, total_sd = np.zeros(horizon), np.zeros(horizon)
    for n, (measurement, scale) in enumerate(plan.releases, start=1):
        noisy = np.asarray(measurement(counts[:, :n].ravel().tolist()), dtype=np.float64).reshape(runs, n)
        weighted[:, :n] += noisy / scale**2
        weights[:n] += 1.0 / scale**2
        estimates = weighted[:, :n] / weights[:n]
        windows[:, n - 1], totals[:, n - 1] = estimates[:, -1], estimates.sum(axis=1)
        window_sd[n - 1], total_sd[n - 1] = math.sqrt(1.0 / weights[n - 1]), math.sqrt(float(np.sum(1.0 / weights[:n])))
    alpha = 1.0 - plan.confidence
    return Series(windows, totals, np.array([gaussian_scale_to_accuracy(float(s), alpha) for s in window_sd]),
                  np.array([gaussian_scale_to_accuracy(float(s), alpha) for s in total_sd]))
