"""DP-SGD jobs through a real executor: applied for and approved for training, run from the SDK with the
budget reserved and settled to the accountant's epsilon, cancelled, refused, and cut off by a crash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from conftest import BACKENDS, Deployment, deploy, make_database
from veil.executor import audit, ledger
from veil.executor.features import encode
from veil.executor.public_data import CLASSES, DATASET, LABEL, breast_cancer_frame, write_sites
from veil.executor.store import write
from veil.kernel.errors import VeilBudgetError, VeilPolicyError
from veil.kernel.sdk import Site as ResearcherSite
from veil.models.spec import ModelSpec, TrainSpec
from veil.query.accounting import rho_for_epsilon
from veil.wire import EVALUATION_EPSILON, TrainRequest

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
FRAME, COLUMNS = breast_cancer_frame()
FEATURES = [c.name for c in COLUMNS if c.bounds is not None]
SGD = {"epochs": 20, "batch_size": 32, "learning_rate": 2.0, "optimizer": "sgd"}


@pytest.fixture(scope="module", params=BACKENDS)
def hospital(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One site holding all 569 patients (L2), and study1 approved for queries and training."""
    root = tmp_path_factory.mktemp("bc")
    (config,) = write_sites(root, sites=("solo",), shares=(1.0,))
    url, drop = make_database(request.param, root)
    d = deploy(config, url, root, grants={})
    d.approve_training(DATASET, 12.0)
    yield d
    d.stop()
    drop()


def spent(d: Deployment) -> dict[str, Any]:
    return d.spent(DATASET)


def release_rho(d: Deployment, evaluation_epsilon: float = EVALUATION_EPSILON) -> float:
    """The rho of one of a job's two DP releases (its count of rows, its held-out evaluation)."""
    return rho_for_epsilon(evaluation_epsilon, d.catalog.reporting_delta)


def wait(d: Deployment, job_id: int, until: Any = lambda j: j.state != "running", timeout: float = 120) -> Any:
    client = d.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def long_job(d: Deployment, epsilon: float) -> tuple[Any, Any]:
    """Start an MLP job of 400 epochs (long enough to stop by hand); return the client and the job."""
    client = d.client()
    request = TrainRequest(dataset=DATASET, features=FEATURES, label=LABEL, model=ModelSpec.mlp([64, 64]),
                           train=TrainSpec(epsilon=epsilon, delta=1e-5, epochs=400, batch_size=16, learning_rate=0.5))
    return client, client.train(request)


def test_a_researcher_trains_at_one_site(hospital: Deployment) -> None:
    before = spent(hospital)
    site = ResearcherSite("solo", hospital.url, hospital.tokens["researcher"])
    model = site.train(DATASET, FEATURES, LABEL, epsilon=2.0, delta=1e-5, evaluation_epsilon=1.0, progress=False,
                       **SGD)
    assert model.job.state == "done" and 1.5 < model.epsilon <= 2.0 and model.delta == 1e-5
    assert model.job.rows is not None and abs(model.job.rows - 455) < 60  # a DP count of the ~455 training rows

    # the weights are safetensors (a JSON header, no pickle) and the model is good on all 569 patients
    assert model.weights[8:9] == b"{" and b"pickle" not in model.weights[:200]
    data = encode(FRAME, label=LABEL, numeric={c.name: c.bounds for c in COLUMNS if c.bounds}, classes=CLASSES)
    with torch.no_grad():
        accuracy = (model.module()(data.x).argmax(dim=1) == data.y).float().mean().item()
    assert accuracy >= 0.9, accuracy

    evaluation = model.evaluation
    assert evaluation is not None
    row = evaluation.release.rows[0]
    assert row["accuracy_lower"] <= row["accuracy_upper"] and evaluation.release.cost.epsilon == pytest.approx(1.0)
    entry = audit.find(hospital.engine, model.job.receipt or "")
    assert entry is not None and entry.action == "train" and entry.decision == "settled"

    after = spent(hospital)  # the target was reserved, the unspent part refunded: the accountant's epsilon stays
    assert after["epsilon"] - before["epsilon"] == pytest.approx(model.epsilon, rel=1e-9)
    assert after["delta"] - before["delta"] == pytest.approx(1e-5)
    assert after["rho"] - before["rho"] == pytest.approx(2 * release_rho(hospital, 1.0))  # rows, evaluation
    assert audit.verify(hospital.engine).ok


def test_a_cancelled_job_is_charged_for_its_steps_only(hospital: Deployment) -> None:
    before = spent(hospital)
    client, job = long_job(hospital, epsilon=4.0)
    wait(hospital, job.id, until=lambda j: j.epoch >= 2)
    client.cancel_job(job.id)
    job = wait(hospital, job.id)
    assert job.state == "cancelled" and 0 < job.epsilon < 4.0 and job.progress < 0.5
    assert len(client.job_weights(job.id)) > 1000
    assert spent(hospital)["epsilon"] - before["epsilon"] == pytest.approx(job.epsilon, rel=1e-9)
    assert job.evaluation is not None  # its weights were evaluated: both DP releases were made
    assert spent(hospital)["rho"] - before["rho"] == pytest.approx(2 * release_rho(hospital))
    assert audit.verify(hospital.engine).ok


def test_bad_training_requests_are_refused_and_cost_nothing(hospital: Deployment) -> None:
    site = ResearcherSite("solo", hospital.url, hospital.tokens["researcher"])
    before, log_before = spent(hospital), audit.count_entries(hospital.engine)
    train = dict(epsilon=1.0, progress=False, **SGD)
    with pytest.raises(VeilPolicyError, match="unknown_column"):
        site.train(DATASET, ["tumour_size"], LABEL, **train)
    with pytest.raises(VeilPolicyError, match="bad_label.*needs public bounds"):
        site.train(DATASET, FEATURES, LABEL, model=ModelSpec.linear(), **train)
    with pytest.raises(VeilPolicyError, match="epsilon_above_level"):
        site.train(DATASET, FEATURES, LABEL, **{**train, "epsilon": 9.0})
    with pytest.raises(VeilBudgetError, match="delta_exhausted.*smaller epsilon does not change") as short:
        site.train(DATASET, FEATURES, LABEL, **{**train, "epsilon": 1.0, "delta": 5e-3})  # delta beyond the grant
    assert "for a delta of at least 0.005 for training" in (short.value.refusal.hint or "")
    with hospital.http() as http:  # a layer the spec language does not have
        body = {"dataset": DATASET, "features": FEATURES, "label": LABEL, "model": {"layers": [{"type": "batch_norm"}]},
                "train": {"epsilon": 1.0, "delta": 1e-5, **SGD}}
        response = http.post("/jobs", json=body)
        assert response.status_code == 422 and "batch_norm" in response.json()["message"]
    outsider = ResearcherSite("solo", hospital.url, hospital.tokens["outsider"])
    with pytest.raises(VeilPolicyError, match="unknown_dataset"):
        outsider.train(DATASET, FEATURES, LABEL, **train)
    with pytest.raises(ValueError, match="epochs"):  # checked by the SDK before anything is sent
        site.train(DATASET, FEATURES, LABEL, **{**train, "epochs": 0})
    assert spent(hospital) == before
    assert audit.count_entries(hospital.engine) == log_before + 6  # each refusal audited, nothing else


def test_a_job_cut_off_by_a_crash_is_settled_on_restart(hospital: Deployment) -> None:
    before = spent(hospital)
    _, job = long_job(hospital, epsilon=3.0)
    recorded = wait(hospital, job.id, until=lambda j: j.epoch >= 2)
    hospital.executor.kill()
    hospital.executor.start()
    job = hospital.client().job(job.id)
    assert job.state == "failed" and "stopped while the job ran" in (job.error or "")
    assert recorded.epsilon <= job.epsilon < 3.0
    assert spent(hospital)["epsilon"] - before["epsilon"] == pytest.approx(job.epsilon, rel=1e-9)
    # its count of rows was released, its evaluation never made: that release's rho is refunded
    assert job.rows is not None and job.evaluation is None
    assert spent(hospital)["rho"] - before["rho"] == pytest.approx(release_rho(hospital))
    assert audit.verify(hospital.engine).ok
    with pytest.raises(VeilPolicyError, match="no_weights"):
        hospital.client().job_weights(job.id)


def test_encoded_labels_match_the_catalog() -> None:
    """The site's catalog declares the diagnosis classes the engine encodes (public metadata only)."""
    label = next(c for c in COLUMNS if c.name == LABEL)
    assert label.categories == CLASSES and set(FRAME[LABEL].unique()) == set(CLASSES)
    assert isinstance(FRAME, pl.DataFrame) and FRAME.height == 569


def test_a_job_past_the_time_limit_is_stopped_and_charged_for_its_steps(tmp_path: Path) -> None:
    (config,) = write_sites(tmp_path, sites=("quick",), shares=(1.0,))
    config.write_text(config.read_text().replace("[site]\n", "[site]\nmax_training_seconds = 6.0\n", 1))
    url, drop = make_database("sqlite", tmp_path)
    d = deploy(config, url, tmp_path, grants={})
    try:
        with write(d.engine) as conn:
            ledger.set_grant(conn, d.catalog, "study1", d.catalog.dataset(DATASET), 10.0, by="carol", delta=1e-4,
                             uses=("query", "training"))
        site = ResearcherSite("quick", d.url, d.tokens["researcher"])
        with pytest.warns(UserWarning, match="time_limit: the job ran past this site's limit of 6 s"):
            model = site.train(DATASET, FEATURES, LABEL, epsilon=4.0, model=ModelSpec.mlp([64, 64]), epochs=400,
                               batch_size=16, learning_rate=0.5, progress=False)
        assert model.cancelled and 0 <= model.epsilon < 4.0 and len(model.weights) > 1000
        assert spent(d)["epsilon"] == pytest.approx(model.epsilon, rel=1e-9)
        assert audit.verify(d.engine).ok
    finally:
        d.stop()
        drop()


def test_the_training_stack_loads_with_the_first_training_request(site_config: Path, tmp_path: Path) -> None:
    """An executor that only answers queries never imports PyTorch, Opacus or Flower (about 300 MB each: three
    executors fit in a Binder session); the first training request loads them."""
    import subprocess
    import sys

    code = (f"from veil.executor.site import Site\nimport sys\n"
            f"site = Site.open({str(site_config)!r}, 'sqlite:///{tmp_path / 'state.db'}')\n"
            "loaded = lambda: sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules)\n"
            "print(loaded())\nsite.trainer\nprint(loaded())\nsite.close()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "['opacus', 'torch']"]
