"""Tests for DP synthetic mock data (veil.executor.mockdata): schema, public bounds, size, loss, utility."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from veil.executor.catalog import Catalog, Dataset, load_catalog
from veil.executor.mockdata import DATES, MIN_ROWS, MockError, SyntheticMock, synthesize_mock
from veil.executor.synth import synthesize


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("cohort")
    synthesize(root, sites=1, patients=2000, seed=5)
    return load_catalog(root / "north" / "site.toml")


@pytest.fixture(scope="module")
def encounters_rho10(catalog: Catalog) -> SyntheticMock:
    return synthesize_mock(catalog.dataset("encounters"), rho=10.0, seed=1)


def _check_public(dataset: Dataset, frame: pl.DataFrame) -> None:
    """Same columns and dtypes as the catalog; every value inside its column's public bounds or set."""
    assert frame.schema == dataset.schema()
    assert frame.height > 0
    for column in dataset.columns.values():
        values = frame[column.name]
        if not column.nullable:
            assert values.null_count() == 0, column.name
        values = values.drop_nulls()
        if column.categories is not None:
            assert set(values.to_list()) <= set(column.categories), column.name
        elif column.bounds is not None:
            assert column.bounds[0] <= values.min() and values.max() <= column.bounds[1], column.name
        elif column.dtype == "Date":
            assert DATES[0] <= values.min() and values.max() <= DATES[1], column.name


def _check_units(dataset: Dataset, frame: pl.DataFrame) -> None:
    """Made-up ids 1..m in row order, none with more rows than the public maximum."""
    ids = frame[dataset.privacy_unit]
    assert ids.min() == 1 and ids.is_sorted()
    assert ids.n_unique() == ids.max()
    assert frame.group_by(dataset.privacy_unit).len()["len"].max() <= dataset.max_rows_per_unit


def _total_variation(real: pl.DataFrame, synth: pl.DataFrame, by: list[str]) -> float:
    p = real.group_by(by).len().with_columns(pl.col("len") / real.height)
    q = synth.group_by(by).len().with_columns(pl.col("len") / synth.height)
    joined = p.join(q, on=by, how="full", coalesce=True, nulls_equal=True).fill_null(0.0)
    return 0.5 * float((joined["len"] - joined["len_right"]).abs().sum())


def test_encounters_schema_bounds_units_and_loss(catalog: Catalog, encounters_rho10: SyntheticMock) -> None:
    dataset = catalog.dataset("encounters")
    mock = encounters_rho10
    _check_public(dataset, mock.frame)
    _check_units(dataset, mock.frame)
    assert 0.99 * 10.0 <= mock.rho <= 10.0 and mock.delta == 0.0
    assert mock.columns_not_fitted == () and "patient_id" not in mock.columns_fitted
    real_rows = pl.scan_parquet(dataset.path).select(pl.len()).collect().item()
    assert abs(mock.frame.height - real_rows) < 0.05 * real_rows  # the DP total, at a large rho
    assert mock.frame["length_of_stay_days"].dtype == pl.Int64


def test_large_rho_keeps_marginals_and_correlation(catalog: Catalog, encounters_rho10: SyntheticMock) -> None:
    real = pl.read_parquet(catalog.dataset("encounters").path)
    synth = encounters_rho10.frame
    for column in ("department", "icd10", "outcome"):
        assert _total_variation(real, synth, [column]) < 0.1, column
    null_share = real["wbc_10e9_l"].null_count() / real.height
    assert abs(synth["wbc_10e9_l"].null_count() / synth.height - null_share) < 0.03
    # Diagnoses depend on the department; independent sampling from the real marginals loses that.
    independent = pl.DataFrame({
        "department": real["department"].sample(len(real), shuffle=True, seed=1),
        "icd10": real["icd10"].sample(len(real), shuffle=True, seed=2),
    })
    joint_synth = _total_variation(real, synth, ["department", "icd10"])
    joint_independent = _total_variation(real, independent, ["department", "icd10"])
    assert joint_synth < 0.15 and joint_synth < 0.5 * joint_independent


def test_tiny_rho_still_gives_rows_in_public_bounds(catalog: Catalog) -> None:
    dataset = catalog.dataset("encounters")
    mock = synthesize_mock(dataset, rho=1e-4, seed=2)
    _check_public(dataset, mock.frame)
    _check_units(dataset, mock.frame)
    assert MIN_ROWS <= mock.frame.height <= dataset.max_rows
    assert 0.0 < mock.rho <= 1e-4


def test_patients_rows_seed_and_verified_bound(catalog: Catalog) -> None:
    dataset = catalog.dataset("patients")
    first = synthesize_mock(dataset, rho=0.5, rows=300, seed=3, verified_bound=True)
    _check_public(dataset, first.frame)
    assert first.frame.height == 300 and first.frame["patient_id"].n_unique() == 300  # one row per patient
    assert first.rho <= 0.5
    assert first.columns_not_fitted == ()


def test_tiny_dataset_and_unfitted_columns(catalog: Catalog, tmp_path: Path) -> None:
    source = catalog.dataset("patients")
    path = tmp_path / "tiny.parquet"
    pl.read_parquet(source.path).head(5).write_parquet(path)
    columns = dict(source.columns)
    columns["region"] = replace(columns["region"], categories=None)  # nothing public: not fitted
    dataset = replace(source, path=path, columns=columns)
    mock = synthesize_mock(dataset, rho=0.1, seed=4)
    assert mock.frame.height == MIN_ROWS and mock.frame.schema == dataset.schema()
    assert mock.columns_not_fitted == ("region",) and "region" not in mock.columns_fitted
    assert mock.rho <= 0.1


def test_dates_use_declared_bounds(catalog: Catalog) -> None:
    source = catalog.dataset("encounters")
    bounds = (date(2020, 1, 1), date(2021, 12, 31))
    kept = ("patient_id", "encounter_date", "outcome")
    columns = {name: c for name, c in source.columns.items() if name in kept}
    columns["encounter_date"] = replace(columns["encounter_date"], bounds=bounds)  # type: ignore[arg-type]
    dataset = replace(source, columns=columns)
    frame = synthesize_mock(dataset, rho=1.0, rows=500, seed=5).frame
    assert frame.schema == dataset.schema()
    assert bounds[0] <= frame["encounter_date"].min() and frame["encounter_date"].max() <= bounds[1]


@pytest.mark.parametrize(("rho", "rows"), [(0.0, None), (float("nan"), None), (1.0, 0), (1.0, 10**9)])
def test_refuses_bad_requests(catalog: Catalog, rho: float, rows: int | None) -> None:
    with pytest.raises(MockError):
        synthesize_mock(catalog.dataset("patients"), rho=rho, rows=rows)


def test_refuses_when_nothing_is_public(catalog: Catalog) -> None:
    source = catalog.dataset("patients")
    columns = {n: replace(c, bounds=None, categories=None, dtype="String" if n != "patient_id" else c.dtype)
               for n, c in source.columns.items()}
    with pytest.raises(MockError) as info:
        synthesize_mock(replace(source, columns=columns), rho=1.0)
    assert info.value.code == "nothing_to_fit"
