"""A researcher trains DP models from a notebook on the `veil` kernel (nbclient): at one site, then one
model across three sites with federated DP-SGD, against three real executors holding the breast-cancer
patients. Progress shows as the cells run, and each site's ledger is charged what its accountant spent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import Deployment, veil_kernel
from veil.executor import audit
from veil.executor.public_data import DATASET

CELLS = [
    "%veil mode live",
    "info = study.sites['north'].datasets['breast_cancer'].info\n"
    "features = [c.name for c in info.columns if c.name not in ('patient_id', 'diagnosis')]\n"
    "len(features)",
    "model = study.sites['north'].train('breast_cancer', features, 'diagnosis', epsilon=2.0, epochs=10,\n"
    "                                   batch_size=32, learning_rate=2.0)\n"
    "model",
    "model.evaluation",
    "fed = study.train('breast_cancer', features, 'diagnosis', epsilon=2.0, rounds=3, epochs=2, batch_size=24,\n"
    "                  learning_rate=2.0)\n"
    "fed",
    "{site: round(e, 3) for site, e in fed.epsilon.items()}",
    "fed.evaluation['valley']",
]


@pytest.fixture(scope="module")
def notebook_env(cancer_sites: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with veil_kernel(tmp_path_factory.mktemp("training_nb"), cancer_sites) as root:
        yield root


def epsilon_spent(d: Deployment) -> float:
    return d.spent(DATASET)["epsilon"]


def text(cell: nbformat.NotebookNode) -> str:
    return json.dumps(cell.outputs)


def test_a_researcher_trains_at_one_site_and_across_three_from_a_notebook(
        notebook_env: Path, cancer_sites: dict[str, Deployment]) -> None:
    before = {name: epsilon_spent(d) for name, d in cancer_sites.items()}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    try:
        NotebookClient(nb, kernel_name="veil", timeout=300).execute()
    finally:
        nbformat.write(nb, notebook_env / "training.ipynb")
    assert "30" in text(nb.cells[1])
    assert "TrainedModel from north" in text(nb.cells[2]) and "epoch" in text(nb.cells[2])  # tqdm's bar
    assert "accuracy" in text(nb.cells[3])
    assert "FederatedModel over 3 sites, 3 rounds" in text(nb.cells[4]) and "round" in text(nb.cells[4])
    epsilons = eval(nb.cells[5].outputs[0]["data"]["text/plain"])  # noqa: S307 - our own notebook's dict
    assert set(epsilons) == set(cancer_sites) and all(0 < e <= 2.0 for e in epsilons.values())
    assert "accuracy" in text(nb.cells[6])
    spent = {name: epsilon_spent(d) - before[name] for name, d in cancer_sites.items()}
    # north trained twice (alone, then in the study); every site is charged what its accountant said
    assert spent["north"] == pytest.approx(float(text(nb.cells[2]).split("epsilon ")[1].split(" ")[0])
                                           + epsilons["north"], abs=6e-3)
    for name in ("central", "valley"):
        assert spent[name] == pytest.approx(epsilons[name], abs=1e-3)
    for d in cancer_sites.values():
        assert audit.verify(d.engine).ok
