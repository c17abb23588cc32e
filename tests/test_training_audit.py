"""Empirical privacy audit of the DP-SGD engine in one training run (Steinke, Nasr, Jagielski 2023).

1,000 canary rows, each zero except its own extra feature (label 1), are each included with
probability 1/2 in the breast-cancer training data. After training a bias-free linear head, each canary
is scored by its final logit margin; the top k are guessed IN and the bottom k OUT. Under epsilon-DP the
number of correct guesses is dominated by Binomial(2k, e^eps / (1 + e^eps)), which turns the count into
a 95% lower bound on epsilon. The correct engine must stay below its claim; a run whose noise is cut to
a quarter (while the accountant keeps its claim) must be caught above it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom
from sklearn.datasets import load_breast_cancer

from veil.executor import dpsgd, models
from veil.models import build
from veil.models.layout import FeatureLayout
from veil.models.spec import ModelSpec, TrainSpec

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CANARIES = 1000
GUESSES = 100  # each way: top 100 guessed IN, bottom 100 OUT; the bound saturates near 4.2
CANARY_VALUE = 10.0  # large enough that a canary's gradient is always clipped, small enough not to saturate
CLAIM = TrainSpec(epsilon=2.0, delta=1e-5, epochs=20, batch_size=128, learning_rate=1.0, optimizer="sgd")
SPEC = ModelSpec(output_bias=False)


def epsilon_lower_bound(guesses: int, correct: int, beta: float = 0.05) -> float:
    """Largest epsilon rejected at level beta: P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= beta."""

    def tail(eps: float) -> float:
        return float(binom.sf(correct - 1, guesses, 1.0 / (1.0 + math.exp(-eps))))

    if tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) <= beta else (lo, mid)
    return lo


def audit(noise_scale: float, seed: int = 0) -> tuple[float, float]:
    """(claimed epsilon, 95% empirical lower bound) of one training run with canaries."""
    data = load_breast_cancer()
    lo, hi = data.data.min(0), data.data.max(0)  # the audit needs no public bounds: it is not a release
    base = torch.tensor((data.data - lo) / (hi - lo) * 2 - 1, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    inside = rng.random(CANARIES) < 0.5
    canaries = torch.zeros(CANARIES, base.shape[1] + CANARIES)
    canaries[torch.arange(CANARIES), base.shape[1] + torch.arange(CANARIES)] = CANARY_VALUE
    x = torch.cat(
        [torch.cat([base, torch.zeros(len(base), CANARIES)], dim=1), canaries[torch.from_numpy(inside)]]
    )
    y = torch.cat([torch.tensor(data.target), torch.ones(int(inside.sum()), dtype=torch.int64)])
    out = dpsgd.train(SPEC, CLAIM, x, y, device="cpu", seed=seed, audit_noise_scale=noise_scale)
    model = build.load_weights(models.build_model(SPEC, FeatureLayout.numeric_only(x.shape[1])), out.weights)
    with torch.no_grad():
        logits = model(canaries)
    order = np.argsort((logits[:, 1] - logits[:, 0]).numpy())
    correct = int(inside[order[-GUESSES:]].sum() + (~inside[order[:GUESSES]]).sum())
    return out.epsilon, epsilon_lower_bound(2 * GUESSES, correct)


def test_binomial_bound() -> None:
    assert epsilon_lower_bound(200, 100) == 0.0
    assert 4.1 < epsilon_lower_bound(200, 200) < 4.3
    assert epsilon_lower_bound(200, 150) < epsilon_lower_bound(200, 170)


def test_one_run_audit_passes_the_engine_and_catches_a_quarter_of_the_noise() -> None:
    claimed, bound = audit(noise_scale=1.0)
    broken_claim, broken = audit(noise_scale=0.25)
    print(
        f"\naudit: claimed epsilon {claimed:.3f}; lower bound {bound:.2f} (correct), {broken:.2f} (noise / 4)"
    )
    assert claimed == broken_claim <= CLAIM.epsilon
    assert bound < claimed
    assert broken > claimed and broken > bound + 1.5
