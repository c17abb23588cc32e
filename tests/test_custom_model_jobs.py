"""A custom `nn.Module` trained at a site only as its reviewers approved it: the source travels in the
application, the steward reads and approves it, and training jobs may then use exactly that source.
At the site it is traced in the sandbox, where the site's data directories are hidden, so even
approved code that tries to read the data finds nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import Deployment, deploy, make_database
from veil.executor import audit
from veil.executor.features import encode
from veil.executor.public_data import CLASSES, DATASET, LABEL, breast_cancer_frame, write_sites
from veil.kernel.errors import VeilError, VeilPolicyError
from veil.kernel.sdk import Site as ResearcherSite
from veil.models.spec import ModelSpec

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
FEATURES = [c.name for c in breast_cancer_frame()[1] if c.bounds is not None]
SOURCE = """
class Net(nn.Module):
    def __init__(self, inputs, outputs):
        super().__init__()
        self.hidden = nn.Linear(inputs, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16 + inputs, outputs)

    def forward(self, x):
        h = self.norm(torch.tanh(self.hidden(x)))
        return self.head(torch.cat([h, x], dim=1))   # a skip connection from the inputs
"""
TRAIN = {"epsilon": 2.0, "delta": 1e-5, "epochs": 8, "batch_size": 32, "learning_rate": 1.0,
         "evaluation_epsilon": 1.0, "progress": False}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("custom")
    (config,) = write_sites(root, sites=("solo",), shares=(1.0,))
    url, drop = make_database("sqlite", root)
    d = deploy(config, url, root, grants={})
    d.approve_training(DATASET, 12.0)  # training approved, but no model source in that application
    yield d
    d.stop()
    drop()


def apply_with_source(d: Deployment, source: str) -> None:
    """The researcher applies to train with `source`; the steward reads it (`--details`) and approves."""
    site = ResearcherSite("solo", d.url, d.tokens["researcher"])
    app = site.apply("A diagnosis-support model with a custom architecture", [DATASET], epsilon=12.0, delta=1e-4,
                     duration_days=30, uses=["query", "training"], model_source=source)
    assert app.status == "pending" and app.request.model_source == source
    with d.http("steward") as http:
        review = {"decision": "approve", "comment": "architecture read: per-row layers only", "version": 1,
                  "on_existing_grant": "replace"}
        assert http.post(f"/applications/{app.id}/reviews", json=review).json()["status"] == "approved"


def charged(d: Deployment) -> float:
    return d.spent(DATASET)["epsilon"]


def test_an_approved_custom_model_trains_and_any_other_source_is_refused(hospital: Deployment) -> None:
    site = ResearcherSite("solo", hospital.url, hospital.tokens["researcher"])
    with pytest.raises(VeilError, match="model_source_not_approved"):  # the approved application names no source
        site.train(DATASET, FEATURES, LABEL, model=ModelSpec.custom(SOURCE), **TRAIN)
    apply_with_source(hospital, SOURCE)
    before = charged(hospital)
    edited = SOURCE.replace("16", "32")
    with pytest.raises(VeilPolicyError, match="not the one an approved application"):  # edited after approval
        site.train(DATASET, FEATURES, LABEL, model=ModelSpec.custom(edited), **TRAIN)
    assert charged(hospital) == before

    model = site.train(DATASET, FEATURES, LABEL, model=ModelSpec.custom(SOURCE), **TRAIN)
    assert model.job.state == "done" and 1.0 < model.epsilon <= 2.0
    assert charged(hospital) - before == pytest.approx(model.epsilon, rel=1e-9)
    module = model.module()  # rebuilt on the researcher's side from the same checked trace
    names = {name for name, _ in module.named_parameters()}
    assert names == {"hidden.weight", "hidden.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    frame, columns = breast_cancer_frame()  # public data: scored on every patient, for this test only
    everyone = encode(frame, label=LABEL, numeric={c.name: c.bounds for c in columns if c.bounds}, classes=CLASSES)
    with torch.no_grad():
        accuracy = float((module(everyone.x).argmax(dim=1) == everyone.y).float().mean())
    assert accuracy > 0.85, accuracy
    assert audit.verify(hospital.engine).ok


def test_approved_code_cannot_read_the_sites_data(hospital: Deployment, tmp_path: Path) -> None:
    """Even if reviewers miss it, code that opens the dataset from native torch finds an empty directory."""
    path = hospital.catalog.dataset(DATASET).path
    assert path.read_bytes()[:4] == b"PAR1"
    thief = f"""
stolen = torch.from_file({str(path)!r}, size=64, dtype=torch.uint8)
raise ValueError(bytes(stolen.tolist()))

class Net(nn.Module):
    def __init__(self, inputs, outputs):
        super().__init__()
        self.head = nn.Linear(inputs, outputs)

    def forward(self, x):
        return self.head(x)
"""
    apply_with_source(hospital, thief)
    site = ResearcherSite("solo", hospital.url, hospital.tokens["researcher"])
    before = charged(hospital)
    with pytest.raises(VeilError, match="bad_model_source") as refused:
        site.train(DATASET, FEATURES, LABEL, model=ModelSpec.custom(thief), **TRAIN)
    assert "PAR1" not in str(refused.value) and "No such file" in str(refused.value)
    assert charged(hospital) == before
