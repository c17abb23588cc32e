"""The DP-SGD engine: one training job on in-memory tensors with Opacus.

The noise multiplier is calibrated once, up front, for every planned step (PRV accountant, RDP where
PRV fails) and checked against the target. Each step draws a Poisson batch straight from the tensors
(each row in with probability q, the sampling the accountant assumes; `poisson_batch`), clips per-sample
gradients in one backward pass (book-keeping, executor/bookkeeping.py, on Opacus' per-layer samplers;
Opacus' ghost clipping for a layer without them, or hooks, for comparison) and adds Gaussian noise with
Opacus' optimizer; a live accountant records each step, so a cancelled job reports what its steps actually
spent. The noise generator gets a fresh state from the operating system's CSPRNG before every step
(`reseed_from_os`), never from the job's seed: whoever knew or guessed a seed could regenerate the noise
and subtract it (Opacus' secure mode needs torchcsprng, which is not available for current PyTorch). A seed
fixes only the initial weights and the batches.
Only the weights (safetensors), the (epsilon, delta) spent and private held-out counts come out; the
counts are not for release as they are.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from pydantic import ValidationError
from torch import nn

from veil.errors import QueryError, validation_problems
from veil.executor import bookkeeping, models
from veil.executor.bookkeeping import BookKeeping, BookKeepingOptimizer
from veil.models import build
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec, TrainSpec

ACCOUNTANTS = ("prv", "rdp")
"""Preferred first: PRV is tighter, but fails on some parameters (Opacus issues #591, #601)."""
ACCOUNTANT_FAILURES = (ValueError, ArithmeticError, IndexError, RuntimeError)
MAX_STEPS = 1_000_000
EVAL_CHUNK = 65_536
_MT_STATE_BYTES = 5056
"""Size of torch's CPU generator state (CPUGeneratorImplState): a legacy header (seed u64, left i32,
seeded i32, next u64), 624 Mersenne Twister words kept as u64 (their low 32 bits are the state), the
cached normal samples."""
_MT_WORDS, _MT_OFFSET = 624, 24

# Opacus' hooks make PyTorch warn on every backward pass that the input needs no gradient: expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True)
class Progress:
    """Where a job stands: `epsilon` is what the accountant says the steps taken so far spent."""

    epoch: int
    epochs: int
    step: int
    steps: int
    epsilon: float


@dataclass(frozen=True)
class Evaluation:
    """Raw counts on held-out rows. PRIVATE, NOT FOR RELEASE: they are statistics of private data and
    may leave the executor only through a DP mechanism. `squared_error` sums over rows in scaled label
    units with predictions clipped to [-1, 1], so each row adds at most 4."""

    n: int
    correct: int | None = None
    squared_error: float | None = None


@dataclass(frozen=True)
class TrainingOutcome:
    """What a job produced. `weights`, `epsilon` and `delta` may be released; `evaluation` may not."""

    weights: bytes
    epsilon: float
    delta: float
    steps: int
    planned_steps: int
    sample_rate: float
    noise_multiplier: float
    accountant: str
    grad_sample_mode: str
    device: str
    cancelled: bool
    train_seconds: float
    evaluation: Evaluation | None


@dataclass(frozen=True)
class Calibration:
    """The noise multiplier for a whole job and the epsilon the accountant gives all its steps."""

    noise_multiplier: float
    accountant: str
    epsilon: float


@functools.lru_cache(maxsize=128)
def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int) -> Calibration:
    """Opacus' smallest noise multiplier (within `TOLERANCE` in epsilon) with which `steps` Poisson-sampled
    steps spend at most (epsilon, delta): PRV accountant first, RDP where PRV fails; the accountant's own
    epsilon at the chosen multiplier is the one kept. Cached per process for each (epsilon, delta, rate, steps)."""
    for mechanism in ACCOUNTANTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sigma, spent = _search(mechanism, epsilon, delta, sample_rate, steps)
        except ACCOUNTANT_FAILURES:
            continue
        if spent <= epsilon:
            return Calibration(noise_multiplier=sigma, accountant=mechanism, epsilon=spent)
    raise QueryError(
        "budget_too_small",
        f"epsilon {epsilon} cannot cover {steps} steps at sampling rate {sample_rate:.3g}",
        "raise epsilon, or train for fewer epochs or with a larger batch_size",
    )


TOLERANCE = 0.01
"""How far below the target the calibrated epsilon may stay (Opacus' `get_noise_multiplier` default), times
the target below epsilon 1."""


def _search(mechanism: str, epsilon: float, delta: float, sample_rate: float, steps: int) -> tuple[float, float]:
    """(sigma, the accountant's epsilon at sigma) with epsilon - TOLERANCE < that epsilon <= epsilon.

    RDP is Opacus' own search (an RDP evaluation is cheap). PRV evaluations cost 0.1-0.3 s each, so its
    search starts from RDP's coarse answer (RDP is looser, so its sigma is close above PRV's) and closes the
    bracket by false position on log epsilon against log sigma (Illinois), about 4-7 evaluations where
    Opacus' bisection from [0, 20] takes about 20. Only the search is ours; every epsilon is the accountant's.
    The tolerance is relative below epsilon 1, so a small budget is not left 20% unused."""
    tolerance = TOLERANCE * min(1.0, epsilon)
    if mechanism == "rdp":
        sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant="rdp", epsilon_tolerance=tolerance)
        return sigma, accountant_epsilon([(sigma, sample_rate, steps)], "rdp", delta)

    def spent(sigma: float) -> float:
        return accountant_epsilon([(sigma, sample_rate, steps)], mechanism, delta)

    try:
        hi, step = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                        steps=steps, accountant="rdp", epsilon_tolerance=0.1 * epsilon,
                                        alphas=FAST_RDP_ORDERS), 1.25
    except ACCOUNTANT_FAILURES:  # RDP's conversion cannot reach some small epsilons that PRV can
        hi, step = 1.0, 2.0
    at_hi = spent(hi)
    while at_hi > epsilon:  # above the target: move up
        if hi > _MAX_SIGMA:
            raise ValueError("no noise multiplier reaches the target")
        hi *= step
        at_hi = spent(hi)
    lo, at_lo = hi / step, spent(hi / step)
    while at_lo <= epsilon:  # below the target already: move down (epsilon grows without bound as sigma -> 0)
        hi, at_hi, lo = lo, at_lo, lo / step
        at_lo = spent(lo)
    kept = 0  # which end the last step kept (Illinois: an end kept twice has its value halved)
    f_lo, f_hi = math.log(at_lo / epsilon), math.log(at_hi / epsilon)
    for _ in range(60):
        if epsilon - at_hi <= tolerance:
            break
        a, b = math.log(lo), math.log(hi)
        m = b - f_hi * (b - a) / (f_hi - f_lo) if f_hi != f_lo else (a + b) / 2
        sigma = math.exp(m if a < m < b else (a + b) / 2)
        at = spent(sigma)
        if at <= epsilon:
            hi, at_hi, f_hi = sigma, at, math.log(at / epsilon)
            f_lo = f_lo / 2 if kept == -1 else f_lo
            kept = -1
        else:
            lo, at_lo, f_lo = sigma, at, math.log(at / epsilon)
            f_hi = f_hi / 2 if kept == 1 else f_hi
            kept = 1
    return hi, at_hi


_MAX_SIGMA = 1e6
FAST_RDP_ORDERS = [float(a) for a in (*range(2, 65), 80, 96, 128, 192, 256)]
"""RDP orders for bounds that are not the charge (the search's starting guess, progress reports, a round's
figure within the plan): integer orders have a closed form, the fractional ones of Opacus' default list a
slow series (0.06 s against 0.24 s for the guess). RDP's epsilon is an upper bound at any set of orders."""


def accountant_epsilon(history: list[tuple[float, float, int]], mechanism: str, delta: float,
                       orders: list[float] | None = None) -> float:
    """Epsilon that Opacus' `mechanism` accountant gives a history of (sigma, sampling rate, steps); for
    RDP, over `orders` (None: Opacus' default orders)."""
    accountant = create_accountant(mechanism)
    accountant.load_state_dict({"history": list(history), "mechanism": mechanism})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if orders is not None and mechanism == "rdp":
            return float(accountant.get_epsilon(delta, alphas=orders))
        return float(accountant.get_epsilon(delta))


def train(
    model_spec: ModelSpec | Mapping[str, Any],
    train_spec: TrainSpec | Mapping[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    *,
    layout: FeatureLayout | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    grad_sample_mode: Literal["bk", "ghost", "hooks"] = "bk",
    audit_noise_scale: float = 1.0,
    public_rows: int | None = None,
) -> TrainingOutcome:
    """Train `model_spec` on (x_train, y_train) with DP-SGD to spend at most the spec's (epsilon, delta).

    `layout` describes the columns of x (default: all numeric, two classes or one regression output).
    `progress` is called after every epoch and on cancellation; setting `cancel` stops before the next
    step. `device` defaults to CUDA when available. `seed` (tests and benchmarks only; never from a
    request) fixes the initial weights and the Poisson batches; otherwise they are seeded from the OS.
    The noise is drawn from the OS before every step whatever the seed, so no run is reproducible.
    `audit_noise_scale` exists only for the empirical privacy audit: it multiplies the noise actually
    added while the accountant keeps the calibrated multiplier, so anything but 1 breaks the guarantee.
    `public_rows` (a DP count of the training rows, rounded by `planning_rows`) sets the sampling rate and
    the number of steps, so that neither reveals the private row count; Poisson sampling at that rate is what
    is accounted.
    """
    spec, hyper, layout, sample_rate, per_epoch, planned, plan = _setup(
        model_spec, train_spec, x_train, y_train, layout, public_rows)
    if x_test is not None or y_test is not None:
        if x_test is None or y_test is None:
            raise QueryError("bad_train_spec", "give both x_test and y_test, or neither")
        _check_shapes(x_test, y_test, layout, "test")
    dev = torch.device(device) if device is not None else _default_device()
    seed = secrets.randbits(62) if seed is None else seed
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        module = models.build_model(spec, layout).to(dev)
        run = _Run(module, spec, hyper, plan, sample_rate, grad_sample_mode, audit_noise_scale, dev, seed,
                   sample=x_train[:2].to(dev, torch.float32))
        started = time.perf_counter()
        y = y_train.to(dev, torch.float32 if run.regression else torch.int64)
        steps = run.fit(x_train.to(dev, torch.float32), y, per_epoch, progress, cancel)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - started
        recorded, spent = run.spent()
        if steps == planned and not recorded <= hyper.epsilon:  # fail closed
            raise RuntimeError(f"the accountant reports epsilon {recorded}, above the target {hyper.epsilon}")
        evaluation = None
        if x_test is not None and y_test is not None:
            evaluation = _evaluate(module, spec.task, x_test, y_test, dev)
    weights = build.weights_to_bytes(
        module,
        {
            "model_spec": spec.model_dump(mode="json"),
            "layout": {
                "numeric": layout.numeric,
                "categorical": layout.categorical,
                "outputs": layout.outputs,
            },
            "epsilon": spent,
            "delta": hyper.delta,
            **_custom_graph(spec, layout),
        },
    )
    return TrainingOutcome(
        weights=weights,
        epsilon=spent,
        delta=hyper.delta,
        steps=steps,
        planned_steps=planned,
        sample_rate=sample_rate,
        noise_multiplier=plan.noise_multiplier,
        accountant=plan.accountant,
        grad_sample_mode=run.mode,
        device=str(dev),
        cancelled=steps < planned,
        train_seconds=seconds,
        evaluation=evaluation,
    )


@dataclass(frozen=True)
class Stretch:
    """One resumed stretch of a longer job (a federated round at one site): the model state after it, the
    accountant's state to carry into the next stretch (`accountant_state`: Opacus' `state_dict()` as plain
    JSON data, see `save_accountant`), and the epsilon its whole history spends."""

    state: dict[str, torch.Tensor]
    accountant_state: dict[str, Any]
    epsilon: float
    delta: float
    steps: int
    planned_steps: int
    sample_rate: float
    noise_multiplier: float
    accountant: str
    cancelled: bool
    train_seconds: float
    exact: bool = True
    """False: `epsilon` is an upper bound (RDP's, capped by the plan's), not the accountant's exact figure."""

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's whole history of (sigma, sampling rate, steps), every stretch so far."""
        return [(s, q, k) for s, q, k in self.accountant_state["history"]]


def train_stretch(
    model_spec: ModelSpec | Mapping[str, Any],
    train_spec: TrainSpec | Mapping[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epochs: int,
    state: Mapping[str, torch.Tensor] | None = None,
    accountant: Mapping[str, Any] | Sequence[Sequence[float]] | None = None,
    layout: FeatureLayout | None = None,
    cancel: threading.Event | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    grad_sample_mode: Literal["bk", "ghost", "hooks"] = "bk",
    public_rows: int | None = None,
    exact: bool = True,
) -> Stretch:
    """Continue a job for `epochs` epochs from model `state`, resuming its accountant from `accountant`.

    `train_spec` describes the whole job: its (epsilon, delta) and `epochs` (all stretches together) fix
    the noise multiplier, calibrated once for every planned step, so every stretch runs at the same
    multiplier and one accountant covers them all: `accountant` is the previous stretch's
    `Stretch.accountant_state` (None or empty before the first; see `load_accountant`). A stretch whose
    steps would take that accountant past epsilon is refused before it starts (`budget_exhausted`).
    `state` None starts from a fresh model; `seed`, `device`, `public_rows` and `grad_sample_mode` are as
    in `train`.

    `exact` False (a federated round) skips the two accountant evaluations when the stretch stays within
    the plan: every step so far and this stretch's ran at the calibrated (multiplier, sampling rate) and
    they number at most the planned steps, for which Opacus' accountant gave the plan's epsilon (at most
    the target), so the check holds without evaluating it; `Stretch.epsilon` is then an upper bound
    (RDP's, capped by the plan's epsilon; `Stretch.exact` False) and the exact figure is
    `history_epsilon(stretch.history, ...)`, for the settlement. Off the plan it checks as with `exact`.
    """
    spec, hyper, layout, sample_rate, per_epoch, planned, plan = _setup(
        model_spec, train_spec, x_train, y_train, layout, public_rows)
    if not 1 <= epochs <= hyper.epochs:
        raise QueryError("bad_train_spec", f"a stretch runs 1 to {hyper.epochs} epochs, not {epochs}")
    resumed = load_accountant(accountant, plan.accountant)
    mechanism, carried = resumed.mechanism(), list(resumed.history)
    within = (not exact and mechanism == plan.accountant and plan.epsilon <= hyper.epsilon
              and all(float(s) == plan.noise_multiplier and float(q) == sample_rate for s, q, _ in carried)
              and sum(int(k) for *_, k in carried) + epochs * per_epoch <= planned)
    projected = 0.0 if within else history_epsilon(
        [*carried, (plan.noise_multiplier, sample_rate, epochs * per_epoch)], mechanism, hyper.delta
    )
    if not projected <= hyper.epsilon:  # fail closed, NaN included
        raise QueryError(
            "budget_exhausted",
            f"{epochs * per_epoch} more steps would spend epsilon {projected:.4g} in all, above the target "
            f"{hyper.epsilon:g} ({history_epsilon(carried, mechanism, hyper.delta):.4g} spent so far)",
            "stop here, or start a new job with a larger budget",
        )
    dev = torch.device(device) if device is not None else _default_device()
    seed = secrets.randbits(62) if seed is None else seed
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        module = models.build_model(spec, layout)
        if state is not None:
            module.load_state_dict(dict(state), strict=True)
        module = module.to(dev)
        stretch = hyper.model_copy(update={"epochs": epochs})
        # the same accountant, resumed: its next step extends its history
        run = _Run(module, spec, stretch, plan, sample_rate, grad_sample_mode, 1.0, dev, seed, resumed,
                   sample=x_train[:2].to(dev, torch.float32))
        started = time.perf_counter()
        y = y_train.to(dev, torch.float32 if run.regression else torch.int64)
        steps = run.fit(x_train.to(dev, torch.float32), y, per_epoch, None, cancel)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - started
    saved = save_accountant(run.accountant)
    spent = run.bound() if within else history_epsilon([tuple(h) for h in saved["history"]], mechanism, hyper.delta)
    if not spent <= hyper.epsilon:  # fail closed
        raise RuntimeError(f"the accountant reports epsilon {spent}, above the target {hyper.epsilon}")
    return Stretch(
        state={k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()},
        accountant_state=saved,
        epsilon=spent,
        delta=hyper.delta,
        steps=steps,
        planned_steps=planned,
        sample_rate=sample_rate,
        noise_multiplier=plan.noise_multiplier,
        accountant=mechanism,
        cancelled=steps < epochs * per_epoch,
        train_seconds=seconds,
        exact=not within,
    )


def save_accountant(accountant: IAccountant) -> dict[str, Any]:
    """Opacus' `state_dict()` of `accountant` as plain JSON data (no pickle, no tuples):
    {"history": [[sigma, sampling rate, steps], ...], "mechanism": "prv" or "rdp"}. Floats survive a JSON
    round trip exactly, so a resumed accountant gives the same epsilon to the last digit."""
    state = accountant.state_dict()
    return {"history": [[float(s), float(q), int(k)] for s, q, k in state["history"]],
            "mechanism": str(state["mechanism"])}


def load_accountant(state: Mapping[str, Any] | Sequence[Sequence[float]] | None, mechanism: str) -> IAccountant:
    """An Opacus accountant resumed with `load_state_dict` from `save_accountant`'s data; None or empty: a
    fresh `mechanism` accountant. A bare list is the history alone, as job rows kept it before (resumed
    under `mechanism`, the calibrated one, as it was then). Anything malformed is refused (ValueError):
    a site never guesses what its accountant spent."""
    if state is None or len(state) == 0:
        state = {"history": [], "mechanism": mechanism}
    elif not isinstance(state, Mapping):
        state = {"history": list(state), "mechanism": mechanism}
    if set(state) != {"history", "mechanism"} or state["mechanism"] not in ACCOUNTANTS:
        raise ValueError(f"not an accountant state of {' or '.join(ACCOUNTANTS)}: keys {sorted(state)}")
    history = []
    for entry in state["history"]:
        try:
            sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
            valid = len(entry) == 3 and isinstance(steps, int) and steps > 0 and sigma >= 0 and 0 < q <= 1
        except (TypeError, ValueError, IndexError, KeyError):
            valid = False
        if not valid:
            raise ValueError(f"not an accountant history entry (sigma, sampling rate, steps): {entry!r}")
        history.append((sigma, q, steps))
    accountant = create_accountant(state["mechanism"])
    accountant.load_state_dict({"history": history, "mechanism": state["mechanism"]})
    return accountant


def history_epsilon(history: Sequence[tuple[float, float, int]], mechanism: str, delta: float) -> float:
    """Epsilon of a whole accountant history: `mechanism` (as calibrated), RDP where PRV fails; 0 if empty."""
    if not history:
        return 0.0
    try:
        return accountant_epsilon(list(history), mechanism, delta)
    except ACCOUNTANT_FAILURES:
        return accountant_epsilon(list(history), "rdp", delta)


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The rows (ascending indices) of one Poisson batch of `n` rows: each row in independently with
    probability `rate`, the sampling the accountant assumes. Drawn as the gaps between chosen rows, which in
    a Bernoulli process are independent and geometric at `rate`: about `rate * n` random numbers where
    `rand(n) < rate` draws `n` (0.08 ms against 0.5 ms a step for a batch of 512 from 100k rows)."""
    chunk = int(n * rate + 4 * math.sqrt(n * rate) + 16)  # one draw covers the n rows but once in ~30,000

    def positions(after: torch.Tensor | float) -> torch.Tensor:  # 1-based positions of the next chosen rows
        gaps = torch.empty(chunk, dtype=torch.float64, device=generator.device)
        return gaps.geometric_(rate, generator=generator).cumsum_(0) + after

    chosen = positions(0.0)
    while chosen[-1].item() <= n:
        chosen = torch.cat([chosen, positions(chosen[-1])])
    return (chosen[chosen <= n] - 1).long()


def reseed_from_os(generator: torch.Generator) -> None:
    """Give `generator` a fresh state from the operating system's CSPRNG (`os.urandom`), so that no
    seed anyone knows or could guess predicts what it draws next.

    On the CPU (Mersenne Twister) all 624 state words are drawn, 19,968 bits, because `manual_seed`
    keeps only 32 bits of a seed there; on CUDA (Philox) a 64-bit seed, the most `manual_seed` takes.
    Either way a fast generator that is not cryptographic then expands it (about 25 us a call)."""
    if generator.device.type != "cpu":
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return
    state = _mt_template().clone()
    words = state.numpy()[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)
    words[:] = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32)
    generator.set_state(state)


@functools.cache
def _mt_template() -> torch.Tensor:
    """A freshly seeded CPU generator's state (valid header, no cached normal samples), layout checked."""
    state = torch.Generator().manual_seed(1).get_state()
    header = state[:24].numpy()
    if (state.numel() != _MT_STATE_BYTES or sys.byteorder != "little"
            or header[:16].tobytes() != (1).to_bytes(8, "little") + (1).to_bytes(4, "little") * 2):
        raise RuntimeError(f"torch's CPU generator state ({state.numel()} bytes) has a layout this engine does "
                           "not know, so the DP-SGD noise cannot be seeded from the OS: check reseed_from_os "
                           "against this torch version")
    return state


class _Run:
    """The Opacus objects of one job: wrapped module, DP optimizer, criterion and live accountant."""

    def __init__(
        self,
        module: nn.Module,
        spec: ModelSpec,
        hyper: TrainSpec,
        plan: Calibration,
        sample_rate: float,
        grad_sample_mode: str,
        audit_noise_scale: float,
        dev: torch.device,
        seed: int,
        accountant: IAccountant | None = None,
        sample: torch.Tensor | None = None,
    ) -> None:
        self.plan, self.sample_rate, self.delta, self.epochs = plan, sample_rate, hyper.delta, hyper.epochs
        self.regression = spec.task == "regression"
        if grad_sample_mode == "bk" and not bookkeeping.supports(module, sample):
            grad_sample_mode = "ghost"  # a layer Opacus has no samplers for: its ghost clipping handles it
        self.mode = grad_sample_mode
        self.bookkeeping = BookKeeping(module, hyper.max_grad_norm) if grad_sample_mode == "bk" else None
        ghost = grad_sample_mode == "ghost"
        if self.bookkeeping is not None:
            self.model: nn.Module = module
        else:
            extra = {"max_grad_norm": hyper.max_grad_norm} if ghost else {}
            wrapped = prepare_module(
                module, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean", **extra
            )
            wrapped.forbid_grad_accumulation()
            self.model = wrapped
        base = (torch.optim.Adam if hyper.optimizer == "adam" else torch.optim.SGD)(
            self.model.parameters(), lr=hyper.learning_rate, weight_decay=hyper.weight_decay
        )
        # The noise never comes from `seed`: `fit` reseeds it from the OS before every step.
        self.noise = torch.Generator(dev)
        reseed_from_os(self.noise)
        self.sampling = torch.Generator(dev).manual_seed(seed + 2)
        self.optimizer = (  # book-keeping leaves the clipped sum where ghost clipping does
            BookKeepingOptimizer if self.bookkeeping
            else get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode)
        )(
            base,
            noise_multiplier=plan.noise_multiplier * audit_noise_scale,
            max_grad_norm=hyper.max_grad_norm,
            expected_batch_size=hyper.batch_size,
            loss_reduction="mean",
            generator=self.noise,
        )
        self.accountant = accountant if accountant is not None else create_accountant(plan.accountant)
        # Records the calibrated multiplier, which is the one applied unless an audit breaks it on purpose.
        self.optimizer.attach_step_hook(
            lambda _: self.accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=sample_rate)
        )
        reduction = "none" if self.bookkeeping is not None else "mean"
        loss = nn.MSELoss(reduction=reduction) if self.regression else nn.CrossEntropyLoss(reduction=reduction)
        self.criterion = (
            DPLossFastGradientClipping(self.model, self.optimizer, loss, "mean") if ghost else loss
        )

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        per_epoch: int,
        progress: Callable[[Progress], None] | None,
        cancel: threading.Event | None,
    ) -> int:
        """Run the planned steps (or until cancelled); returns the number of steps taken."""
        n, steps, planned = len(x), 0, self.epochs * per_epoch
        self.model.train()
        for epoch in range(1, self.epochs + 1):
            for _ in range(per_epoch):
                if cancel is not None and cancel.is_set():
                    if progress is not None:
                        progress(Progress(epoch, self.epochs, steps, planned, self.spent()[1]))
                    return steps
                batch = poisson_batch(n, self.sample_rate, self.sampling)
                xb, yb, weight = x[batch], y[batch], 1.0
                if (
                    len(xb) == 0
                ):  # still a step, noise only, as the accountant assumes: a zero-weight dummy row
                    xb, yb, weight = torch.zeros_like(x[:1]), torch.zeros_like(y[:1]), 0.0
                self.optimizer.zero_grad(set_to_none=True)
                out = self.model(xb)
                loss = self.criterion(out.squeeze(1) if self.regression else out, yb) * weight
                if self.bookkeeping is not None:
                    self.bookkeeping.clipped_sum(loss)
                else:
                    loss.backward()
                reseed_from_os(self.noise)  # this step's noise: from a state nobody could know or recompute
                self.optimizer.step()
                steps += 1
            if progress is not None:
                progress(Progress(epoch, self.epochs, steps, planned, self.bound()))
        return steps

    def bound(self) -> float:
        """For progress reports, off the hot path's budget: an upper bound on what the steps so far spend,
        RDP's epsilon over `FAST_RDP_ORDERS` (milliseconds, where PRV takes 0.1-0.3 s) capped by the plan's.
        The job's figure at the end (and a cancelled job's last report) is `spent`; a job that fails after a
        report is charged this bound, never less than it spent."""
        if not self.accountant.history:
            return 0.0
        try:
            epsilon = accountant_epsilon(list(self.accountant.history), "rdp", self.delta, FAST_RDP_ORDERS)
        except ACCOUNTANT_FAILURES:
            return self.plan.epsilon
        return min(epsilon, self.plan.epsilon) if math.isfinite(epsilon) else self.plan.epsilon

    def spent(self) -> tuple[float, float]:
        """(what the accountant gives the steps taken so far, that capped by the plan's epsilon): an early
        stop is post-processing of the planned run, so the plan bounds it even where PRV fails and RDP,
        looser, answers instead."""
        if not self.accountant.history:
            return 0.0, 0.0
        epsilon = history_epsilon(self.accountant.history, self.plan.accountant, self.delta)
        return epsilon, min(epsilon, self.plan.epsilon) if math.isfinite(epsilon) else self.plan.epsilon


def _custom_graph(spec: ModelSpec, layout: FeatureLayout) -> dict[str, Any]:
    """For a custom model, {"graph": the checked description of its traced graph}: with it the weights'
    owner rebuilds the module (`veil.models.build.trained_module`) without running the source."""
    if spec.source is None:
        return {}
    from veil.executor.custom_model import traced_graph

    outputs = layout.outputs if spec.task == "classification" else 1
    return {"graph": traced_graph(spec.source, layout.width, outputs)}


def _setup(model_spec: ModelSpec | Mapping[str, Any], train_spec: TrainSpec | Mapping[str, Any],
           x_train: torch.Tensor, y_train: torch.Tensor, layout: FeatureLayout | None, public_rows: int | None
           ) -> tuple[ModelSpec, TrainSpec, FeatureLayout, float, int, int, Calibration]:
    """Check a job's specs and tensors; its sampling rate, steps per epoch, planned steps and noise."""
    spec = build.parse_model_spec(model_spec)
    hyper = _parse_train_spec(train_spec)
    n = len(x_train) if public_rows is None else planning_rows(public_rows)
    if layout is None:
        outputs = 2 if spec.task == "classification" else 1
        layout = FeatureLayout.numeric_only(x_train.shape[1] if x_train.ndim == 2 else 0, outputs=outputs)
    _check_shapes(x_train, y_train, layout, "train")
    if hyper.batch_size >= n:
        raise QueryError(
            "bad_train_spec",
            f"batch_size {hyper.batch_size} must be smaller than the number of training rows",
            "lower batch_size",
        )
    sample_rate = hyper.batch_size / n
    per_epoch = max(1, round(n / hyper.batch_size))
    planned = hyper.epochs * per_epoch
    if planned > MAX_STEPS:
        raise QueryError(
            "bad_train_spec",
            f"{planned:,} steps planned; at most {MAX_STEPS:,}",
            "raise batch_size or epochs",
        )
    return spec, hyper, layout, sample_rate, per_epoch, planned, calibrate(hyper.epsilon, hyper.delta,
                                                                             sample_rate, planned)


def planning_rows(public_rows: int) -> int:
    """The row count a job's sampling rate and steps are planned on: its public DP count rounded to three
    significant digits (post-processing; within 0.5%, so the expected batch too). A DP count differs from job
    to job; rounded, repeated jobs on the same data usually find their noise calibration cached (`calibrate`,
    0.5-0.8 s for 100k rows)."""
    n = max(1, public_rows)
    return max(1, round(n, 2 - int(math.log10(n))))


def _parse_train_spec(spec: TrainSpec | Mapping[str, Any]) -> TrainSpec:
    if isinstance(spec, TrainSpec):
        return spec
    try:
        return TrainSpec.model_validate(spec)
    except ValidationError as exc:
        raise QueryError("bad_train_spec", f"invalid training spec: {validation_problems(exc.errors())}") from None


def _check_shapes(x: torch.Tensor, y: torch.Tensor, layout: FeatureLayout, which: str) -> None:
    if x.ndim != 2 or x.shape[1] != layout.width or y.shape != (x.shape[0],):
        raise QueryError(
            "bad_train_spec",
            f"{which} tensors: x must be (rows, {layout.width}) and y (rows,), got {tuple(x.shape)} "
            f"and {tuple(y.shape)}",
        )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def _evaluate(
    module: nn.Module, task: str, x: torch.Tensor, y: torch.Tensor, dev: torch.device
) -> Evaluation:
    """Private held-out counts (see `Evaluation`)."""
    module.eval()
    correct, squared = 0, 0.0
    for start in range(0, len(x), EVAL_CHUNK):
        out = module(x[start : start + EVAL_CHUNK].to(dev))
        yb = y[start : start + EVAL_CHUNK].to(dev)
        if task == "classification":
            correct += int((out.argmax(dim=1) == yb).sum())
        else:
            squared += float(((out.squeeze(1).clamp(-1.0, 1.0) - yb) ** 2).sum())
    if task == "classification":
        return Evaluation(n=len(x), correct=correct)
    return Evaluation(n=len(x), squared_error=squared)
