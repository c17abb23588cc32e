"""A trained model's DP held-out evaluation (`veil.query.evaluation`): its interval covers the true held-out
accuracy (or mean squared error) at the nominal rate, it is narrow at a few hundred held-out patients,
and a held-out set too small to evaluate privately gets a plain statement instead of a number.

The scores are seeded; the noise is OpenDP's, drawn from the OS's randomness, so the coverage bounds
allow for chance (each fails by chance well under once in 10,000 runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from veil.executor import models
from veil.executor.auth import Principal
from veil.executor.catalog import load_catalog
from veil.executor.public_data import DATASET, LABEL, breast_cancer_frame, write_sites
from veil.executor.training import Trainer, split
from veil.models import build
from veil.models.spec import ModelSpec, TrainSpec
from veil.query import evaluation
from veil.query.accounting import rho_for_epsilon
from veil.wire import EVALUATION_EPSILON, TrainRequest

DELTA = 1e-6  # the breast-cancer sites' reporting delta
DRAWS = 2000
SPEC = TrainSpec(epsilon=1.0, delta=1e-5, epochs=1, batch_size=16, learning_rate=0.5)
RESEARCHER = Principal("ada", "researcher", "study1")


def _coverage(name: str, held_out: int, epsilon: float, seed: int) -> tuple[float, evaluation.Evaluator]:
    """Share of DRAWS releases whose interval covers the true mean score (each draw new scores)."""
    ev = evaluation.evaluator(name, held_out, rho_for_epsilon(epsilon, DELTA), 0.95)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(DRAWS):
        if name == "accuracy":
            scores = (rng.random(held_out) < rng.uniform(0.5, 1.0)).astype(np.int32)
        else:
            scores = np.clip(rng.gamma(0.5, rng.uniform(0.05, 1.0), held_out), 0.0, 4.0)
        row = evaluation.release(scores, ev, epsilon).rows[0]
        assert row[f"{name}_lower"] <= row[name] <= row[f"{name}_upper"]
        # always floats, even at an integer score's bounds: sites' frames concatenate
        assert all(type(row[k]) is float for k in (name, f"{name}_lower", f"{name}_upper")), row
        hits += row[f"{name}_lower"] <= float(np.mean(scores)) <= row[f"{name}_upper"]
    return hits / DRAWS, ev


def test_the_accuracy_interval_covers_the_true_held_out_accuracy_at_the_nominal_rate() -> None:
    # 300 held-out patients at the default epsilon: integer Gaussian noise on the sum of 0/1 scores;
    # OpenDP's integer half-width is conservative (97%); 2,000 draws: sd 0.4 points
    coverage, ev = _coverage("accuracy", 300, EVALUATION_EPSILON, seed=1)
    assert 0.94 <= coverage <= 0.99, coverage
    assert ev.informative and 2 * ev.half_width < 0.13  # 0.12 wide (the three-part release: 0.39)


def test_the_squared_error_interval_covers_the_true_mean_at_the_nominal_rate() -> None:
    coverage, ev = _coverage("squared_error", 114, 1.0, seed=2)  # float Gaussian: 95% (sd 0.5 points)
    assert 0.93 <= coverage <= 0.97, coverage
    assert ev.informative


def test_the_release_is_certified_by_opendp_for_one_held_out_patient_changed() -> None:
    rho = rho_for_epsilon(EVALUATION_EPSILON, DELTA)
    ev = evaluation.evaluator("accuracy", 300, rho, 0.95)
    assert "ChangeOneDistance" in str(ev.certified.measurement.input_metric)
    assert ev.certified.measurement.map(1) <= rho
    # the same noise whatever the held-out size: the sum's sensitivity is the score's range
    assert evaluation.evaluator("accuracy", 60, rho, 0.95).sum_scale == pytest.approx(ev.sum_scale)
    assert evaluation.evaluator("squared_error", 300, rho, 0.95).sum_scale == pytest.approx(4 * ev.sum_scale)


def test_a_small_held_out_set_gets_the_plain_too_small_statement_and_no_number() -> None:
    epsilon = EVALUATION_EPSILON
    ev = evaluation.evaluator("accuracy", 26, rho_for_epsilon(epsilon, DELTA), 0.95)  # a 130-patient site
    assert not ev.informative and ev.needed > 26
    larger = (1.0, evaluation.evaluator("accuracy", 26, rho_for_epsilon(1.0, DELTA), 0.95))
    out = evaluation.release(np.ones(26, dtype=np.int32), ev, epsilon, larger)
    assert out.rows == [{"n": 26, "accuracy": None, "accuracy_lower": None, "accuracy_upper": None}]
    assert out.raw == [{"n": 26, "accuracy": None}]
    (statement,) = out.notes
    assert "too small to evaluate this model privately" in statement and "26 patients" in statement
    assert f"about {ev.needed} held-out patients" in statement and "none was released" in statement
    assert out.statistics[1].note == statement


def test_the_split_holds_out_exactly_the_public_size(tmp_path: Path) -> None:
    for count in (1, 2, 7, 130, 569, 1001):
        for holdout in (0.05, 0.2, 0.33, 0.5):
            training, held_out = evaluation.split_sizes(count, holdout)
            assert training >= 1 and held_out >= 1 and evaluation.held_out_rows(training, holdout) == held_out
            assert abs(training + held_out - count) <= 2 or count < 3
    (config,) = write_sites(tmp_path, sites=("solo",), shares=(1.0,))
    dataset = load_catalog(config).dataset(DATASET)
    request = TrainRequest(dataset=DATASET, features=["mean_radius"], label=LABEL, train=SPEC)
    for held_out in (100, 569, 600):  # a DP count far above the truth: every row held out, none trained on
        train, test = split(dataset, request, seed=3, held_out=held_out)
        assert test.height == min(held_out, 569) and train.height + test.height == 569


def test_a_trained_model_on_a_small_site_gets_the_statement_in_its_release(tmp_path: Path) -> None:
    (config,) = write_sites(tmp_path, sites=("solo",), shares=(1.0,))
    catalog = load_catalog(config)
    dataset = catalog.dataset(DATASET)
    features = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None][:5]
    request = TrainRequest(dataset=DATASET, features=features, label=LABEL, model=ModelSpec.logistic(), train=SPEC)
    trainer = Trainer(None, catalog)  # type: ignore[arg-type]  # evaluate() reads no database
    frame = pl.read_parquet(dataset.path, columns=[*features, LABEL])
    rho = rho_for_epsilon(request.evaluation_epsilon, catalog.reporting_delta)
    torch.manual_seed(0)
    for held_out, informative in ((26, False), (300, True)):
        encoded = trainer.encode(dataset, request, frame.head(held_out))
        weights = build.weights_to_bytes(models.build_model(request.model, encoded.layout), {})
        release = trainer.evaluate(dataset, request, weights, encoded, rho, RESEARCHER, held_out)
        row = release.rows[0]
        assert row["n"] == held_out
        # only a measurement is charged: a held-out set too small is not measured, its reserved rho refunded
        assert release.cost.rho == (rho if informative else 0.0)
        assert release.cost.epsilon == (pytest.approx(request.evaluation_epsilon) if informative else 0.0)
        if informative:
            assert not release.notes
            assert 0 <= row["accuracy_lower"] <= row["accuracy"] <= row["accuracy_upper"] <= 1
        else:
            assert row["accuracy"] is None and row["accuracy_lower"] is None
            assert len(release.notes) == 1 and "too small to evaluate" in release.notes[0]
            assert "evaluation_epsilon 1" in release.notes[0]  # what the largest allowed epsilon would need
