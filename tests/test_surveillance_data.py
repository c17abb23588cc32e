"""The synthetic emergency visits of syndromic surveillance (executor/surveillance_data.py): determinism, the
injected outbreak where and when it was asked, the catalog, and `veil data synth`'s flags."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest

from veil.executor.catalog import check_data_matches, load_catalog
from veil.executor.surveillance_data import (
    AGE_BANDS,
    MAX_VISITS,
    OUTBREAK_WEEKS,
    SYNDROMES,
    Outbreak,
    VisitsSpec,
    default_start,
    parse_outbreak,
)
from veil.executor.synth import synthesize

START = date(2025, 6, 2)  # a Monday
SPEC = VisitsSpec(START, weeks=16, outbreaks=(Outbreak("north", 8, 3.0),))


def weekly_ili(frame: pl.DataFrame, start: date) -> pl.DataFrame:
    """ILI patients per week (each patient once a week), all regions together."""
    return (frame.filter(pl.col("syndrome") == "ILI")
            .with_columns(week=(pl.col("visit_date") - pl.lit(start)).dt.total_days() // 7)
            .group_by("week").agg(pl.col("patient_id").n_unique().alias("n")).sort("week"))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize(tmp_path_factory.mktemp("visits"), sites=3, patients=300, seed=5, visits=SPEC)


def test_catalog_loads_and_declares_honest_public_metadata(sites: list[Path]) -> None:
    for config in sites:
        catalog = load_catalog(config)
        visits = catalog.dataset("visits")
        check_data_matches(visits)
        frame = pl.read_parquet(visits.path)
        assert (visits.level, visits.privacy_unit, visits.max_rows_per_unit) == ("L1", "patient_id", MAX_VISITS)
        assert catalog.rule(visits).reviewers == 0  # an application is approved by the site's rule
        assert frame.height <= visits.max_rows and frame.group_by("patient_id").len()["len"].max() <= MAX_VISITS
        assert frame["visit_date"].min() >= START and frame["visit_date"].max() < START + timedelta(weeks=SPEC.weeks)
        assert set(frame["region"]) <= set(visits.column("region").categories or ())
        assert set(visits.column("region").categories or ()) == set(catalog.dataset("patients").column("region").categories or ())
        assert visits.column("age_band").categories == tuple(AGE_BANDS) and set(frame["age_band"]) == set(AGE_BANDS)
        assert visits.column("syndrome").categories == tuple(SYNDROMES) and set(frame["syndrome"]) == set(SYNDROMES)
        assert START.isoformat() in visits.description  # the series' start is public: a standing query needs it
        assert frame["patient_id"].n_unique() < frame.height  # patients come back
    sizes = [pl.scan_parquet(load_catalog(c).dataset("visits").path).select(pl.len()).collect().item() for c in sites]
    assert sizes[1] > sizes[0] > sizes[2]  # per-site size: central's catchment is the largest, valley's the smallest


def test_same_seed_same_bytes_and_the_cohort_is_unchanged(tmp_path: Path, sites: list[Path]) -> None:
    again = synthesize(tmp_path / "again", sites=3, patients=300, seed=5, visits=SPEC)
    other = synthesize(tmp_path / "other", sites=1, patients=300, seed=6, visits=SPEC)
    plain = synthesize(tmp_path / "plain", sites=3, patients=300, seed=5)
    for a, b, p in zip(sites, again, plain):
        for name in ("visits.parquet", "site.toml", "patients.parquet", "encounters.parquet"):
            assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name
        for name in ("patients.parquet", "encounters.parquet"):  # the visits draw from a stream of their own
            assert (a.parent / name).read_bytes() == (p.parent / name).read_bytes(), name
        assert not (p.parent / "visits.parquet").exists() and "visits" not in load_catalog(p).datasets
    assert not pl.read_parquet(sites[0].parent / "visits.parquet").equals(pl.read_parquet(other[0].parent / "visits.parquet"))


def test_the_outbreak_rises_at_its_site_in_its_weeks_only(sites: list[Path]) -> None:
    outbreak = SPEC.outbreaks[0]
    weeks = range(outbreak.week, outbreak.week + OUTBREAK_WEEKS)
    before = range(outbreak.week - 3, outbreak.week)
    after = range(outbreak.week + OUTBREAK_WEEKS, outbreak.week + OUTBREAK_WEEKS + 3)
    for config in sites:
        frame = pl.read_parquet(config.parent / "visits.parquet")
        ili = dict(weekly_ili(frame, START).iter_rows())
        around = sum(ili[w] for w in (*before, *after)) / (len(before) + len(after))
        rise = min(ili[w] for w in weeks) / around
        if config.parent.name == outbreak.site:
            assert 2.2 < rise < 3.8, (ili, rise)  # ILI visits times 3, every outbreak week
            assert max(ili[w] for w in (*before, *after)) < 1.4 * around
        else:
            assert 0.7 < rise < 1.3, (config.parent.name, ili)
        others = (frame.filter(pl.col("syndrome") == "other")
                  .with_columns(week=(pl.col("visit_date") - pl.lit(START)).dt.total_days() // 7)
                  .group_by("week").len().sort("week"))
        assert others["len"].max() < 1.4 * others["len"].min()  # other syndromes do not rise


def test_default_start_and_outbreak_syntax() -> None:
    assert default_start(date(2026, 12, 4)) == date(2026, 2, 23)  # a Friday: 40 weeks before Monday 30 November
    assert default_start(date(2026, 11, 30)) == date(2026, 2, 23)  # on a Monday, that Monday's week is open
    assert default_start().weekday() == 0
    assert parse_outbreak("north:30") == Outbreak("north", 30, 3.0)
    assert parse_outbreak("central:12:2.5") == Outbreak("central", 12, 2.5)
    for bad in ("north", "north:x", ":3", "north:3:0", "north:-1", "north:3:2:1"):
        with pytest.raises(ValueError, match="--outbreak"):
            parse_outbreak(bad)


def veil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_writes_visits_only_when_asked(tmp_path: Path) -> None:
    run = veil("data", "synth", "--sites", "2", "--patients", "200", "--out", str(tmp_path / "s"), "--seed", "3",
               "--outbreak", "central:5:2", "--surveillance-start", "2025-01-06", "--weeks", "10")
    assert run.returncode == 0, run.stderr
    visits = load_catalog(tmp_path / "s" / "central" / "site.toml").dataset("visits")
    frame = pl.read_parquet(visits.path)
    assert frame["visit_date"].min() >= date(2025, 1, 6) and frame["visit_date"].max() <= date(2025, 3, 16)
    assert veil("data", "synth", "--sites", "1", "--patients", "200", "--out", str(tmp_path / "p")).returncode == 0
    assert not (tmp_path / "p" / "north" / "visits.parquet").exists()
    for args, says in ((["--outbreak", "valley:3"], "the sites are north, central"),
                       (["--surveillance-start", "2025-01-07"], "starts on a Monday"),
                       (["--weeks", "4", "--outbreak", "north:4"], "weeks 0 to 3"),
                       (["--surveillance-start", "soon"], "is not a date")):
        bad = veil("data", "synth", "--sites", "2", "--patients", "200", "--out", str(tmp_path / "bad"), *args)
        assert bad.returncode != 0 and says in bad.stderr, bad.stderr
