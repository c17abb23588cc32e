"""Two more patient-level datasets per synthetic site, for the tutorials and the demo.

- `presentations` (L2, one row per patient): what the hospital saw at the patient's first encounter
  (age, sex, department, labs) and whether the patient has a rare disease: the data of a
  diagnosis-support model. The tertiary sites hold most of the cases; the community site few.
- `genetic_panels` (L3, one row per tested patient): which gene panel was run and whether a
  pathogenic variant was found; its rule asks an ethics reference and two reviewers.

Both derive from the site's generated patients and encounters, so they tell the same story.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from veil.executor.synth import DEPARTMENTS, NO_RARE, SEXES, ColumnSpec, dataset_table

PRESENTATION_COLUMNS = [
    ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)"),
    ColumnSpec("age", "Int64", "Age in years at the first encounter", bounds=(0, 17)),
    ColumnSpec("sex", "String", "Sex recorded at birth", categories=SEXES),
    ColumnSpec("department", "String", "Department of the first encounter", categories=DEPARTMENTS),
    ColumnSpec("crp_mg_l", "Float64", "C-reactive protein at presentation (mg/L); null when not measured",
               bounds=(0.0, 300.0), nullable=True),
    ColumnSpec("hemoglobin_g_dl", "Float64", "Haemoglobin at presentation (g/dL)", bounds=(4.0, 20.0)),
    ColumnSpec("wbc_10e9_l", "Float64", "White cells at presentation (10^9/L); null when not measured",
               bounds=(0.0, 50.0), nullable=True),
    ColumnSpec("encounters", "Int64", "Encounters on record (a public cap of 20)", bounds=(1, 20)),
    ColumnSpec("diagnosis", "String", "'rare' when the patient has a rare disease, else 'other'",
               categories=["other", "rare"]),
]
PANELS = ["metabolic", "neuromuscular", "haematology", "syndromic"]
PANEL_COLUMNS = [
    ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)"),
    ColumnSpec("panel", "String", "Gene panel run", categories=PANELS),
    ColumnSpec("variant", "String", "Whether a pathogenic variant was found", categories=["found", "not_found"]),
    ColumnSpec("turnaround_days", "Int64", "Days from sample to report", bounds=(1, 120)),
]


def presentations(patients: pl.DataFrame, encounters: pl.DataFrame) -> pl.DataFrame:
    """One row per patient: the first encounter's department and labs, and the rare-disease label."""
    first = encounters.sort("patient_id", "encounter_date").group_by("patient_id", maintain_order=True).agg(
        pl.col("department").first(), pl.col("crp_mg_l").first(), pl.col("hemoglobin_g_dl").first(),
        pl.col("wbc_10e9_l").first(), pl.len().cast(pl.Int64).clip(1, 20).alias("encounters"))
    frame = patients.join(first, on="patient_id", how="inner").with_columns(
        pl.when(pl.col("rare_disease") == NO_RARE).then(pl.lit("other")).otherwise(pl.lit("rare")).alias("diagnosis"))
    return frame.select([c.name for c in PRESENTATION_COLUMNS])


def genetic_panels(patients: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Tested patients: every rare-disease patient and 5% of the others; variants found mostly in the former."""
    rng = np.random.default_rng(seed)
    rare = (patients["rare_disease"] != NO_RARE).to_numpy()
    tested = rare | (rng.random(len(rare)) < 0.05)
    ids, rare = patients["patient_id"].to_numpy()[tested], rare[tested]
    found = rng.random(len(ids)) < np.where(rare, 0.7, 0.04)
    return pl.DataFrame({
        "patient_id": ids,
        "panel": pl.Series([PANELS[i] for i in rng.integers(0, len(PANELS), len(ids))], dtype=pl.String),
        "variant": pl.Series(np.where(found, "found", "not_found"), dtype=pl.String),
        "turnaround_days": np.clip(rng.gamma(4.0, 8.0, len(ids)).round().astype(np.int64), 1, 120),
    })


def catalog_tables(max_patients: int) -> dict[str, dict[str, Any]]:
    """The two datasets' catalog tables (public bounds from the requested size)."""
    return {
        "presentations": dataset_table({
            "title": "First presentations",
            "description": "One row per patient: the first encounter's department and labs, and whether the "
                           "patient has a rare disease.",
            "path": "presentations.parquet", "level": "L2", "privacy_unit": "patient_id",
            "max_rows_per_unit": 1, "max_rows": max_patients, "lifetime_epsilon": 20.0,
        }, PRESENTATION_COLUMNS),
        "genetic_panels": dataset_table({
            "title": "Genetic panels",
            "description": "One row per tested patient: the gene panel and whether a pathogenic variant was found.",
            "path": "genetic_panels.parquet", "level": "L3", "privacy_unit": "patient_id",
            "max_rows_per_unit": 1, "max_rows": max_patients, "lifetime_epsilon": 5.0,
        }, PANEL_COLUMNS),
    }
