"""A trained model's DP evaluation on held-out patients: ONE DP sum of per-patient scores, divided by
a held-out size that is public.

The mechanism. Each held-out patient gets a score in public bounds (1/0 for a correct/wrong class, or
the squared error of the scaled label, in [0, 4]). OpenDP releases the sum of the scores with Gaussian
noise at the evaluation's whole rho, for the neighbouring relation "one held-out patient changed"
(`dp.unit_of(changes=1)`: OpenDP's change-one distance, under which a frame's length cannot change).
The accuracy is that sum over the held-out size `m`, and its interval is OpenDP's interval of the sum
(`summarize`, at the release's confidence) over `m`: it covers the true held-out accuracy whenever the
sum's interval covers the true sum. OpenDP calibrates and samples the noise and certifies the loss
(`calibrate.certify`, its map the only judge); nothing here computes a sensitivity or draws noise.

It replaces COUNT(*) and AVG(score) through the query path, which split the rho over three noisy
parts (the count and the mean's DP sum and DP count): one part gets all of it, with no noisy
denominator, so the interval is 2.3 to 3.3 times narrower (bench/evaluation_width.py, bench/README.md):
0.12 wide at 300 held-out patients and epsilon 0.5, where the three parts gave 0.39.

Why `m` is public, and why the held-out rows may be treated as "one changed". The job releases a DP
count of the dataset's rows when it starts (`executor/training.py`, at the same rho; it also sets
DP-SGD's sampling rate). The training and held-out sizes are post-processing of that count
(`split_sizes`, `held_out_rows`), and the split takes EXACTLY `m` rows, shuffled by a secret seed,
as held out and the rest for training (a dataset with fewer than `m` rows, a DP count overshooting
by a factor 1/holdout, is scored on all its rows padded with worst scores, so the sum always runs
over `m` scores). Given the released count, couple the shuffles of a dataset D and of D plus one patient
p by inserting p at a uniformly random position of D's order: if p lands among the first `m`, p
replaces one held-out row (a change of one; the displaced row joins training), otherwise the
held-out rows are the same; either way the training rows differ by one added row. So the held-out
scores are neighbours under change-one (for a [0, 1] score the sum moves by at most 1, 4 for the
squared error: OpenDP's sensitivity for this relation), the training rows under add/remove (what
DP-SGD's accountant assumes), the count under add/remove; composition adds the three losses (the
ledger charges all of them with the job), and a mixture over coupled shuffles loses nothing (Renyi
divergence is jointly quasi-convex). Removing a patient is the same coupling read backwards.

Too small to evaluate. Whether the interval is informative depends only on `m`, the score's bounds
and rho, all public: when the interval would cover half of the score's range or more (the rule of
`estimates.UNINFORMATIVE_SHARE`), nothing is computed on the held-out rows and the release says so
plainly, with the held-out size that would suffice, instead of a number that looks like an estimate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import opendp.prelude as dp
import polars as pl
from opendp.accuracy import summarize_polars_measurement
from opendp.domains import _lazyframe_from_domain, with_margin
from opendp.extras.polars import Margin

from veil.query import estimates
from veil.query.calibrate import Certified, certify
from veil.query.plan import Part, Plan
from veil.wire import Aggregate, Statistic

dp.enable_features("contrib")

SCORES: dict[str, tuple[pl.DataType, tuple[float, float], float]] = {
    "accuracy": (pl.Int32(), (0, 1), 0),  # (dtype, public bounds, the worst score)
    "squared_error": (pl.Float64(), (0.0, 4.0), 4.0),
}
"""The scores an evaluation releases the mean of: their dtype, public bounds and worst value."""

SIZE_NOTE = ("the held-out size: set before the split from the job's DP count of the dataset's rows "
             "(post-processing, no noise of its own)")
MEAN_NOTE = ("one DP sum of the held-out patients' scores (OpenDP, one held-out patient changed at a time) "
             "over the public held-out size; the interval is the sum's, cut to the score's bounds")


def split_sizes(dp_count: int, holdout: float) -> tuple[int, int]:
    """(training rows, held-out rows) from a DP count of the dataset's rows: post-processing only."""
    training = max(1, round(dp_count * (1.0 - holdout)))
    return training, held_out_rows(training, holdout)


def held_out_rows(training_rows: int, holdout: float) -> int:
    """The held-out size that goes with a job's public training-row count (`split_sizes`); a federated
    part keeps only the training count and gets its held-out size back from it."""
    return max(1, round(training_rows * holdout / (1.0 - holdout)))


@dataclass(frozen=True)
class Evaluator:
    """The certified measurement for one (score, held-out size, rho, confidence), and what it will show:
    all from public values, before any score is computed."""

    name: str
    held_out: int
    certified: Certified
    distribution: str
    sum_scale: float
    """The noise scale of the DP sum (OpenDP's summary)."""
    sum_accuracy: float
    """Half-width of the DP sum's interval at the confidence (OpenDP's summary)."""
    confidence: float

    @property
    def bounds(self) -> tuple[float, float]:
        return SCORES[self.name][1]

    @property
    def half_width(self) -> float:
        """Half-width of the mean's interval, before it is cut to the score's bounds."""
        return self.sum_accuracy / self.held_out

    @property
    def informative(self) -> bool:
        """Whether the interval covers less than half of the score's range (estimates.UNINFORMATIVE_SHARE)."""
        lo, hi = self.bounds
        return 2.0 * self.half_width < estimates.UNINFORMATIVE_SHARE * (hi - lo)

    @property
    def needed(self) -> int:
        """About how many held-out patients would make the interval informative at this rho."""
        lo, hi = self.bounds
        return math.floor(2.0 * self.sum_accuracy / (estimates.UNINFORMATIVE_SHARE * (hi - lo))) + 1


@functools.lru_cache(maxsize=256)
def evaluator(name: str, held_out: int, rho: float, confidence: float) -> Evaluator:
    """Plan and certify the DP sum of `held_out` scores `name` at `rho` (data-free; cached)."""
    dtype, bounds, _ = SCORES[name]
    if held_out < 1:
        raise ValueError("a held-out set has at least one row")
    domain = with_margin(dp.domain_of(pl.LazyFrame(schema={"score": dtype}), infer=True),
                         Margin(by=[], max_length=held_out))
    metric, d_in = dp.unit_of(changes=1)
    assert isinstance(d_in, int)
    total = pl.col("score").dp.sum(bounds)  # type: ignore[attr-defined]  # OpenDP's Polars namespace
    frame = _lazyframe_from_domain(domain).select(total.alias("score"))
    part = Part("score", Aggregate(fn="sum", column="score", alias="score"), "value")
    plan = Plan(domain, metric, d_in, frame, [part], False, [], ["score"])
    certified = certify(plan, rho, None)
    row = summarize_polars_measurement(certified.measurement, 1.0 - confidence).row(0, named=True)
    return Evaluator(name, held_out, certified, str(row["distribution"]), float(row["scale"]),
                     float(row["accuracy"]), confidence)


def too_small(ev: Evaluator, epsilon: float, larger: tuple[float, Evaluator] | None = None) -> str:
    """The plain statement a release carries when its held-out set is too small to evaluate privately;
    `larger` is (a larger evaluation epsilon, the same evaluation at it), to say what that would give."""
    lo, hi = ev.bounds
    what = "accuracy" if ev.name == "accuracy" else "mean squared error"
    more = ""
    if larger is not None:
        eps, other = larger
        more = (f", or evaluation_epsilon {eps:g} with these {ev.held_out}" if other.informative
                else f" (about {other.needed} at evaluation_epsilon {eps:g})")
    return (f"The held-out set ({ev.held_out} patients) is too small to evaluate this model privately at "
            f"evaluation_epsilon {epsilon:g}: the {ev.confidence:.0%} interval of its {what} would be "
            f"+/-{ev.half_width:.2g}, covering half of [{lo:g}, {hi:g}] or more, so none was released. An informative "
            f"interval needs about {ev.needed} held-out patients at this epsilon{more}.")


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation release shows (the `Release` fields it fills)."""

    rows: list[dict[str, Any]]
    raw: list[dict[str, Any]]
    statistics: list[Statistic]
    notes: list[str]


def release(scores: np.ndarray, ev: Evaluator, epsilon: float,
            larger: tuple[float, Evaluator] | None = None) -> Evaluation:
    """The DP mean of `scores` (one per held-out row; fewer than the held-out size are padded with the
    worst score) with its interval, or, when `ev` is not informative, the plain statement and no number
    (the scores are then not touched)."""
    name, m = ev.name, ev.held_out
    dtype, (lo, hi), worst = SCORES[name]
    size = Statistic(name="n", fn="count", column=None, distribution=None, scale=0.0, accuracy=0.0,
                     note=SIZE_NOTE)
    if not ev.informative:
        statement = too_small(ev, epsilon, larger)
        stat = Statistic(name=name, fn="mean", column="score", distribution=ev.distribution,
                         scale=ev.sum_scale / m, accuracy=ev.half_width, note=statement)
        empty: dict[str, Any] = {"n": m, name: None, f"{name}_lower": None, f"{name}_upper": None}
        return Evaluation([empty], [{"n": m, name: None}], [size, stat], [statement])
    lo, hi = float(lo), float(hi)  # bounds of an integer score, but the interval is always a float
    values = np.asarray(scores, dtype=np.float64)
    if len(values) > m:
        raise ValueError(f"{len(values)} scores for a held-out set of {m}")
    values = np.nan_to_num(np.clip(values, lo, hi), nan=worst)
    values = np.concatenate([values, np.full(m - len(values), worst)])
    frame = pl.LazyFrame({"score": values}).cast({"score": dtype})
    noisy = ev.certified.measurement(frame).collect()["score"][0]
    total = float(noisy)
    lower = min(max((total - ev.sum_accuracy) / m, lo), hi)
    upper = min(max((total + ev.sum_accuracy) / m, lo), hi)
    estimate = min(max(total / m, lower), upper)
    stat = Statistic(name=name, fn="mean", column="score", distribution=ev.distribution,
                     scale=ev.sum_scale / m, accuracy=ev.half_width, note=MEAN_NOTE)
    row: dict[str, Any] = {"n": m, name: estimate, f"{name}_lower": lower, f"{name}_upper": upper}
    return Evaluation([row], [{"n": m, name: total / m}], [size, stat], [])
