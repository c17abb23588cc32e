"""The researcher SDK against three real executors: single-site and multi-center releases, the
builder, typed refusals, and a site that is down."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from conftest import SITES, Deployment, write_study
from veil.executor import ledger
from veil.executor.store import write
from veil.kernel import (
    VeilAuthError,
    VeilBudgetError,
    VeilConfigError,
    VeilPolicyError,
    VeilSiteUnavailable,
    VeilUsageError,
    col,
    count,
    load_study,
)
from veil.kernel.result import Result
from veil.kernel.sdk import VeilPartialFailure
from veil.kernel.study import Study
from veil.query.accounting import epsilon_of, rho_for_epsilon

SURE = 0.9999  # checks of the truth against an interval: a false alarm once in 10,000 runs at most


@pytest.fixture(scope="module")
def study(sites: dict[str, Deployment], tmp_path_factory: pytest.TempPathFactory) -> Study:
    return load_study(write_study(tmp_path_factory.mktemp("study"), sites))


def truth(sites: dict[str, Deployment], dataset: str) -> pl.DataFrame:
    """The pooled raw data (tests play the data owner here, to know the true answer)."""
    return pl.concat([pl.read_parquet(d.catalog.dataset(dataset).path) for d in sites.values()])


def test_study_sites_and_public_metadata(study: Study, sites: dict[str, Deployment]) -> None:
    assert list(study.sites) == list(SITES)
    assert study.datasets() == {"patients": list(SITES), "encounters": list(SITES)}
    assert {p.name for p in study.guarded_paths()} == set(SITES)
    patients = study.sites["north"].datasets["patients"]
    assert patients.level == "L1" and patients.schema["age"] == pl.Int64
    assert "F, M" in patients.metadata.filter(pl.col("column") == "sex")["categories"][0]


def test_single_site_sql_release_is_a_frame_with_intervals_and_renders(study: Study) -> None:
    ds = study.sites["north"].datasets["patients"]
    result = ds.sql("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex").release(epsilon=0.5)
    assert isinstance(result, Result)
    assert result.df.columns == ["sex", "n", "n_lower", "n_upper", "level"]
    assert result.df["level"].to_list() == [0.95, 0.95]
    assert result.cost["north"]["epsilon"] == pytest.approx(0.5, rel=1e-6) and len(result.receipt) == 64
    page = result._repr_html_()
    assert "site north" in page and result.receipt[:16] in page and "<table>" in page and "[" in page


def test_builder_compiles_to_the_same_spec_as_sql(study: Study) -> None:
    ds = study.sites["central"].datasets["encounters"]
    built = ds.filter((col("length_of_stay_days") >= 2) & col("department").is_in(["icu", "oncology"])) \
        .group_by("department").agg(count().alias("n"), col("crp_mg_l").mean().alias("crp"))
    written = ds.sql("SELECT department, COUNT(*) AS n, AVG(crp_mg_l) AS crp FROM encounters "
                     "WHERE length_of_stay_days >= 2 AND department IN ('icu', 'oncology') GROUP BY department")
    assert built.spec() == written.spec()
    result = built.release(epsilon=1.0)
    assert sorted(result.df["department"].to_list()) == sorted(ds.info.columns[2].categories or [])


def test_multi_center_count_is_the_sum_of_site_releases_and_covers_the_truth(
        study: Study, sites: dict[str, Deployment]) -> None:
    combined = study.dataset("encounters").filter(col("department") == "genetics").agg(count().alias("n")) \
        .release(epsilon=1.0, confidence=SURE)
    assert isinstance(combined, Result) and set(combined.results) == set(SITES) == set(combined.receipts)
    raw = [r.raw.row(0, named=True) for r in combined.results.values()]
    row = combined.rows[0]
    assert combined.raw.row(0, named=True)["n"] == sum(r["n"] for r in raw)  # raw values add up
    assert row["n_lower"] <= row["n"] <= row["n_upper"] and row["n_lower"] >= 0
    # each site is asked at the study's level; the combined interval comes from the sites' noise scales
    assert all(r.release.confidence == SURE for r in combined.results.values())
    scale = sum(r.release.statistics[0].scale ** 2 for r in combined.results.values()) ** 0.5
    narrowest_union = sum(r.release.statistics[0].accuracy for r in combined.results.values())
    assert row["n_upper"] - row["n_lower"] <= 2 * 4 * scale < 2 * narrowest_union
    true_n = truth(sites, "encounters").filter(pl.col("department") == "genetics").height
    assert row["n_lower"] <= true_n <= row["n_upper"]
    assert set(combined.cost) == set(SITES) and all(c["epsilon"] > 0 for c in combined.cost.values())


def test_multi_center_mean_pools_dp_sums_and_counts(study: Study, sites: dict[str, Deployment]) -> None:
    combined = study.dataset("encounters").sql("SELECT AVG(hemoglobin_g_dl) AS hb FROM encounters") \
        .release(epsilon=1.0, confidence=SURE)
    parts = [r.raw.row(0, named=True) for r in combined.results.values()]
    pooled = sum(p["hb__sum"] for p in parts) / sum(p["hb__count"] for p in parts)
    row = combined.rows[0]
    assert combined.raw.row(0, named=True)["hb"] == pytest.approx(pooled)
    assert row["hb_lower"] <= row["hb"] <= row["hb_upper"]
    assert row["hb"] == pytest.approx(min(max(pooled, row["hb_lower"]), row["hb_upper"]))
    assert row["hb_lower"] <= truth(sites, "encounters")["hemoglobin_g_dl"].mean() <= row["hb_upper"]


def test_multi_center_histogram_merges_site_keys(study: Study, sites: dict[str, Deployment]) -> None:
    combined = study.dataset("patients").group_by("region").agg(count().alias("n")).release(epsilon=1.0)
    regions = {r for d in sites.values() for r in d.catalog.dataset("patients").column("region").categories}
    assert {r["region"] for r in combined.rows} == regions
    assert "3 sites combined" in combined._repr_html_()


def test_quantiles_are_not_combined_and_nothing_is_spent(study: Study) -> None:
    before = [g.rho_spent for s in study.sites.values() for g in s.budget()]
    with pytest.raises(Exception, match="cannot be combined across sites"):
        study.dataset("patients").sql("SELECT MEDIAN(age) FROM patients").release(epsilon=0.5)
    assert [g.rho_spent for s in study.sites.values() for g in s.budget()] == before


def test_refusals_raise_typed_errors_that_say_what_to_do(study: Study, sites: dict[str, Deployment]) -> None:
    ds = study.sites["valley"].datasets["patients"]
    with pytest.raises(VeilPolicyError, match="no column 'weight'.*What to do: columns are"):
        ds.agg(col("weight").mean()).release(epsilon=0.1)
    with pytest.raises(VeilPolicyError, match="epsilon_above_level.*What to do: ask for epsilon <= 1"):
        ds.agg(count()).release(rho=5.0)
    valley = sites["valley"]
    delta = valley.catalog.reporting_delta
    with write(valley.engine) as conn:  # a steward lowers the cap to half a release above what is spent
        spent = next(b for b in ledger.budgets(valley.engine, valley.catalog) if b.dataset == "patients").spent_rho
        cap = epsilon_of(spent + rho_for_epsilon(1.0, delta) / 2, delta)
        ledger.set_cap(conn, valley.catalog, valley.catalog.dataset("patients"), cap, "carol", "test")
    try:
        with pytest.raises(VeilBudgetError, match="site-wide budget cannot cover it") as budget:
            ds.agg(count()).release(epsilon=1.0)
    finally:
        with write(valley.engine) as conn:
            ledger.set_cap(conn, valley.catalog, valley.catalog.dataset("patients"), 10.0, "carol", "test")
    assert budget.value.refusal.remaining is not None and budget.value.site == "valley"


def test_bad_token_is_an_auth_error(sites: dict[str, Deployment], tmp_path: Path) -> None:
    write_study(tmp_path, {"north": sites["north"]})
    (tmp_path / "north.token").write_text("veil_0123456789abcdef_" + "x" * 43)
    study = load_study(tmp_path / "study.toml")
    with pytest.raises(VeilAuthError, match="invalid_token"):
        _ = study.sites["north"].datasets


def test_a_site_that_is_down_is_named_and_other_releases_are_kept(
        sites: dict[str, Deployment], tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, sites))
    encounters = study.dataset("encounters")  # metadata read while all sites answer
    sites["valley"].executor.stop()
    try:
        with pytest.raises(VeilPartialFailure) as partial:
            encounters.agg(count()).release(epsilon=0.2)
    finally:
        sites["valley"].executor.start()
    assert set(partial.value.results) == {"north", "central"}
    assert isinstance(partial.value.errors["valley"], VeilSiteUnavailable)
    assert "valley" in str(partial.value) and "kept" in str(partial.value)


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(VeilConfigError, match=str(tmp_path / "absent.toml")):
        load_study(tmp_path / "absent.toml")
    (tmp_path / "study.toml").write_text('[study]\nproject = "p"\n[sites.a]\nurl = "http://x"\ntoken_file = "a.tok"\n')
    with pytest.raises(VeilConfigError, match="token file of site 'a'"):
        load_study(tmp_path / "study.toml")


def test_mock_mode_spends_nothing_and_predicts_the_live_cost(study: Study, sites: dict[str, Deployment]) -> None:
    ds = study.dataset("encounters")
    mock = ds.mock(50)
    assert mock.schema == ds.schema and mock["hemoglobin_g_dl"].is_between(4.0, 20.0).all()
    query = ds.sql("SELECT department, COUNT(*) AS n, AVG(crp_mg_l) AS crp FROM encounters GROUP BY department")
    before = {name: d.client("researcher").grants() for name, d in sites.items()}
    study.mode = "mock"
    try:
        rehearsal = query.release(epsilon=0.3)
    finally:
        study.mode = "live"
    assert all(r.mock for r in rehearsal.results.values()) and "MOCK" in next(iter(
        rehearsal.results.values()))._repr_html_()
    assert {name: d.client("researcher").grants() for name, d in sites.items()} == before
    live = query.release(epsilon=0.3)
    assert {s: c["rho"] for s, c in rehearsal.cost.items()} == pytest.approx(
        {s: c["rho"] for s, c in live.cost.items()}, rel=1e-12)


def test_a_release_without_a_loss_costs_the_default_epsilon(study: Study) -> None:
    result = study.sites["north"].datasets["patients"].sql("SELECT COUNT(*) FROM patients").release()
    assert result.cost["north"]["epsilon"] == pytest.approx(study.sites["north"].default_epsilon, rel=1e-6) == \
        pytest.approx(0.1, rel=1e-6)


def test_a_steward_token_is_refused_on_the_researcher_side(sites: dict[str, Deployment], tmp_path: Path) -> None:
    path = write_study(tmp_path, {"north": sites["north"]})
    (tmp_path / "north.token").write_text(sites["north"].tokens["steward"])
    with pytest.raises(VeilConfigError, match="carol, a steward.*researcher tokens only"):
        _ = load_study(path).sites["north"].datasets


def test_accuracy_on_request_at_a_site_and_across_sites(study: Study, sites: dict[str, Deployment]) -> None:
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    query = study.sites["north"].datasets["patients"].sql(sql)
    study.mode = "mock"
    try:
        rehearsal = query.release(accuracy=20.0)
    finally:
        study.mode = "live"
    live = query.release(accuracy=20.0)
    assert isinstance(live, Result) and live.release.statistics[0].accuracy <= 20.0
    assert live.cost["north"]["rho"] == pytest.approx(rehearsal.cost["north"]["rho"], rel=1e-12)  # priced exactly
    assert all(r["n_upper"] - r["n_lower"] <= 40.0 for r in live.release.rows)
    combined = study.dataset("patients").sql(sql).release(accuracy=60.0, confidence=SURE)
    assert combined.sites == list(SITES)
    true = truth(sites, "patients").group_by("sex").len()
    for row in combined.rows:  # the combined half-width is the one asked for, not each site's
        assert row["n_upper"] - row["n_lower"] <= 120.0 + 1e-9
        assert row["n_lower"] <= true.filter(pl.col("sex") == row["sex"])["len"][0] <= row["n_upper"]
    with pytest.raises(Exception, match="accuracy on a study applies to counts and sums"):
        study.dataset("encounters").sql("SELECT AVG(crp_mg_l) AS crp FROM encounters").release(accuracy=1.0)
    with pytest.raises(VeilPolicyError, match="epsilon_above_level.*a half-width of 3 at 95% needs epsilon"):
        query.release(accuracy=3.0)
    with pytest.raises(VeilPolicyError, match="accuracy_unreachable.*What to do: ask for a half-width of at least 1"):
        query.release(accuracy=0.5)


def test_one_result_type_for_one_site_and_for_several(study: Study) -> None:
    sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    one = study.sites["north"].datasets["patients"].sql(sql).release(epsilon=0.3)
    several = study.dataset("patients").sql(sql).release(epsilon=0.3)
    for result in (one, several):
        assert type(result) is Result and result.dataset == "patients"
        assert result.df.columns == ["sex", "n", "n_lower", "n_upper", "level"] and len(result.rows) == 2
        assert result.raw.columns == ["sex", "n"] and result.statistics == ["n"] and result.confidence == 0.95
        assert list(result.cost) == list(result.receipts) == list(result.results) == result.sites
        bundle, metadata = result._repr_mimebundle_()
        assert bundle["text/html"].startswith("<p>") and "<table>" in bundle["text/html"]
        assert [p["receipt"] for p in metadata["veil"]["releases"]] == list(result.receipts.values())
        assert all(r.release.site == site for site, r in result.results.items())
    assert one.results == {"north": one} and one.receipt == one.receipts["north"]
    assert any("exact 95% intervals" in note for note in several.notes)
    with pytest.raises(VeilUsageError, match="combines 3 sites' releases: read one with .results"):
        several.release  # noqa: B018


def test_a_release_note_is_shown_with_the_result(study: Study) -> None:
    release = study.sites["north"].datasets["patients"].sql("SELECT COUNT(*) AS n FROM patients") \
        .release(epsilon=0.3).release
    noted = Result.of(release.model_copy(update={"notes": ["rows were truncated to at most 1 per patient"]}))
    assert "<i>rows were truncated to at most 1 per patient</i>" in noted._repr_html_()
    assert "note: rows were truncated" in repr(noted)
