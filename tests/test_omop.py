"""A hospital's own data behind a site: OMOP CDM synthesis (Parquet and PostgreSQL), its drafted catalog, and
`veil site init` drafting a catalog from a schema, refused by the executor until the steward declares every
TODO. Real executors over loopback, the real PostgreSQL when `.ci/run` names it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import POSTGRES_URL, _postgres_database, deploy, make_database
from veil.errors import CatalogError
from veil.executor.catalog import check_data_matches, load_catalog
from veil.executor.omop import CONDITIONS, MI, SITES, TABLES

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="needs PostgreSQL: set VEIL_TEST_POSTGRES_URL")


def veil(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def omop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("omop")
    veil("data", "synth", "--format", "omop", "--out", str(out), "--patients", "1500", "--seed", "3")
    return out


def test_the_synthetic_cdm_matches_its_drafted_catalog(omop: Path) -> None:
    for site in SITES:
        catalog = load_catalog(omop / site / "site.toml")
        assert set(catalog.datasets) == set(TABLES)
        for dataset in catalog.datasets.values():
            check_data_matches(dataset)  # dtypes, columns and non-nullable columns agree with the files
            assert dataset.privacy_unit == "person_id"
            most = pl.read_parquet(dataset.path).group_by("person_id").len()["len"].max()
            assert most is not None and most <= dataset.max_rows_per_unit  # the proposed bounds hold
        conditions = catalog.dataset("condition_occurrence").column("condition_concept_id")
        assert conditions.categories == tuple(CONDITIONS)  # public keys from the vocabulary, not the data


def test_a_cohort_count_by_condition_concept(omop: Path, tmp_path: Path) -> None:
    url, _ = make_database("sqlite", tmp_path)
    d = deploy(omop / "north" / "site.toml", url, tmp_path, {"condition_occurrence": 5.0})
    try:
        release = d.client().query(sql="SELECT condition_concept_id, COUNT(*) AS n FROM condition_occurrence "
                                       "GROUP BY condition_concept_id", epsilon=1.0,
                                   confidence=0.9999)  # several 95% intervals: one would miss often
    finally:
        d.stop()
    truth = dict(pl.read_parquet(omop / "north" / "condition_occurrence.parquet")
                 .group_by("condition_concept_id").len().iter_rows())
    got = {row["condition_concept_id"]: row for row in release.rows}
    assert set(got) == set(CONDITIONS)
    for concept, row in got.items():  # 6 rows per person at most: wide, but each interval covers the truth
        assert row["n_lower"] - 20 <= truth.get(concept, 0) <= row["n_upper"] + 20
    assert truth[MI] > 0


@needs_postgres
def test_a_cdm_in_postgresql_is_served_from_snapshots(tmp_path: Path) -> None:
    db, drop = _postgres_database()
    try:
        url = db.replace("+psycopg", "")
        veil("data", "synth", "--format", "omop", "--out", str(tmp_path / "cdm"), "--patients", "400",
             "--database-url", url)
        config = tmp_path / "cdm" / "valley" / "site.toml"
        raw = config.read_text()
        assert 'table = "cdm_valley.person"' in raw and not (tmp_path / "cdm" / "valley" / "person.parquet").exists()
        state, _ = make_database("sqlite", tmp_path)
        d = deploy(config, state, tmp_path, {"person": 5.0})
        try:
            release = d.client().query(sql="SELECT gender_concept_id, COUNT(*) AS n FROM person "
                                           "GROUP BY gender_concept_id", epsilon=1.0)
        finally:
            d.stop()
        assert {r["gender_concept_id"] for r in release.rows} == {8507, 8532}
        assert any("cdm_valley.person" in note for note in release.notes)
        # the same CDM drafted by `veil site init --omop` names the schema and an environment variable, no URL
        veil("site", "init", "--omop", "--schema", "cdm_valley", "--persons-bound", "600", "--site", "valley",
             "--out", str(tmp_path / "init" / "site.toml"))
        drafted = (tmp_path / "init" / "site.toml").read_text()
        assert 'url_env = "VEIL_OMOP_URL"' in drafted and "postgresql://" not in drafted
    finally:
        drop()


def test_site_init_drafts_from_a_schema_and_the_executor_refuses_its_todos(omop: Path, tmp_path: Path) -> None:
    rows = pl.read_parquet(omop / "central" / "measurement.parquet")
    rows.with_columns(pl.col("person_id").cast(pl.UInt32), pl.col("value_as_number").cast(pl.Float32)).write_parquet(
        tmp_path / "labs.parquet")  # dtypes a catalog maps: read as Int64 and Float64
    printed = veil("site", "init", "--from", str(tmp_path / "labs.parquet"), "--out", str(tmp_path / "site.toml"),
                   "--site", "central")
    assert "TODO(s)" in printed
    text = (tmp_path / "site.toml").read_text()
    assert "the file's UInt32, read as Int64" in text and "(is it 'person_id'?)" in text
    with pytest.raises(CatalogError, match="TODO") as refused:
        load_catalog(tmp_path / "site.toml")
    assert "datasets.labs.privacy_unit" in refused.value.message
    assert "datasets.labs.columns.value_as_number.bounds" in refused.value.message
    # the steward declares each fact (here from the OMOP catalog's public metadata)
    text = re.sub(r'^description = "TODO[^\n]*', 'description = "declared"', text, flags=re.M)
    text = re.sub(r'^(bounds|categories) = "TODO[^\n]*\n', "", text, flags=re.M)
    text = (text.replace('level = "TODO', 'level = "L2" # "TODO', 1)
            .replace('privacy_unit = "TODO', 'privacy_unit = "person_id" # "TODO', 1)
            .replace('max_rows_per_unit = "TODO', 'max_rows_per_unit = 80 # "TODO', 1)
            .replace('max_rows = "TODO', 'max_rows = 1000000 # "TODO', 1)
            .replace("[datasets.labs.columns.value_as_number]\n",
                     "[datasets.labs.columns.value_as_number]\nbounds = [0.0, 300.0]\n"))
    (tmp_path / "site.toml").write_text(text)
    catalog = load_catalog(tmp_path / "site.toml")
    check_data_matches(catalog.dataset("labs"))
    url, _ = make_database("sqlite", tmp_path)
    d = deploy(tmp_path / "site.toml", url, tmp_path, {"labs": 5.0})
    try:
        release = d.client().query(sql="SELECT COUNT(*) AS n, SUM(value_as_number) AS total FROM labs "
                                       "WHERE measurement_concept_id = 3004249", epsilon=1.0,
                                   confidence=0.9999)  # a 95% interval misses the truth in 1 run of 20
    finally:
        d.stop()
    systolic = rows.filter(pl.col("measurement_concept_id") == 3004249)
    row = release.rows[0]
    assert row["n_lower"] - 50 <= systolic.height <= row["n_upper"] + 50
    assert row["total_lower"] - 5e4 <= systolic["value_as_number"].sum() <= row["total_upper"] + 5e4
