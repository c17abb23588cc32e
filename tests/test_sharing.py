"""Each dataset's sharing model, enforced by real executors: an open dataset answers every project and has a
published DP statistics sheet (charged to its lifetime cap, audited, downloadable with any token), a controlled
one behaves as before, an enclave refuses every query release (audited, nothing charged) and still trains; the
catalog refuses an open L2 dataset, and mock mode refuses what the site refuses."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from IPython.core.interactiveshell import InteractiveShell
from sqlalchemy import Engine, select

from conftest import BACKENDS, Deployment, deploy, make_database, write_study
from veil.cli import main as veil
from veil.errors import CatalogError, QueryError
from veil.executor import audit
from veil.executor.catalog import load_catalog
from veil.executor.public_data import DATASET, LABEL, breast_cancer_frame, write_sites
from veil.executor.store import caps
from veil.kernel.errors import VeilAuthError, VeilPolicyError
from veil.kernel.magics import VeilMagics
from veil.kernel.mock import MockSite
from veil.kernel.sdk import RELEASE_LISTENERS
from veil.kernel.sdk import Site as ResearcherSite
from veil.kernel.study import load_study
from veil.query.accounting import rho_for_epsilon
from veil.wire import QuerySpec

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
COUNT = "SELECT COUNT(*) AS n FROM {}"


def sharing_config(site_config: Path, name: str, **sharing: str) -> Path:
    """A copy of the site's catalog (beside it, so that its relative paths hold) with these datasets' `sharing`."""
    raw = tomllib.loads(site_config.read_text())
    for dataset, model in sharing.items():
        raw["datasets"][dataset]["sharing"] = model
    path = site_config.with_name(f"site-{name}.toml")
    path.write_text(tomli_w.dumps(raw))
    return path


def cap_rho(engine: Engine, dataset: str) -> float:
    with engine.connect() as conn:
        return float(conn.execute(select(caps.c.rho_spent).where(caps.c.dataset == dataset)).scalar_one())


# ---------------------------------------------------------------- the catalog


def test_the_catalog_refuses_an_open_dataset_above_l1(site_config: Path) -> None:
    with pytest.raises(CatalogError, match="an L2 dataset cannot be open.*only L1 allows") as refused:
        load_catalog(sharing_config(site_config, "open-l2", encounters="open"))
    assert refused.value.code == "bad_catalog" and "controlled" in (refused.value.hint or "")
    with pytest.raises(CatalogError, match="sharing must be one of open, controlled, enclave, not 'public'"):
        load_catalog(sharing_config(site_config, "public", patients="public"))


def test_a_catalog_without_sharing_keeps_every_dataset_controlled(site_config: Path) -> None:
    catalog = load_catalog(site_config)  # the synthetic sites' catalog names no sharing model
    assert {ds.sharing for ds in catalog.datasets.values()} == {"controlled"}
    assert catalog.datasets["patients"].info().sharing == "controlled"


# ---------------------------------------------------------------- open and controlled


@pytest.fixture(scope="module", params=BACKENDS)
def hospital(request: pytest.FixtureRequest, site_config: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Deployment]:
    """The synthetic site with its patients open (L1) and encounters controlled (L2, study1 holds a grant)."""
    state = tmp_path_factory.mktemp("sharing")
    url, drop = make_database(request.param, state)
    d = deploy(sharing_config(site_config, "open", patients="open"), url, state, grants={"encounters": 5.0})
    yield d
    d.stop()
    drop()


def test_researchers_read_each_datasets_sharing_model(hospital: Deployment) -> None:
    seen = {d.name: d.sharing for d in hospital.client("outsider").datasets()}
    assert seen == {"patients": "open"}  # other_project applied for nothing: the open dataset only
    assert {d.name: d.sharing for d in hospital.client("steward").datasets()} == {"patients": "open",
                                                                                  "encounters": "controlled"}


def test_veil_datasets_shows_each_sharing_model(hospital: Deployment, tmp_path: Path) -> None:
    shell = InteractiveShell.instance()
    shell.user_ns["study"] = load_study(write_study(tmp_path, {"north": hospital}))
    magics = VeilMagics(shell, kernel=None)
    try:
        frame = magics._datasets()
    finally:  # no kernel here: its release listener must not outlive the test (other tests release in-process)
        RELEASE_LISTENERS.remove(magics._on_release)
        shell.user_ns.pop("study")
    assert dict(zip(frame["dataset"], frame["sharing"], strict=True)) == {"patients": "open", "encounters": "controlled"}


def test_an_open_dataset_answers_a_project_without_any_application(hospital: Deployment) -> None:
    release = hospital.client("outsider").query(sql=COUNT.format("patients"), epsilon=0.2)
    assert release.project == "other_project" and release.rows[0]["n"] > 1000 and release.receipt


def test_a_controlled_dataset_is_unchanged(hospital: Deployment) -> None:
    with pytest.raises(VeilPolicyError, match="unknown_dataset"):  # no grant: as if it did not exist
        hospital.client("outsider").query(sql=COUNT.format("encounters"), epsilon=0.2)
    assert hospital.client().query(sql=COUNT.format("encounters"), epsilon=0.2).rows[0]["n"] > 1000


def test_publishing_charges_the_cap_what_the_audit_records(hospital: Deployment) -> None:
    before = cap_rho(hospital.engine, "patients")
    sheet = hospital.client("steward").publish_sheet("patients", epsilon=1.0)
    entry = audit.find(hospital.engine, sheet.receipt)
    assert entry is not None and entry.action == "publish" and entry.decision == "released"
    assert cap_rho(hospital.engine, "patients") - before == pytest.approx(entry.rho, rel=1e-12)
    assert 0 < entry.rho <= rho_for_epsilon(1.0, hospital.catalog.reporting_delta) * (1 + 1e-9)
    assert audit.verify(hospital.engine).ok

    rows, *columns = sheet.parts
    assert rows.column is None and rows.statistics == ["count"] and rows.rows[0]["count"] > 1000
    region = next(p for p in columns if p.column == "region")
    categories = hospital.catalog.datasets["patients"].columns["region"].categories
    assert [r["region"] for r in region.rows] == sorted(categories or ())  # every public category, counted
    assert "patient_id" not in {p.column for p in columns}
    for who in ("outsider", "researcher", "admin"):  # any token downloads it, for free
        assert hospital.client(who).sheet("patients") == sheet
    text = hospital.client("outsider").sheet_markdown("patients")
    assert text.startswith("# ") and "DP statistics sheet" in text and sheet.receipt in text and "### region" in text
    assert cap_rho(hospital.engine, "patients") - before == pytest.approx(entry.rho, rel=1e-12)


def test_a_steward_publishes_from_the_command_line(hospital: Deployment, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "steward.token"
    token.write_text(hospital.tokens["steward"])
    code = veil(["steward", "publish", "--dataset", "patients", "--epsilon", "0.5", "--site", hospital.url,
                 "--token-file", str(token)])
    out = capsys.readouterr().out
    assert code == 0 and "patients: published its DP statistics sheet, charged epsilon 0.5" in out
    assert "### region" in out and hospital.client("outsider").sheet("patients").epsilon == 0.5  # the latest


def test_only_stewards_publish_and_only_open_datasets(hospital: Deployment) -> None:
    before = {name: cap_rho(hospital.engine, name) for name in ("patients", "encounters")}
    with pytest.raises(VeilAuthError):
        hospital.client().publish_sheet("patients", epsilon=0.5)
    with pytest.raises(VeilPolicyError, match="not_open.*'encounters' is controlled"):
        hospital.client("steward").publish_sheet("encounters", epsilon=0.5)
    with pytest.raises(VeilPolicyError, match="not_open"):
        hospital.client().sheet("encounters")
    assert {name: cap_rho(hospital.engine, name) for name in before} == before


# ---------------------------------------------------------------- enclave


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One site holding the 569 breast-cancer patients as an enclave; study1 approved for queries and training."""
    root = tmp_path_factory.mktemp("enclave")
    (config,) = write_sites(root, sites=("solo",), shares=(1.0,))
    url, drop = make_database("sqlite", root)
    d = deploy(sharing_config(config, "enclave", **{DATASET: "enclave"}), url, root, grants={})
    d.approve_training(DATASET, 12.0)
    yield d
    d.stop()
    drop()


def test_an_enclave_refuses_every_query_and_charges_nothing(enclave: Deployment) -> None:
    before, cap_before, entries = enclave.spent(DATASET), cap_rho(enclave.engine, DATASET), \
        audit.count_entries(enclave.engine)
    with pytest.raises(VeilPolicyError, match="enclave_dataset.*releases no query results") as refused:
        enclave.client().query(sql=COUNT.format(DATASET), epsilon=0.5)
    refusal = refused.value.refusal
    assert refused.value.status == 403 and "train a model" in (refusal.hint or "") and refusal.receipt
    entry = audit.find(enclave.engine, refusal.receipt)
    assert entry is not None and entry.decision == "refused" and entry.query == COUNT.format(DATASET)
    assert (entry.reason or "").startswith("enclave_dataset")
    assert enclave.spent(DATASET) == before and cap_rho(enclave.engine, DATASET) == cap_before
    assert audit.count_entries(enclave.engine) == entries + 1 and audit.verify(enclave.engine).ok


def test_an_enclave_still_trains_under_an_approved_grant(enclave: Deployment) -> None:
    _, columns = breast_cancer_frame()
    features = [c.name for c in columns if c.bounds is not None][:5]
    site = ResearcherSite("solo", enclave.url, enclave.tokens["researcher"])
    model = site.train(DATASET, features, LABEL, epsilon=1.0, delta=1e-5, evaluation_epsilon=0.5, epochs=2,
                       batch_size=64, progress=False)
    assert model.job.state == "done" and model.evaluation is not None  # its DP evaluation too
    assert audit.verify(enclave.engine).ok


def test_mock_mode_refuses_a_query_on_an_enclave(enclave: Deployment) -> None:
    infos = enclave.client().datasets()
    assert [i.sharing for i in infos] == ["enclave"]
    with pytest.raises(QueryError, match="is an enclave") as refused:
        MockSite("solo", infos).query(QuerySpec.model_validate(
            {"dataset": DATASET, "aggregates": [{"fn": "count"}]}), epsilon=0.5)
    assert refused.value.code == "enclave_dataset"
