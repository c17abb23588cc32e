"""Real data that ships inside a package, laid out as hospital sites: scikit-learn's breast-cancer set.

569 patients, 30 features, a benign/malignant diagnosis. The feature bounds are the minima and
maxima that the dataset's own documentation publishes, so they are public metadata, not statistics
the executor reads from the data. Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.datasets import load_breast_cancer

from veil.executor.synth import ColumnSpec, dataset_table, write_site_toml

DATASET = "breast_cancer"
LABEL = "diagnosis"
CLASSES = ["malignant", "benign"]  # scikit-learn's target codes 0 and 1


def published_bounds(descr: str) -> dict[str, tuple[float, float]]:
    """Each feature's (min, max) from the 'Summary Statistics' table of the dataset's DESCR text."""
    naming = {"mean": "mean {}", "standard error": "{} error", "worst": "worst {}"}
    rows = re.findall(r"^([a-z ]+) \((mean|standard error|worst)\):\s+([\d.]+)\s+([\d.]+)\s*$", descr, re.M)
    return {naming[kind].format(name): (float(lo), float(hi)) for name, kind, lo, hi in rows}


def column_name(feature: str) -> str:
    """A catalog column name for a scikit-learn feature name ('mean radius' -> 'mean_radius')."""
    return feature.replace(" ", "_")


def breast_cancer_frame() -> tuple[pl.DataFrame, list[ColumnSpec]]:
    """All 569 patients (patient_id, 30 features, diagnosis) and their columns' public metadata."""
    data = load_breast_cancer()
    bounds = published_bounds(data.DESCR)
    names = [column_name(f) for f in data.feature_names]
    frame = pl.DataFrame(data.data, schema=names).with_columns(
        pl.Series(LABEL, np.array(CLASSES)[data.target]),
        pl.int_range(1, len(data.target) + 1, dtype=pl.Int64).alias("patient_id"),
    ).select("patient_id", *names, LABEL)
    columns = [ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)")]
    columns += [ColumnSpec(column_name(f), "Float64", f"{f} of the cell nuclei (FNA image)", bounds=bounds[f])
                for f in data.feature_names]
    columns.append(ColumnSpec(LABEL, "String", "Biopsy diagnosis", categories=list(CLASSES)))
    return frame, columns


def write_sites(out: Path, sites: Sequence[str] = ("north", "central", "valley"),
                shares: Sequence[float] = (0.45, 0.33, 0.22), level: str = "L2", seed: int = 0,
                lifetime_epsilon: float = 20.0) -> list[Path]:
    """Split the patients across `sites` (by `shares`, shuffled by `seed`); write each site's Parquet
    file and catalog under out/<site>/; return the catalogs' paths."""
    frame, columns = breast_cancer_frame()
    frame = frame.sample(fraction=1.0, shuffle=True, seed=seed)
    cuts = np.cumsum([0, *shares])
    cuts = (cuts / cuts[-1] * frame.height).round().astype(int)
    paths = []
    for site, lo, hi in zip(sites, cuts[:-1], cuts[1:]):
        directory = out / site
        directory.mkdir(parents=True, exist_ok=True)
        frame.slice(lo, hi - lo).write_parquet(directory / f"{DATASET}.parquet")
        write_site_toml(directory / "site.toml", {
            "name": site, "title": f"{site} (breast-cancer cohort)", "database": "sqlite:///veil.db",
            "reporting_delta": 1e-6, "default_l1_epsilon": 2.0,
        }, {DATASET: dataset_table({
            "title": "Breast cancer biopsies",
            "description": "One row per patient: 30 features of a fine-needle aspirate and the diagnosis.",
            "path": f"{DATASET}.parquet", "level": level, "privacy_unit": "patient_id",
            "max_rows_per_unit": 1, "max_rows": 1000, "lifetime_epsilon": lifetime_epsilon,
        }, columns)})
        paths.append(directory / "site.toml")
    return paths
