"""Tests for the synthetic cohort generator (veil.executor.synth)."""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from veil.executor.catalog import Catalog, check_data_matches, load_catalog
from veil.executor.synth import MAX_ENCOUNTERS, RARE_CODES, SIZE_SPREAD, synthesize

PATIENTS = 3000
SEED = 11


def _read(catalog: Catalog) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (pl.read_parquet(catalog.dataset("patients").path),
            pl.read_parquet(catalog.dataset("encounters").path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Catalog, pl.DataFrame, pl.DataFrame]]:
    paths = synthesize(tmp_path_factory.mktemp("cohort"), sites=3, patients=PATIENTS, seed=SEED)
    out = {}
    for path in paths:
        catalog = load_catalog(path)
        out[catalog.site] = (catalog, *_read(catalog))
    return out


def test_writes_named_sites(tmp_path: Path) -> None:
    paths = synthesize(tmp_path, sites=5, patients=200, seed=0)
    assert [p.parent.name for p in paths] == ["north", "central", "valley", "site4", "site5"]
    for p in paths:
        assert p.name == "site.toml" and p.is_file()
        assert (p.parent / "patients.parquet").is_file() and (p.parent / "encounters.parquet").is_file()
        assert load_catalog(p).site == p.parent.name


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", sites=2, patients=500, seed=3)
    b = synthesize(tmp_path / "b", sites=2, patients=500, seed=3)
    c = synthesize(tmp_path / "c", sites=2, patients=500, seed=4)
    for pa, pb, pc in zip(a, b, c):
        for name in ("patients.parquet", "encounters.parquet", "site.toml"):
            assert (pa.parent / name).read_bytes() == (pb.parent / name).read_bytes()
        fa, fb, fc = (pl.read_parquet(p.parent / "encounters.parquet") for p in (pa, pb, pc))
        assert fa.equals(fb)
        assert not fa.equals(fc)
        # Public metadata does not depend on the draw: same catalog text for another seed.
        assert pa.read_text() == pc.read_text()


def test_catalog_loads_and_matches_data(cohort) -> None:
    for site, (catalog, patients, encounters) in cohort.items():
        assert catalog.site == site
        assert catalog.database_url.startswith("sqlite:///")
        for dataset in catalog.datasets.values():
            check_data_matches(dataset)
        p, e = catalog.dataset("patients"), catalog.dataset("encounters")
        assert (p.level, p.max_rows_per_unit, p.privacy_unit) == ("L1", 1, "patient_id")
        assert (e.level, e.max_rows_per_unit, e.privacy_unit) == ("L2", MAX_ENCOUNTERS, "patient_id")
        assert list(p.columns) == patients.columns and list(e.columns) == encounters.columns
        assert p.max_rows >= 2 * patients.height and e.max_rows >= 2 * encounters.height
        assert e.column("crp_mg_l").nullable and e.column("wbc_10e9_l").nullable
        assert not e.column("hemoglobin_g_dl").nullable
        assert e.column("encounter_date").dtype == "Date" and e.column("encounter_date").bounds is None


def test_values_within_declared_metadata(cohort) -> None:
    for catalog, patients, encounters in cohort.values():
        pairs = ((patients, catalog.dataset("patients")), (encounters, catalog.dataset("encounters")))
        for frame, dataset in pairs:
            for col in dataset.columns.values():
                s = frame[col.name]
                if not col.nullable:
                    assert s.null_count() == 0, col.name
                if col.bounds is not None:
                    assert col.bounds[0] <= s.min() and s.max() <= col.bounds[1], col.name
                if col.categories is not None:
                    assert s.drop_nulls().is_in(list(col.categories)).all(), col.name
        dates = encounters["encounter_date"]
        assert dates.dtype == pl.Date
        assert date(2015, 1, 1) <= dates.min() and dates.max() <= date(2025, 12, 31)
        enrolled = encounters.join(patients, on="patient_id").select(
            (pl.col("encounter_date").dt.year() >= pl.col("enrolled_year")).all()).item()
        assert enrolled  # no encounter before the enrolment year


def test_ids_and_encounter_counts(cohort) -> None:
    all_ids: set[int] = set()
    for _catalog, patients, encounters in cohort.values():
        ids = patients["patient_id"]
        assert ids.n_unique() == patients.height
        assert all_ids.isdisjoint(ids.to_list())
        all_ids.update(ids.to_list())
        assert encounters["patient_id"].is_in(ids.implode()).all()
        per = encounters.group_by("patient_id").len()
        assert per.height == patients.height  # everybody has at least one encounter
        assert per["len"].min() >= 1 and per["len"].max() <= MAX_ENCOUNTERS
        n = patients.height
        assert (1 - SIZE_SPREAD) * PATIENTS - 1 <= n <= (1 + SIZE_SPREAD) * PATIENTS + 1


def test_null_fractions(cohort) -> None:
    for _, _, encounters in cohort.values():
        crp = encounters["crp_mg_l"].null_count() / encounters.height
        wbc = encounters["wbc_10e9_l"].null_count() / encounters.height
        assert 0.10 <= crp <= 0.22
        assert 0.06 <= wbc <= 0.15


def _summary(patients: pl.DataFrame, encounters: pl.DataFrame) -> dict[str, float]:
    return {
        "per_patient": encounters.height / patients.height,
        "rare": float((patients["rare_disease"] != "none").mean()),
        "age": float(patients["age"].mean()),
        "transferred": float((encounters["outcome"] == "transferred").mean()),
    }


def test_sites_differ(cohort) -> None:
    north, central, valley = (_summary(*cohort[s][1:]) for s in ("north", "central", "valley"))
    assert north["per_patient"] > central["per_patient"] > valley["per_patient"]
    assert 3.5 <= valley["per_patient"] and north["per_patient"] <= 8.5
    assert north["rare"] > central["rare"] > valley["rare"]
    assert valley["age"] < north["age"] - 0.5
    assert valley["transferred"] > north["transferred"]
    regions = {site: set(p["region"].unique()) for site, (_, p, _) in cohort.items()}
    assert regions["north"].isdisjoint(regions["valley"])


def test_clinical_correlations(cohort) -> None:
    _, patients, encounters = cohort["north"]
    joined = encounters.join(patients.select("patient_id", "rare_disease"), on="patient_id")
    rare = joined["rare_disease"] != "none"
    crp = joined.group_by("icd10").agg(pl.col("crp_mg_l").median()).to_dict(as_series=False)
    crp = dict(zip(crp["icd10"], crp["crp_mg_l"]))
    assert crp["J18.9"] > 3 * crp["J06.9"]
    hb = joined.group_by("icd10").agg(pl.col("hemoglobin_g_dl").mean()).to_dict(as_series=False)
    hb = dict(zip(hb["icd10"], hb["hemoglobin_g_dl"]))
    assert hb["D61.0"] < hb["J06.9"] - 2
    counts = joined.group_by("patient_id", "rare_disease").len()
    rare_mean = counts.filter(pl.col("rare_disease") != "none")["len"].mean()
    assert rare_mean > 1.5 * counts.filter(pl.col("rare_disease") == "none")["len"].mean()
    genetics = joined["department"].is_in(["genetics", "neurology"])
    assert (genetics & rare).sum() / rare.sum() > 2 * (genetics & ~rare).sum() / (~rare).sum()
    # A patient's rare-disease code appears only on their own encounters.
    coded = joined.filter(pl.col("icd10").is_in(RARE_CODES))
    assert coded.height > 0 and (coded["icd10"] == coded["rare_disease"]).all()
    # Nobody has an encounter after one where they died.
    last = encounters.group_by("patient_id").agg(pl.col("outcome").last(), pl.len())
    deaths = encounters.filter(pl.col("outcome") == "deceased")["patient_id"]
    assert deaths.n_unique() == deaths.len()
    assert last.filter(pl.col("patient_id").is_in(deaths.implode()))["outcome"].eq("deceased").all()


@pytest.mark.slow
def test_a_million_encounters_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    (path,) = synthesize(tmp_path, sites=1, patients=160_000, seed=1)
    elapsed = time.perf_counter() - start
    rows = pl.scan_parquet(path.parent / "encounters.parquet").select(pl.len()).collect().item()
    assert rows >= 700_000
    assert elapsed < 20, f"{rows} encounter rows took {elapsed:.1f} s"
