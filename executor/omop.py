"""The OMOP Common Data Model (v5.4), as multi-center clinical research keeps it: a synthetic subset, and the
site catalog a steward starts from for it.

`CDM` lists the tables Veil serves (person, visit_occurrence, condition_occurrence, measurement,
drug_exposure, death, plus `cohort_features`, one row per person derived from them, as a site's data team
derives features for a study) with their real OMOP column names. Everything public in the catalog comes
from the CDM's conventions and the OHDSI standard vocabulary, never from the data: concept ids as
categories, years and clinical ranges as bounds, `person_id` as the privacy unit. Rows per person are
proposals the steward confirms (the executor checks them against the data and truncates, as always).

`synthesize_omop` writes three hospitals' CDMs as Parquet files or as tables in PostgreSQL (a schema per
site), with their catalogs; `draft_catalog` is what `veil site init --omop` writes for an existing CDM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from veil.executor.synth import ColumnSpec, dataset_table, write_site_toml

# ---------------------------------------------------------------- the standard vocabulary Veil uses

GENDERS = {8507: "MALE", 8532: "FEMALE"}
VISITS = {9201: "Inpatient Visit", 9202: "Outpatient Visit", 9203: "Emergency Room Visit"}
CONDITIONS = {201826: "Type 2 diabetes mellitus", 320128: "Essential hypertension", 432867: "Hyperlipidemia",
              255573: "Chronic obstructive lung disease", 313217: "Atrial fibrillation",
              4329847: "Myocardial infarction"}
MEASUREMENTS = {3004410: ("Hemoglobin A1c/Hemoglobin.total in Blood", 8554, (3.0, 20.0)),
                3004249: ("Systolic blood pressure", 8876, (60.0, 260.0)),
                3012888: ("Diastolic blood pressure", 8876, (30.0, 160.0)),
                3038553: ("Body mass index (BMI) [Ratio]", 9531, (10.0, 80.0)),
                3020460: ("C reactive protein [Mass/volume] in Serum or Plasma", 8751, (0.0, 300.0))}
"""concept id -> (name, unit concept id, clinical range of value_as_number)."""
UNITS = {8554: "percent", 8876: "millimeter mercury column", 9531: "kilogram per square meter",
         8751: "milligram per liter"}
DRUGS = {1503297: "metformin", 1308216: "lisinopril", 1545958: "atorvastatin", 1112807: "aspirin"}
EHR = 32817
"""Type concept "EHR": where each record came from."""
EHR_PRESCRIPTION = 32838
OBSERVATION = (date(2015, 1, 1), date(2024, 12, 31))
T2DM, HYPERTENSION, MI = 201826, 320128, 4329847


def _ids(name: str, what: str) -> ColumnSpec:
    return ColumnSpec(name, "Int64", what)


def _concept(name: str, vocabulary: dict[int, Any], what: str, nullable: bool = False) -> ColumnSpec:
    return ColumnSpec(name, "Int32", f"{what} (OMOP standard concept ids: "
                      + ", ".join(f"{k} {v if isinstance(v, str) else v[0]}" for k, v in vocabulary.items()) + ")",
                      categories=list(vocabulary), nullable=nullable)


def _date(name: str, what: str, nullable: bool = False) -> ColumnSpec:
    return ColumnSpec(name, "Date", what, nullable=nullable)


PERSON_ID = _ids("person_id", "The person (the privacy unit)")
VALUE_RANGE = (min(r[2][0] for r in MEASUREMENTS.values()), max(r[2][1] for r in MEASUREMENTS.values()))


@dataclass(frozen=True)
class CdmTable:
    """One OMOP table as the catalog declares it."""

    name: str
    title: str
    level: str
    rows_per_person: int
    columns: list[ColumnSpec]


CDM = [
    CdmTable("person", "OMOP person", "L1", 1, [
        PERSON_ID, _concept("gender_concept_id", GENDERS, "Gender"),
        ColumnSpec("year_of_birth", "Int32", "Year of birth", bounds=(1900, OBSERVATION[1].year)),
        ColumnSpec("race_concept_id", "Int32", "Race (0: no matching concept)", categories=[0]),
        ColumnSpec("ethnicity_concept_id", "Int32", "Ethnicity (0: no matching concept)", categories=[0])]),
    CdmTable("visit_occurrence", "OMOP visit_occurrence", "L2", 40, [
        _ids("visit_occurrence_id", "The visit"), PERSON_ID, _concept("visit_concept_id", VISITS, "Kind of visit"),
        _date("visit_start_date", "First day of the visit"), _date("visit_end_date", "Last day of the visit"),
        _concept("visit_type_concept_id", {EHR: "EHR"}, "Provenance")]),
    CdmTable("condition_occurrence", "OMOP condition_occurrence", "L2", len(CONDITIONS), [
        _ids("condition_occurrence_id", "The record"), PERSON_ID,
        _concept("condition_concept_id", CONDITIONS, "Condition (SNOMED standard concept)"),
        _date("condition_start_date", "Onset (first diagnosis)"),
        _concept("condition_type_concept_id", {EHR: "EHR"}, "Provenance"),
        ColumnSpec("visit_occurrence_id", "Int64", "The visit it was recorded in", nullable=True)]),
    CdmTable("measurement", "OMOP measurement", "L2", 80, [
        _ids("measurement_id", "The record"), PERSON_ID,
        _concept("measurement_concept_id", MEASUREMENTS, "What was measured (LOINC standard concept)"),
        _date("measurement_date", "When"),
        ColumnSpec("value_as_number", "Float64", "The value, in unit_concept_id; bounds: the widest clinical range "
                   "of the measured concepts (filter on one concept for its statistics)", bounds=VALUE_RANGE,
                   nullable=True),
        _concept("unit_concept_id", UNITS, "Unit (UCUM standard concept)"),
        _concept("measurement_type_concept_id", {EHR: "EHR"}, "Provenance")]),
    CdmTable("drug_exposure", "OMOP drug_exposure", "L2", 40, [
        _ids("drug_exposure_id", "The record"), PERSON_ID,
        _concept("drug_concept_id", DRUGS, "Drug (RxNorm ingredient standard concept)"),
        _date("drug_exposure_start_date", "First day"), _date("drug_exposure_end_date", "Last day"),
        ColumnSpec("days_supply", "Int32", "Days supplied", bounds=(1, 365)),
        _concept("drug_type_concept_id", {EHR_PRESCRIPTION: "EHR prescription"}, "Provenance")]),
    CdmTable("death", "OMOP death", "L2", 1, [
        PERSON_ID, _date("death_date", "Date of death"), _concept("death_type_concept_id", {EHR: "EHR"}, "Provenance")]),
    CdmTable("cohort_features", "Features per person (derived from the CDM for a study)", "L2", 1, [
        PERSON_ID,
        ColumnSpec("age", "Float64", "Age on 2020-01-01 in years", bounds=(0.0, 110.0)),
        ColumnSpec("female", "Float64", "1 if gender_concept_id is 8532", bounds=(0.0, 1.0)),
        ColumnSpec("diabetes", "Float64", "1 if diagnosed with type 2 diabetes before 2020", bounds=(0.0, 1.0)),
        ColumnSpec("hypertension", "Float64", "1 if diagnosed with hypertension before 2020", bounds=(0.0, 1.0)),
        ColumnSpec("sbp", "Float64", "Mean systolic blood pressure before 2020 (mmHg; 130 when unmeasured)",
                   bounds=(60.0, 260.0)),
        ColumnSpec("bmi", "Float64", "Mean BMI before 2020 (25 when unmeasured)", bounds=(10.0, 80.0)),
        ColumnSpec("mi", "Int64", "1 if a myocardial infarction was diagnosed from 2020 on (the label)",
                   categories=[0, 1])]),
]
TABLES = {t.name: t for t in CDM}


def draft_catalog(path: Path, site: str, title: str, persons_bound: int, *, parquet: bool = True,
                  url: str | None = None, url_env: str | None = None, schema: str | None = None) -> Path:
    """Write the site catalog for an OMOP CDM: every table of `CDM`, read from `<table>.parquet` beside the
    catalog, or from `schema.table` in PostgreSQL (`url` or `url_env`). `persons_bound` is the public upper
    bound on the site's persons; row bounds follow from the rows per person."""
    datasets = {}
    for table in CDM:
        meta: dict[str, Any] = {
            "title": table.title, "description": f"The CDM's {table.name} table (v5.4 subset)", "level": table.level,
            "privacy_unit": "person_id", "max_rows_per_unit": table.rows_per_person,
            "max_rows": persons_bound * table.rows_per_person, "lifetime_epsilon": 10.0}
        if parquet:
            meta["path"] = f"{table.name}.parquet"
        else:
            qualified = f"{schema}.{table.name}" if schema else table.name
            meta["source"] = {"table": qualified, **({"url": url} if url else {"url_env": url_env})}
        datasets[table.name] = dataset_table(meta, table.columns)
    return write_site_toml(path, {"name": site, "title": title, "database": "sqlite:///veil.db",
                                  "reporting_delta": 1e-6, "default_l1_epsilon": 2.0}, datasets)


# ---------------------------------------------------------------- synthetic CDMs

SITES = {"north": ("North University Hospital", 1.2), "central": ("Central General Hospital", 1.0),
         "valley": ("Valley Community Hospital", 0.8)}
"""Three hospitals: name -> (title, cardiovascular risk factor)."""


def _site_frames(persons: int, risk: float, rng: np.random.Generator) -> dict[str, pl.DataFrame]:
    """One site's CDM tables, generated with a plausible cardiometabolic structure."""
    pid = np.arange(1, persons + 1, dtype=np.int64)
    born = rng.integers(1930, 2005, persons).astype(np.int32)
    age = 2020 - born
    female = rng.random(persons) < 0.52
    p_dm = 1 / (1 + np.exp(-(-4.2 + 0.045 * age + 0.4 * (risk - 1))))
    p_ht = 1 / (1 + np.exp(-(-3.6 + 0.06 * age + 0.5 * (risk - 1))))
    dm, ht = rng.random(persons) < p_dm, rng.random(persons) < p_ht
    lipid, copd, af = (rng.random(persons) < p for p in (p_ht * 0.8, 0.02 + age / 2000, 0.01 + age / 1500))
    sbp_mean = 118 + 0.35 * age + 18 * ht + rng.normal(0, 8, persons)
    bmi_mean = 26 + 3.5 * dm + rng.normal(0, 3.5, persons)
    logit_mi = -7.2 + 0.055 * age + 0.9 * dm + 0.8 * ht + 0.6 * lipid - 0.5 * female + 0.02 * (sbp_mean - 130)
    mi = rng.random(persons) < 1 / (1 + np.exp(-(logit_mi + 0.5 * (risk - 1))))
    start, end = OBSERVATION
    span = (end - start).days

    epoch = (start - date(1970, 1, 1)).days

    def day(n: int, low: float = 0.0, high: float = 1.0) -> pl.Series:
        """`n` dates drawn uniformly in the part [low, high] of the observation period."""
        return pl.Series((epoch + rng.uniform(low, high, n) * span).astype(np.int32)).cast(pl.Date)

    person = pl.DataFrame({"person_id": pid, "gender_concept_id": np.where(female, 8532, 8507).astype(np.int32),
                           "year_of_birth": born, "race_concept_id": np.zeros(persons, np.int32),
                           "ethnicity_concept_id": np.zeros(persons, np.int32)})
    n_visits = np.clip(rng.poisson(3 + 3 * (dm | ht)), 1, 40)
    visit_person = np.repeat(pid, n_visits)
    visits = len(visit_person)
    kind = rng.choice(list(VISITS), visits, p=[0.15, 0.7, 0.15]).astype(np.int32)
    stay = np.where(kind == 9201, rng.integers(1, 12, visits), 0)
    visit = pl.DataFrame({"visit_occurrence_id": np.arange(1, visits + 1, dtype=np.int64), "person_id": visit_person,
                          "visit_concept_id": kind, "visit_start_date": day(visits), "stay": stay}).with_columns(
        visit_end_date=pl.col("visit_start_date") + pl.duration(days=pl.col("stay")),
        visit_type_concept_id=pl.lit(EHR, pl.Int32)).drop("stay")
    first_visit = visit.group_by("person_id").agg(pl.col("visit_occurrence_id").min())
    onsets = []
    for concept, has, lo, hi in ((T2DM, dm, 0.0, 0.9), (HYPERTENSION, ht, 0.0, 0.9), (432867, lipid, 0.0, 0.9),
                                 (255573, copd, 0.0, 0.9), (313217, af, 0.0, 0.95), (MI, mi, 0.5, 1.0)):
        who = pid[has]
        onsets.append(pl.DataFrame({"person_id": who, "condition_concept_id": np.full(len(who), concept, np.int32),
                                    "condition_start_date": day(len(who), lo, hi)}))
    condition = pl.concat(onsets).join(first_visit, on="person_id", how="left").with_columns(
        condition_type_concept_id=pl.lit(EHR, pl.Int32)).sort("person_id")
    condition = condition.with_columns(condition_occurrence_id=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)).select(
        [c.name for c in TABLES["condition_occurrence"].columns])
    features = {3004410: 5.4 + 2.2 * dm, 3004249: sbp_mean, 3012888: 0.6 * sbp_mean, 3038553: bmi_mean,
                3020460: np.full(persons, 3.0)}
    rows = []
    for concept, mean in features.items():
        per = np.clip(rng.poisson(2 + 3 * dm if concept == 3004410 else np.full(persons, 4)), 0, 16)
        who = np.repeat(np.arange(persons), per)
        low, high = MEASUREMENTS[concept][2]
        noise = rng.lognormal(0, 1, len(who)) if concept == 3020460 else rng.normal(0, 0.06, len(who)) * mean[who]
        value = np.clip(mean[who] + noise, low, high).round(1)
        value = np.where(rng.random(len(who)) < 0.02, np.nan, value)  # a few values never came back from the lab
        rows.append(pl.DataFrame({"person_id": pid[who],
                                  "measurement_concept_id": np.full(len(who), concept, np.int32),
                                  "measurement_date": day(len(who)), "value_as_number": value,
                                  "unit_concept_id": np.full(len(who), MEASUREMENTS[concept][1], np.int32)}))
    measurement = pl.concat(rows).with_columns(pl.col("value_as_number").fill_nan(None)).sort("person_id")
    measurement = measurement.with_columns(measurement_id=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
                                           measurement_type_concept_id=pl.lit(EHR, pl.Int32)).select(
        [c.name for c in TABLES["measurement"].columns])
    prescribed = [(1503297, dm), (1308216, ht), (1545958, lipid | mi), (1112807, mi | af)]
    drug = pl.concat([pl.DataFrame({"person_id": pid[has], "drug_concept_id": np.full(has.sum(), c, np.int32)})
                      for c, has in prescribed]).with_columns(
        drug_exposure_start_date=day(int(sum(h.sum() for _, h in prescribed))),
        days_supply=pl.lit(90, pl.Int32), drug_type_concept_id=pl.lit(EHR_PRESCRIPTION, pl.Int32)).with_columns(
        drug_exposure_end_date=pl.col("drug_exposure_start_date") + pl.duration(days=90)).sort("person_id")
    drug = drug.with_columns(drug_exposure_id=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)).select(
        [c.name for c in TABLES["drug_exposure"].columns])
    died = rng.random(persons) < 0.01 + 0.15 * mi
    death = pl.DataFrame({"person_id": pid[died], "death_date": day(int(died.sum()), 0.6, 1.0)}).with_columns(
        death_type_concept_id=pl.lit(EHR, pl.Int32))
    tables = {"person": person, "visit_occurrence": visit, "condition_occurrence": condition,
              "measurement": measurement, "drug_exposure": drug, "death": death}
    tables["cohort_features"] = derive_features(tables)
    return {name: frame.select([c.name for c in TABLES[name].columns]) for name, frame in tables.items()}


def derive_features(cdm: dict[str, pl.DataFrame], index: date = date(2020, 1, 1)) -> pl.DataFrame:
    """One row per person from the CDM tables, as a site's data team derives them for a prediction study:
    age, sex, diabetes and hypertension before `index`, mean systolic pressure and BMI before it, and
    whether a myocardial infarction was diagnosed from `index` on."""
    before = pl.col("condition_start_date") < index
    conditions = cdm["condition_occurrence"].group_by("person_id").agg(
        diabetes=((pl.col("condition_concept_id") == T2DM) & before).any().cast(pl.Float64),
        hypertension=((pl.col("condition_concept_id") == HYPERTENSION) & before).any().cast(pl.Float64),
        mi=((pl.col("condition_concept_id") == MI) & ~before).any().cast(pl.Int64))
    measured = cdm["measurement"].filter(pl.col("measurement_date") < index).group_by("person_id").agg(
        sbp=pl.col("value_as_number").filter(pl.col("measurement_concept_id") == 3004249).mean(),
        bmi=pl.col("value_as_number").filter(pl.col("measurement_concept_id") == 3038553).mean())
    return (cdm["person"].select("person_id", age=(index.year - pl.col("year_of_birth")).cast(pl.Float64),
                                 female=(pl.col("gender_concept_id") == 8532).cast(pl.Float64))
            .join(conditions, on="person_id", how="left").join(measured, on="person_id", how="left")
            .with_columns(pl.col("diabetes", "hypertension").fill_null(0.0), pl.col("mi").fill_null(0),
                          pl.col("sbp").fill_null(130.0).clip(60.0, 260.0), pl.col("bmi").fill_null(25.0).clip(10.0, 80.0)))


def synthesize_omop(out: Path, persons: int = 3000, seed: int = 0, database_url: str | None = None) -> list[Path]:
    """Three hospitals' OMOP CDMs and catalogs under `out/<site>/`: Parquet files beside each `site.toml`,
    or, with `database_url` (PostgreSQL), tables in schema `cdm_<site>` of that database. Returns the
    catalogs' paths. `persons` is the nominal count per site (each site has 0.7 to 1.3 times as many)."""
    paths = []
    for index, (site, (title, risk)) in enumerate(SITES.items()):
        rng = np.random.default_rng([seed, index])
        n = max(10, round(persons * rng.uniform(0.7, 1.3)))
        frames = _site_frames(n, risk, rng)
        site_dir = out / site
        site_dir.mkdir(parents=True, exist_ok=True)
        if database_url is None:
            for name, frame in frames.items():
                frame.write_parquet(site_dir / f"{name}.parquet")
        else:
            _load(frames, database_url, f"cdm_{site}")
        has_password = re.match(r"^[a-z]+://[^/@]*:[^/@]*@", database_url or "") is not None
        paths.append(draft_catalog(site_dir / "site.toml", site, title, round(persons * 1.3) + 10,
                                   parquet=database_url is None, schema=f"cdm_{site}",
                                   url=None if has_password else database_url,
                                   url_env="VEIL_OMOP_URL" if has_password else None))
    return paths


def _load(frames: dict[str, pl.DataFrame], url: str, schema: str) -> None:
    """Write the tables into `schema` (created, or emptied first) with ADBC."""
    import adbc_driver_postgresql.dbapi as adbc

    with adbc.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        cursor.execute(f'CREATE SCHEMA "{schema}"')
    for name, frame in frames.items():
        frame.write_database(f"{schema}.{name}", url, engine="adbc")
