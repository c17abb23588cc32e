"""Datasets whose rows live in PostgreSQL (the real server `.ci/run` names): a site serves them from its own
Parquet snapshot, copied read-only, under a time limit, in the catalog's dtypes, with only the declared
columns; each release says which snapshot it used."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import psycopg
import pytest
import tomli_w

from conftest import POSTGRES_URL, Deployment, _postgres_database, deploy, make_database
from veil.errors import CatalogError
from veil.executor import snapshot
from veil.executor.catalog import load_catalog

needs_postgres = pytest.mark.skipif(not POSTGRES_URL, reason="needs PostgreSQL: set VEIL_TEST_POSTGRES_URL")


@pytest.fixture(scope="module")
def hospital_db() -> Iterator[str]:
    """A fresh PostgreSQL database (libpq URL) standing for a hospital's research database."""
    url, drop = _postgres_database()
    yield url.replace("+psycopg", "")
    drop()


def catalog_with_source(site_config: Path, out: Path, url: str, table: str, **source: object) -> Path:
    """The site's catalog with `patients` read from `table` in PostgreSQL (its snapshot under `out`)."""
    raw = tomllib.loads(site_config.read_text())
    base = site_config.parent
    raw["datasets"]["encounters"]["path"] = str(base / raw["datasets"]["encounters"]["path"])
    patients = raw["datasets"]["patients"]
    del patients["path"]
    patients["source"] = {"url": url, "table": table, **source}
    raw["site"]["audit_key"] = str(out / "audit-signing.key")
    path = out / "site.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture(scope="module")
def patients_table(hospital_db: str, site_config: Path) -> str:
    """north's patients in table research.patients, with a column the catalog does not declare."""
    frame = pl.read_parquet(site_config.parent / "patients.parquet").with_columns(national_id=pl.lit("secret"))
    with psycopg.connect(hospital_db, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA research")
    frame.write_database("research.patients", hospital_db, engine="adbc")
    return "research.patients"


@needs_postgres
def test_a_table_is_served_from_its_snapshot(site_config: Path, hospital_db: str, patients_table: str,
                                             tmp_path: Path) -> None:
    config = catalog_with_source(site_config, tmp_path, hospital_db, patients_table)
    url, _ = make_database("sqlite", tmp_path)
    d: Deployment = deploy(config, url, tmp_path, {"patients": 5.0})
    try:
        release = d.client().query(sql="SELECT COUNT(*) AS n FROM patients", epsilon=1.0)
    finally:
        d.stop()
    truth = pl.read_parquet(site_config.parent / "patients.parquet").height
    assert abs(release.rows[0]["n"] - truth) < 100
    assert any(n.startswith("data as of ") and "research.patients" in n for n in release.notes)
    taken = pl.read_parquet(tmp_path / "snapshots" / "patients.parquet")
    assert taken.height == truth and "national_id" not in taken.columns  # only the declared columns are copied
    assert taken.schema == load_catalog(config).dataset("patients").schema()


@needs_postgres
def test_the_copy_is_read_only(site_config: Path, hospital_db: str, patients_table: str, tmp_path: Path) -> None:
    with psycopg.connect(hospital_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE research.log (at timestamptz)")
        conn.execute("CREATE FUNCTION research.touch() RETURNS int LANGUAGE sql AS "
                     "'INSERT INTO research.log VALUES (now()); SELECT 1'")
        conn.execute("CREATE VIEW research.writing AS SELECT p.* FROM research.patients p, research.touch() t")
    dataset = load_catalog(catalog_with_source(site_config, tmp_path, hospital_db, "research.writing")
                           ).dataset("patients")
    with pytest.raises(CatalogError, match="read-only transaction") as refused:
        snapshot.take(dataset)
    assert refused.value.code == "source_unreadable" and "research.writing" in refused.value.message
    with psycopg.connect(hospital_db) as conn:
        assert conn.execute("SELECT count(*) FROM research.log").fetchone() == (0,)


@needs_postgres
def test_the_copy_is_time_limited(site_config: Path, hospital_db: str, patients_table: str, tmp_path: Path) -> None:
    with psycopg.connect(hospital_db, autocommit=True) as conn:
        conn.execute("CREATE VIEW research.slow AS SELECT p.* FROM research.patients p, pg_sleep(5) s")
    dataset = load_catalog(catalog_with_source(site_config, tmp_path, hospital_db, "research.slow",
                                               statement_seconds=1)).dataset("patients")
    with pytest.raises(CatalogError, match="statement timeout"):
        snapshot.take(dataset)


@needs_postgres
def test_a_value_that_does_not_fit_names_its_column(site_config: Path, hospital_db: str, patients_table: str,
                                                    tmp_path: Path) -> None:
    with psycopg.connect(hospital_db, autocommit=True) as conn:
        conn.execute("CREATE VIEW research.odd AS SELECT patient_id, 'old'::text AS age, sex, region, rare_disease, "
                     "enrolled_year FROM research.patients")  # a numeric column replaced by text
    dataset = load_catalog(catalog_with_source(site_config, tmp_path, hospital_db, "research.odd")).dataset("patients")
    with pytest.raises(CatalogError, match="column 'age'"):
        snapshot.take(dataset)


@needs_postgres
def test_source_settings_are_checked(site_config: Path, hospital_db: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for source, message in [({"table": "x; DROP TABLE y"}, "not a table name"),
                            ({"table": "t", "url_env": "VEIL_NO_SUCH_VARIABLE"}, "is not set"),
                            ({"table": "t", "url": "mysql://h/db"}, "only PostgreSQL")]:
        raw = tomllib.loads(catalog_with_source(site_config, tmp_path, hospital_db, "t").read_text())
        raw["datasets"]["patients"]["source"] = {"url": hospital_db, **source}
        if "url_env" in source:
            del raw["datasets"]["patients"]["source"]["url"]
        (tmp_path / "site.toml").write_text(tomli_w.dumps(raw))
        with pytest.raises(CatalogError, match=message):
            load_catalog(tmp_path / "site.toml")
    monkeypatch.setenv("VEIL_OMOP_URL", hospital_db)
    raw["datasets"]["patients"]["source"] = {"url_env": "VEIL_OMOP_URL", "table": "research.patients"}
    (tmp_path / "site.toml").write_text(tomli_w.dumps(raw))
    assert load_catalog(tmp_path / "site.toml").dataset("patients").source.url == hospital_db  # type: ignore[union-attr]


def test_a_file_that_breaks_its_catalog_is_named_column_by_column(site_config: Path, tmp_path: Path) -> None:
    """Not PostgreSQL-specific, but the same check guards snapshots: dtypes, missing, undeclared, nulls."""
    from veil.executor.catalog import check_data_matches

    dataset = load_catalog(site_config).dataset("patients")
    frame = pl.read_parquet(dataset.path)
    broken = frame.with_columns(pl.col("age").cast(pl.Int32)).drop("region").with_columns(extra=pl.lit(1))
    broken.write_parquet(tmp_path / "broken.parquet")
    with pytest.raises(CatalogError) as refused:
        check_data_matches(dataclasses.replace(dataset, path=tmp_path / "broken.parquet"))
    message = refused.value.message
    assert "column 'age' is declared Int64 but the file's is Int32" in message
    assert "column 'region' (String) is declared but not in the file" in message
    assert "the file's column 'extra' (Int32) is not declared" in message
    frame.with_columns(sex=pl.when(pl.col("age") < 3).then(None).otherwise(pl.col("sex"))).write_parquet(
        tmp_path / "nulls.parquet")
    with pytest.raises(CatalogError, match="'sex' \\(\\d+ nulls\\) hold nulls"):
        check_data_matches(dataclasses.replace(dataset, path=tmp_path / "nulls.parquet"))
