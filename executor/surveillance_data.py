"""Synthetic emergency-department visits for syndromic surveillance (tutorial 6, `veil demo`, tests).

`visits(profile, index, spec, seed)` draws one site's `visits` dataset: one row per emergency-department
visit of a child of the site's catchment, with the visit's date, the child's home region (the site's
public regions), age band and the visit's syndrome. Each site serves a fixed catchment of children
(`CATCHMENT`: per-site size, independent of the cohort's `--patients`); each child has a home region, an
age band and a propensity to come to the emergency department (gamma distributed, so that some children
come several times). Each day's visits per syndrome are Poisson, with a seasonal baseline on the calendar
(influenza-like illness, ILI, peaks at the end of January; respiratory and gastro-intestinal visits vary
less; other visits are flat); the visits are given to children in proportion to their propensity and
their age band's rate for the syndrome. A child's visits beyond `MAX_VISITS` are dropped (the public
`max_rows_per_unit`).

An outbreak (`Outbreak`) multiplies a site's ILI rate by `factor` in every region for `OUTBREAK_WEEKS`
weeks from its `week` (0-based, counted from the series' start). The series covers `weeks` weeks from
`start` (a Monday, UTC days), also those after today: in a live demo they stand for visits yet to come,
which the site's standing queries release on their schedule. Same (seed, spec), same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from veil.executor.synth import ColumnSpec, SiteProfile, _norm, dataset_table, round_bound

SYNDROMES = ["ILI", "GI", "respiratory", "other"]
"""Syndromes, as a triage coding rule assigns them: influenza-like illness, gastro-intestinal, other respiratory."""
AGE_BANDS = ["0-4", "5-11", "12-17"]
AGE_SHARE = [0.28, 0.39, 0.33]
"""The catchment's children by age band."""
RATES = {"ILI": 0.006, "GI": 0.004, "respiratory": 0.005, "other": 0.012}
"""Mean visits per child and week, by syndrome, over the year."""
AGE_RATE = {"ILI": (1.6, 1.0, 0.6), "GI": (1.8, 0.8, 0.6), "respiratory": (1.7, 0.9, 0.6), "other": (1.2, 0.9, 1.0)}
"""Each age band's rate relative to the syndrome's mean (over AGE_BANDS)."""
SEASON = {"ILI": (0.2, 31), "GI": (0.3, 45), "respiratory": (0.4, 10), "other": (0.0, 0)}
"""(amplitude, day of the year of the peak): the rate is `RATES * (1 + amplitude * cos(2 pi (day - peak) / 365.25))`."""
CATCHMENT = {"north": 160_000, "central": 200_000, "valley": 70_000}
"""Children served by each site's emergency department; sites beyond the third serve DEFAULT_CATCHMENT."""
DEFAULT_CATCHMENT = 100_000
PROPENSITY_SHAPE = 0.7
"""Gamma shape of a child's propensity to visit (mean 1): smaller means more repeat visitors."""
MAX_VISITS = 20
"""The most visits of one child in the dataset (its public max_rows_per_unit)."""
OUTBREAK_WEEKS = 4
"""How many weeks an outbreak lasts."""
WEEKS = 52
"""Weeks in a series, unless asked otherwise."""
WEEKS_CLOSED = 40
"""By default the series starts this many whole weeks before the current one (see `default_start`)."""


@dataclass(frozen=True)
class Outbreak:
    """A rise of ILI visits at `site`: the rate times `factor` for OUTBREAK_WEEKS weeks from `week` (0-based)."""

    site: str
    week: int
    factor: float = 3.0


@dataclass(frozen=True)
class VisitsSpec:
    """What series of visits to write: `weeks` weeks from `start` (a Monday), with `outbreaks`."""

    start: date
    weeks: int = WEEKS
    outbreaks: tuple[Outbreak, ...] = ()


def default_start(today: date | None = None) -> date:
    """The Monday WEEKS_CLOSED weeks before this week's Monday (UTC): that many weekly windows have closed
    by today, and the next one closes next Monday."""
    today = today or datetime.now(UTC).date()
    return today - timedelta(days=today.weekday(), weeks=WEEKS_CLOSED)


def parse_outbreak(text: str) -> Outbreak:
    """`SITE:WEEK[:FACTOR]` (e.g. `north:30` or `central:30:2.5`) as an Outbreak; ValueError saying what to give."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError
        week, factor = int(parts[1]), float(parts[2]) if len(parts) == 3 else Outbreak.factor
    except ValueError:
        raise ValueError(f"--outbreak {text!r}: give SITE:WEEK[:FACTOR], e.g. north:30 or central:30:2.5") from None
    if week < 0 or not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"--outbreak {text!r}: the week is 0 or more and the factor a positive number")
    return Outbreak(parts[0], week, factor)


def check_spec(spec: VisitsSpec, sites: list[str]) -> None:
    """Refuse a spec that cannot be drawn for these sites (ValueError saying what to change)."""
    if spec.start.weekday() != 0:
        raise ValueError(f"the series starts on a Monday: {spec.start} is a {spec.start:%A}")
    if not 1 <= spec.weeks <= 520:
        raise ValueError(f"--weeks {spec.weeks}: give 1 to 520 weeks")
    for outbreak in spec.outbreaks:
        if outbreak.site not in sites:
            raise ValueError(f"--outbreak at {outbreak.site!r}: the sites are {', '.join(sites)}")
        if outbreak.week >= spec.weeks:
            raise ValueError(f"--outbreak at {outbreak.site} from week {outbreak.week}: the series has weeks 0 to "
                             f"{spec.weeks - 1}")


def catchment(profile: SiteProfile) -> int:
    """The number of children the site's emergency department serves (public: the dataset's size rests on it)."""
    return CATCHMENT.get(profile.name, DEFAULT_CATCHMENT)


def visits(profile: SiteProfile, index: int, spec: VisitsSpec, seed: int) -> pl.DataFrame:
    """One site's visits, sorted by date and patient, deterministically for (seed, index, spec)."""
    rng = np.random.default_rng([seed, index, 6])  # a stream of its own: the cohort's data do not change
    n = catchment(profile)
    region = rng.choice(len(profile.regions), size=n,
                        p=_norm(1 / np.sqrt(np.arange(1, len(profile.regions) + 1))))
    age = rng.choice(len(AGE_BANDS), size=n, p=_norm(AGE_SHARE))
    propensity = rng.gamma(PROPENSITY_SHAPE, 1 / PROPENSITY_SHAPE, n)

    days = np.arange(7 * spec.weeks)
    day_of_year = np.array([(spec.start + timedelta(days=int(d))).timetuple().tm_yday for d in days])
    ili_factor = np.ones(spec.weeks)
    for outbreak in spec.outbreaks:
        if outbreak.site == profile.name:
            ili_factor[outbreak.week:outbreak.week + OUTBREAK_WEEKS] *= outbreak.factor
    who, when, what = [], [], []
    for s, syndrome in enumerate(SYNDROMES):
        weight = propensity * np.asarray(AGE_RATE[syndrome])[age]
        amplitude, peak = SEASON[syndrome]
        rate = RATES[syndrome] / 7 * (1 + amplitude * np.cos(2 * np.pi * (day_of_year - peak) / 365.25))
        if syndrome == "ILI":
            rate = rate * ili_factor[days // 7]
        per_day = rng.poisson(rate * weight.sum())
        who.append(rng.choice(n, size=int(per_day.sum()), p=weight / weight.sum()))
        when.append(np.repeat(days, per_day))
        what.append(np.full(int(per_day.sum()), s))
    child, day, syndrome_idx = np.concatenate(who), np.concatenate(when), np.concatenate(what)
    order = np.lexsort((syndrome_idx, day, child))  # by child, then date
    child, day, syndrome_idx = child[order], day[order], syndrome_idx[order]
    first = np.searchsorted(child, child, side="left")
    keep = np.arange(len(child)) - first < MAX_VISITS  # a child's visits after the MAX_VISITS-th are dropped
    child, day, syndrome_idx = child[keep], day[keep], syndrome_idx[keep]

    start_day = (spec.start - date(1970, 1, 1)).days
    frame = pl.DataFrame({
        "patient_id": (index + 1) * 10**9 + 5 * 10**8 + child.astype(np.int64),
        "visit_date": pl.Series((start_day + day).astype(np.int32)).cast(pl.Date),
        "region": pl.Series(list(profile.regions), dtype=pl.String).gather(region[child]),
        "age_band": pl.Series(AGE_BANDS, dtype=pl.String).gather(age[child]),
        "syndrome": pl.Series(SYNDROMES, dtype=pl.String).gather(syndrome_idx),
    })
    return frame.sort("visit_date", "patient_id", maintain_order=True)


def columns(regions: list[str], spec: VisitsSpec) -> list[ColumnSpec]:
    """The visits dataset's columns and their public metadata."""
    last = spec.start + timedelta(weeks=spec.weeks, days=-1)
    return [
        ColumnSpec("patient_id", "Int64", "Pseudonymous patient identifier (the privacy unit)"),
        ColumnSpec("visit_date", "Date", f"Date of the visit ({spec.start.isoformat()} to {last.isoformat()})"),
        ColumnSpec("region", "String", "The patient's home region", categories=list(regions)),
        ColumnSpec("age_band", "String", "The patient's age band in years", categories=AGE_BANDS),
        ColumnSpec("syndrome", "String", "Syndrome coded at triage: influenza-like illness (ILI), "
                   "gastro-intestinal (GI), other respiratory, or other", categories=SYNDROMES),
    ]


def catalog_table(profile: SiteProfile, spec: VisitsSpec) -> dict[str, Any]:
    """The `[datasets.visits]` table: public bounds from the catchment and MAX_VISITS, never from the draw."""
    return dataset_table({
        "title": "Emergency visits",
        "description": f"One row per emergency-department visit: date, home region, age band and syndrome, for "
                       f"syndromic surveillance; weekly series from Monday {spec.start.isoformat()} for "
                       f"{spec.weeks} weeks.",
        "path": "visits.parquet", "level": "L1", "privacy_unit": "patient_id",
        "max_rows_per_unit": MAX_VISITS, "max_rows": round_bound(MAX_VISITS * catchment(profile)),
        "lifetime_epsilon": 20.0,
    }, columns(list(profile.regions), spec))
