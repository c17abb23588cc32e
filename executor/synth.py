"""Synthetic data for a pediatric rare-disease multi-centre cohort (demos, tests, benchmarks).

`synthesize(out, sites, patients, seed)` writes, for each site, `patients.parquet`,
`encounters.parquet` and a `site.toml` catalog that `load_catalog` reads. Generation is vectorized
(numpy + polars, no per-row Python), so ten million encounter rows take seconds.

Sites: `north` (tertiary children's hospital, many rare-disease patients), `central` (tertiary),
`valley` (community hospital: younger, few rare cases, fewer encounters, more transfers); sites beyond
the third are `site4`, `site5`, ... with parameters blended between `central` and `valley`.

Site size: each site has `round(patients * f)` patients, where `f` is drawn uniformly from
[0.7, 1.3] by the site's own generator (seeded with `(seed, site_index)`), so sizes differ by up to
±30% around `patients`. Same seed, same bytes.

The catalog's public metadata (bounds, categories, `max_rows`) comes from the constants below and
from the *requested* `patients`, never from the generated data: it is what a steward would declare.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import tomli_w

if TYPE_CHECKING:
    from veil.executor.surveillance_data import VisitsSpec

# ---------------------------------------------------------------- public vocabularies

RARE_CODES = ["E75.2", "E84.0", "G71.0", "D61.0", "E70.0", "Q87.1"]
"""Rare diseases: lysosomal storage, cystic fibrosis, muscular dystrophy, Diamond-Blackfan, PKU, Q87.1."""
NO_RARE = "none"
DEPARTMENTS = ["emergency", "pediatrics", "neurology", "genetics", "icu", "oncology", "cardiology"]
OUTCOMES = ["discharged", "admitted", "transferred", "deceased"]
SEXES = ["F", "M"]
YEARS = (2015, 2025)
MAX_ENCOUNTERS = 20
SIZE_SPREAD = 0.3

# code -> (median CRP mg/L, WBC factor, haemoglobin offset g/dL); rare codes first.
DX_EFFECTS: dict[str, tuple[float, float, float]] = {
    "E75.2": (4, 1.0, -1.5), "E84.0": (15, 1.2, -0.3), "G71.0": (3, 1.0, 0.0),
    "D61.0": (3, 0.8, -4.5), "E70.0": (2, 1.0, 0.0), "Q87.1": (3, 1.0, -0.3),
    "J06.9": (8, 1.1, 0.0), "J18.9": (60, 1.6, -0.3), "A09": (15, 1.2, 0.3), "R50.9": (25, 1.3, 0.0),
    "S52.5": (3, 1.1, 0.0), "J45.9": (5, 1.1, 0.0), "K35.8": (50, 1.6, 0.0), "E10.9": (3, 1.0, 0.0),
    "F90.0": (1.5, 1.0, 0.0), "H66.9": (12, 1.2, 0.0), "N39.0": (40, 1.4, 0.0), "L20.9": (2, 1.0, 0.0),
    "R10.4": (6, 1.1, 0.0), "B34.9": (10, 0.8, 0.0), "Z00.1": (1, 1.0, 0.0), "G40.9": (3, 1.0, 0.0),
    "C91.0": (10, 2.5, -3.0), "Q21.0": (2, 1.0, 0.0), "A41.9": (120, 2.0, -1.0),
}
ICD10 = list(DX_EFFECTS)

# Common (non-rare) diagnoses by department, as relative weights.
DEPT_DX: dict[str, dict[str, float]] = {
    "emergency": {"J06.9": 10, "J18.9": 5, "A09": 10, "R50.9": 10, "S52.5": 8, "J45.9": 6, "K35.8": 3,
                  "H66.9": 8, "N39.0": 4, "R10.4": 10, "B34.9": 8, "A41.9": 1, "L20.9": 1},
    "pediatrics": {"J06.9": 8, "J18.9": 6, "A09": 6, "R50.9": 5, "J45.9": 6, "E10.9": 5, "F90.0": 4,
                   "H66.9": 5, "N39.0": 4, "L20.9": 5, "B34.9": 6, "Z00.1": 15, "R10.4": 3},
    "neurology": {"G40.9": 10, "F90.0": 6, "R50.9": 1, "Z00.1": 2},
    "genetics": {"Z00.1": 10, "Q21.0": 2, "F90.0": 1},
    "icu": {"A41.9": 6, "J18.9": 6, "G40.9": 2, "K35.8": 2, "E10.9": 2, "J45.9": 2, "S52.5": 1, "C91.0": 1},
    "oncology": {"C91.0": 10, "R50.9": 3, "A41.9": 1, "B34.9": 1},
    "cardiology": {"Q21.0": 8, "Z00.1": 3, "R10.4": 1, "J45.9": 1},
}
# Rare-disease patients: department mix, and chance that an encounter is coded with their disease.
RARE_DEPT_WEIGHTS = [0.10, 0.20, 0.20, 0.25, 0.08, 0.07, 0.10]
RARE_CODED = [0.15, 0.40, 0.60, 0.90, 0.30, 0.20, 0.30]
# Outcome probabilities by department, and mean length of stay (days).
OUTCOME_BASE = {
    "emergency": [0.83, 0.14, 0.029, 0.001], "pediatrics": [0.75, 0.22, 0.028, 0.002],
    "neurology": [0.80, 0.17, 0.028, 0.002], "genetics": [0.95, 0.04, 0.009, 0.001],
    "icu": [0.55, 0.30, 0.12, 0.03], "oncology": [0.60, 0.35, 0.04, 0.01],
    "cardiology": [0.75, 0.20, 0.045, 0.005],
}
LOS_MEAN = [0.3, 2.0, 1.5, 0.2, 7.0, 5.0, 2.5]

# ---------------------------------------------------------------- table layouts (the catalog's columns)


@dataclass(frozen=True)
class ColumnSpec:
    """A column's name, dtype and public metadata, as written to the catalog."""

    name: str
    dtype: str
    description: str
    bounds: tuple[int, int] | tuple[float, float] | None = None
    categories: list[Any] | None = None
    """Public values: strings, or integers (concept ids) for an integer column."""
    nullable: bool = False


PATIENT_COLUMNS = [
    ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)"),
    ColumnSpec("age", "Int64", "Age in years at enrolment", bounds=(0, 17)),
    ColumnSpec("sex", "String", "Sex recorded at birth", categories=SEXES),
    ColumnSpec("region", "String", "Home region (site-specific public list)"),  # categories set per site
    ColumnSpec("rare_disease", "String", "ICD-10 code of the rare disease, or 'none'",
               categories=RARE_CODES + [NO_RARE]),
    ColumnSpec("enrolled_year", "Int64", "Year of enrolment in the cohort", bounds=YEARS),
]
ENCOUNTER_COLUMNS = [
    ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)"),
    ColumnSpec("encounter_date", "Date", "Date of the encounter (2015-01-01 to 2025-12-31)"),
    ColumnSpec("department", "String", "Department that saw the patient", categories=DEPARTMENTS),
    ColumnSpec("icd10", "String", "Primary ICD-10 diagnosis of the encounter", categories=ICD10),
    ColumnSpec("crp_mg_l", "Float64", "C-reactive protein (mg/L); null when not measured",
               bounds=(0.0, 300.0), nullable=True),
    ColumnSpec("hemoglobin_g_dl", "Float64", "Haemoglobin (g/dL)", bounds=(4.0, 20.0)),
    ColumnSpec("wbc_10e9_l", "Float64", "White blood cell count (10^9/L); null when not measured",
               bounds=(0.0, 50.0), nullable=True),
    ColumnSpec("length_of_stay_days", "Int64", "Length of stay in days (0 = same day)", bounds=(0, 60)),
    ColumnSpec("outcome", "String", "Outcome of the encounter", categories=OUTCOMES),
]

# ---------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteProfile:
    """Public parameters that make one site's data look different from another's."""

    name: str
    title: str
    regions: tuple[str, ...]
    age_scale: float  # age weights ~ exp(-age/scale) + 0.3: small = younger
    p_female: float
    rare_prevalence: float
    rare_mix: tuple[float, ...]  # weights over RARE_CODES
    encounter_rate: float  # Poisson mean of encounters beyond the first (x2 for rare disease)
    dept_weights: tuple[float, ...]  # non-rare patients, over DEPARTMENTS
    enrol_trend: float  # enrolment grows by this fraction per year
    crp_scale: float
    hb_offset: float
    los_scale: float
    transfer_scale: float
    crp_missing: float
    wbc_missing: float


def _regions(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}_{c}" for c in "abcdef"[:n])


NAMED_SITES = [
    SiteProfile("north", "North Children's Hospital (tertiary)", _regions("north", 5), 12.0, 0.47, 0.12,
                (3, 3, 2, 1, 1, 2), 5.0, (0.30, 0.30, 0.12, 0.08, 0.05, 0.07, 0.08), 0.10,
                1.10, 0.0, 1.1, 0.5, 0.13, 0.09),
    SiteProfile("central", "Central University Hospital (tertiary)", _regions("central", 6), 9.0, 0.49, 0.06,
                (1, 4, 2, 1, 2, 1), 4.0, (0.40, 0.35, 0.07, 0.04, 0.04, 0.05, 0.05), 0.15,
                1.00, -0.2, 1.0, 1.0, 0.15, 0.10),
    SiteProfile("valley", "Valley Community Hospital", _regions("valley", 4), 5.0, 0.50, 0.015,
                (1, 4, 1, 0.5, 3, 0.5), 3.3, (0.60, 0.34, 0.02, 0.005, 0.015, 0.005, 0.015), 0.30,
                0.85, 0.3, 0.7, 3.0, 0.18, 0.12),
]


def _blend(a: SiteProfile, b: SiteProfile, t: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(SiteProfile):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float):
            out[f.name] = (1 - t) * x + t * y
        elif isinstance(x, tuple) and isinstance(x[0], (int, float)):
            out[f.name] = tuple((1 - t) * u + t * v for u, v in zip(x, y, strict=True))
    return out


def site_profile(index: int) -> SiteProfile:
    """The profile of site `index` (0-based): north, central, valley, then site4, site5, ..."""
    if index < len(NAMED_SITES):
        return NAMED_SITES[index]
    name = f"site{index + 1}"
    t = ((index - 3) % 4 + 1) / 5  # between central (0) and valley (1)
    return replace(NAMED_SITES[1], name=name, title=f"Site {index + 1} (regional hospital)",
                   regions=_regions(name, 4 + index % 3), **_blend(NAMED_SITES[1], NAMED_SITES[2], t))


# ---------------------------------------------------------------- generation


def _norm(w: Any) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def _choice_by_group(rng: np.random.Generator, group: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """For each row, draw a category index from `probs[group[row]]` (one vectorized searchsorted)."""
    n_groups, k = probs.shape
    cdf = np.cumsum(probs, axis=1)
    cdf /= cdf[:, -1:]  # exactly 1.0 from the last non-zero category on
    flat = (cdf + np.arange(n_groups)[:, None]).ravel()
    g = group.astype(np.int64)
    idx = np.searchsorted(flat, g + rng.random(len(g)), side="right") - g * k
    return np.minimum(idx, k - 1)  # guards the (2**-50) case where g + u rounds up to g + 1


def _days(iso: str) -> int:
    return int(np.datetime64(iso, "D").astype(np.int64))


def _strings(labels: list[str], idx: np.ndarray) -> pl.Series:
    return pl.Series(labels, dtype=pl.String).gather(idx)


def _frame(columns: list[ColumnSpec], data: dict[str, Any]) -> pl.DataFrame:
    df = pl.DataFrame([pl.Series(c.name, data[c.name]) if not isinstance(data[c.name], pl.Series)
                       else data[c.name].alias(c.name) for c in columns])
    return df.cast({c.name: pl.Date() if c.dtype == "Date" else getattr(pl, c.dtype) for c in columns})


def generate_site(
    profile: SiteProfile, index: int, patients: int, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generate one site's (patients, encounters) frames, deterministically for (seed, index)."""
    rng = np.random.default_rng([seed, index])
    p = profile
    n = max(1, round(patients * rng.uniform(1 - SIZE_SPREAD, 1 + SIZE_SPREAD)))

    # Patients.
    ages = np.arange(18)
    age = rng.choice(18, size=n, p=_norm(np.exp(-ages / p.age_scale) + 0.3))
    male = rng.random(n) >= p.p_female
    region = rng.choice(len(p.regions), size=n, p=_norm(1 / np.sqrt(np.arange(1, len(p.regions) + 1))))
    rare_p = np.append(p.rare_prevalence * _norm(p.rare_mix), 1 - p.rare_prevalence)
    rare = rng.choice(len(RARE_CODES) + 1, size=n, p=rare_p)  # == len(RARE_CODES) means none
    is_rare = rare < len(RARE_CODES)
    year = rng.choice(YEARS[1] - YEARS[0] + 1, size=n,
                      p=_norm(1 + p.enrol_trend * np.arange(YEARS[1] - YEARS[0] + 1)))
    ids = (index + 1) * 10**9 + np.arange(n, dtype=np.int64)
    patients_df = _frame(PATIENT_COLUMNS, {
        "patient_id": ids, "age": age, "sex": _strings(SEXES, male.astype(np.int64)),
        "region": _strings(list(p.regions), region),
        "rare_disease": _strings(RARE_CODES + [NO_RARE], rare), "enrolled_year": year + YEARS[0],
    })

    # Encounters per patient, dates inside [enrolment year, turning 18] ∩ study window, sorted.
    lam = p.encounter_rate * np.where(is_rare, 2.0, 1.0)
    counts = np.minimum(1 + rng.poisson(lam), MAX_ENCOUNTERS)
    pid = np.repeat(np.arange(n, dtype=np.int64), counts)
    first, last = _days(f"{YEARS[0]}-01-01"), _days(f"{YEARS[1]}-12-31")
    year_start = (np.arange(YEARS[0], YEARS[1] + 1) - 1970).astype("datetime64[Y]").astype("datetime64[D]")
    start = year_start.astype(np.int64)[year]
    end = np.minimum(start + (18 - age) * 365 - 1, last)
    day = start[pid] + (rng.random(len(pid)) * (end - start + 1)[pid]).astype(np.int64) - first
    key = np.sort((pid << 12) | day)  # day < 4096: one sort orders by patient, then date
    pid, day = key >> 12, (key & 4095) + first
    m = len(pid)
    r_rare = is_rare[pid]

    dept_probs = np.array([_norm(p.dept_weights), _norm(RARE_DEPT_WEIGHTS)])
    dept = _choice_by_group(rng, r_rare.astype(np.int64), dept_probs)
    dx_probs = np.array([[DEPT_DX[d].get(c, 0.0) for c in ICD10] for d in DEPARTMENTS])
    icd = _choice_by_group(rng, dept, dx_probs)
    coded_rare = r_rare & (rng.random(m) < np.asarray(RARE_CODED)[dept])
    icd = np.where(coded_rare, rare[pid], icd)  # rare codes are the first entries of ICD10

    crp_med, wbc_fac, hb_off = (np.array(v, dtype=np.float64) for v in zip(*DX_EFFECTS.values(), strict=True))
    crp = np.clip(crp_med[icd] * p.crp_scale * np.exp(rng.normal(0.0, 0.9, m)), 0.0, 300.0).round(1)
    crp[rng.random(m) < p.crp_missing] = np.nan
    r_age, r_male = age[pid], male[pid]
    hb = 11.5 + 0.08 * r_age + 1.2 * (r_male & (r_age >= 12)) + p.hb_offset + hb_off[icd]
    hb = np.clip(hb + rng.normal(0.0, 1.0, m), 4.0, 20.0).round(1)
    wbc_sigma = np.where(icd == ICD10.index("C91.0"), 1.0, 0.3)
    wbc = (10.0 - 0.18 * r_age) * wbc_fac[icd] * np.exp(rng.normal(0.0, 1.0, m) * wbc_sigma)
    wbc = np.clip(wbc, 0.0, 50.0).round(2)
    wbc[rng.random(m) < p.wbc_missing] = np.nan

    outcome_probs = np.array([OUTCOME_BASE[d] for d in DEPARTMENTS for _ in (0, 1)])
    outcome_probs[:, 2] *= p.transfer_scale
    outcome_probs[1::2, 3] *= 3.0  # rare disease: higher mortality
    outcome = _choice_by_group(rng, dept * 2 + r_rare, outcome_probs)
    not_last = np.append(pid[1:] == pid[:-1], False)  # nobody is seen again after dying
    outcome[not_last & (outcome == OUTCOMES.index("deceased"))] = OUTCOMES.index("admitted")
    los_mean = np.asarray(LOS_MEAN)[dept] * np.where(r_rare, 1.5, 1.0) * p.los_scale
    los = rng.poisson(los_mean * rng.gamma(1.5, 1 / 1.5, m))
    los = np.clip(np.where(outcome == OUTCOMES.index("admitted"), np.maximum(los, 1), los), 0, 60)

    encounters_df = _frame(ENCOUNTER_COLUMNS, {
        "patient_id": ids[pid], "encounter_date": pl.Series(day.astype(np.int32)).cast(pl.Date),
        "department": _strings(DEPARTMENTS, dept), "icd10": _strings(ICD10, icd),
        "crp_mg_l": pl.Series(crp, nan_to_null=True), "hemoglobin_g_dl": hb,
        "wbc_10e9_l": pl.Series(wbc, nan_to_null=True), "length_of_stay_days": los,
        "outcome": _strings(OUTCOMES, outcome),
    })
    return patients_df, encounters_df


# ---------------------------------------------------------------- catalog


def round_bound(x: float) -> int:
    """A round public upper bound: the next power of ten at or above `x`."""
    return 10 ** max(0, math.ceil(math.log10(max(x, 1))))


def dataset_table(meta: dict[str, Any], columns: list[ColumnSpec]) -> dict[str, Any]:
    """A catalog's `[datasets.NAME]` table, with one `columns.COLUMN` table of public metadata per column
    (keys whose value is None are left out: TOML has no null)."""
    table = {k: v for k, v in meta.items() if v is not None}
    table["columns"] = {c.name: {k: v for k, v in {
        "dtype": c.dtype, "description": c.description,
        "bounds": list(c.bounds) if c.bounds else None, "categories": c.categories,
        "nullable": True if c.nullable else None,
    }.items() if v is not None} for c in columns}
    return table


def write_site_toml(path: Path, site: dict[str, Any], datasets: dict[str, dict[str, Any]]) -> Path:
    """Write a site's catalog (`[site]` and its `[datasets.*]` tables) as TOML; return its path."""
    path.write_text(tomli_w.dumps({"site": site, "datasets": datasets}))
    return path


def write_catalog(site_dir: Path, site_name: str, title: str, n_patients_bound: int,
                  n_encounters_bound: int, regions: list[str], extra: dict[str, dict[str, Any]] | None = None
                  ) -> Path:
    """Write `<site_dir>/site.toml` declaring both datasets (and the `extra` dataset tables) with public
    bounds; return its path."""
    extra = extra or {}
    patient_cols = [replace(c, categories=list(regions)) if c.name == "region" else c
                    for c in PATIENT_COLUMNS]
    return write_site_toml(site_dir / "site.toml", {
        "name": site_name, "title": title, "database": "sqlite:///veil.db", "reporting_delta": 1e-6,
        "default_l1_epsilon": 2.0,
    }, {
        "patients": dataset_table({
            "title": "Patients",
            "description": "One row per enrolled patient: demographics and rare-disease diagnosis.",
            "path": "patients.parquet", "level": "L1", "privacy_unit": "patient_id",
            "max_rows_per_unit": 1, "max_rows": n_patients_bound, "lifetime_epsilon": 10.0,
        }, patient_cols),
        "encounters": dataset_table({
            "title": "Encounters",
            "description": "One row per hospital encounter: department, diagnosis, labs, stay and outcome.",
            "path": "encounters.parquet", "level": "L2", "privacy_unit": "patient_id",
            "max_rows_per_unit": MAX_ENCOUNTERS, "max_rows": n_encounters_bound, "lifetime_epsilon": 10.0,
        }, ENCOUNTER_COLUMNS),
        **extra,
    })


# ---------------------------------------------------------------- entry points


def synthesize(out: Path, sites: int = 3, patients: int = 10_000, seed: int = 0, tutorial: bool = False,
               visits: VisitsSpec | None = None) -> list[Path]:
    """Write <out>/<site>/patients.parquet, <out>/<site>/encounters.parquet and <out>/<site>/site.toml
    for each site; return the site.toml paths. `patients` is the nominal count per site (±30%).
    `tutorial` adds the patient-level `presentations` (L2) and `genetic_panels` (L3) datasets; `visits`
    adds the emergency visits of syndromic surveillance (L1, executor/surveillance_data.py)."""
    if sites < 1 or patients < 1 or patients * (1 + SIZE_SPREAD) >= 10**9:
        raise ValueError("need sites >= 1 and 1 <= patients < 7.7e8")
    if visits is not None:
        from veil.executor import surveillance_data

        surveillance_data.check_spec(visits, [site_profile(i).name for i in range(sites)])
    # Public bounds from the requested size: at most 1.3 * patients per site, 20 encounters each.
    max_patients = math.ceil(patients * (1 + SIZE_SPREAD))
    paths = []
    for index in range(sites):
        profile = site_profile(index)
        site_dir = Path(out) / profile.name
        site_dir.mkdir(parents=True, exist_ok=True)
        patients_df, encounters_df = generate_site(profile, index, patients, seed)
        patients_df.write_parquet(site_dir / "patients.parquet", statistics=True)
        encounters_df.write_parquet(site_dir / "encounters.parquet", statistics=True)
        extra = {}
        if tutorial:
            from veil.executor import tutorial_data

            tutorial_data.presentations(patients_df, encounters_df).write_parquet(site_dir / "presentations.parquet")
            tutorial_data.genetic_panels(patients_df, seed * 1000 + index).write_parquet(
                site_dir / "genetic_panels.parquet")
            extra = tutorial_data.catalog_tables(round_bound(2 * max_patients))
        if visits is not None:
            surveillance_data.visits(profile, index, visits, seed).write_parquet(site_dir / "visits.parquet",
                                                                                 statistics=True)
            extra["visits"] = surveillance_data.catalog_table(profile, visits)
        path = write_catalog(site_dir, profile.name, profile.title, round_bound(2 * max_patients),
                             round_bound(MAX_ENCOUNTERS * max_patients), list(profile.regions), extra)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m veil.executor.synth OUT [--sites N] [--patients N] [--seed N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in synthesize(args.out, args.sites, args.patients, args.seed):
        print(path)


if __name__ == "__main__":
    main()
