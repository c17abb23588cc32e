"""Standing DP counts gathered from the sites of a study (issue 18, step 4): one series per group, and an
alarm rule on it. Everything here is post-processing of what the sites released: it costs no budget.

Combining. A site releases window w of a standing query (`wire.StandingWindow`) with, per group, the DP
count of the window (one node of its binary tree, discrete Gaussian noise of scale s) and the DP running
total (the sum of `total_nodes` = m nodes, each of scale s). Every node's noise is independent, across
nodes, groups and sites. The combined count of a window is the sum of the sites' raw DP counts (and of the
groups' when a series sums groups, `by=`); its noise is a sum of independent discrete Gaussians of variance
sum s_i^2, and its interval is OpenDP's `discrete_gaussian_scale_to_accuracy` at scale sqrt(sum s_i^2)
(the running total's at sqrt(sum m_i s_i^2)). As in `veil.query.continual`, this is exact up to a negligible
statistical distance: a sum of independent discrete Gaussians of scale >= 1 is that close to the discrete
Gaussian of the summed variance (Canonne, Kamath and Steinke 2020); tests/test_surveillance.py checks the
coverage by simulation. A window is combined only from the sites that have released it (the `sites`
column says which); the shown values follow `veil.query.estimates`' rule (estimate inside its interval, a
count never below 0; the raw sums are in `Surveillance.raw`).

The alarm rule (`AlarmRule`; EARS-C2-like, on the released series, DP-aware). Window t of a series is
flagged when the lower end of its count's interval is above the upper end of its baseline's interval:

    max(count_t - a_t, 0) > max(mean_b + a_b, 0)

where count_t is the combined raw DP count of window t, a_t its half-width, mean_b the mean of the raw
counts of the `baseline` windows t-guard-baseline .. t-guard-1 (t-9 .. t-3 by default: a guard of 2
windows keeps the start of a rise out of its own baseline) and a_b the half-width of that mean (OpenDP's
accuracy at the scale of the sum of their noises, divided by `baseline`), both intervals at the rule's
`confidence`. What it flags: a window whose true count exceeds the true mean of its baseline windows, with
the DP noise accounted for. When the true count is at most the baseline's true mean, a flag needs the
window's noise above its half-width or the baseline's below minus its own, so a flag has probability at
most 1 - confidence (each of those one-sided tails is at most (1 - confidence) / 2); it is much less in
practice (both half-widths add up). It models no seasonality and no week-to-week variation beyond the
noise: a rise from a seasonal trend over the baseline's weeks is a rise, and it is flagged once it clears
the noise. A window is judged only when it and all its baseline windows were released by the same sites
(`alarm` is null otherwise, as for the first windows).

Measured (tests/test_surveillance.py states and checks the bounds; the figures are over 2,000 simulated
runs). Three sites of 250, 350 and 400 patients a week (Poisson) with a +-10% seasonal swing, each site's
standing query at epsilon 1 over 52 weekly windows, k = 4, delta 1e-6 (the full tree: scale 43.5 per site,
a combined weekly half-width of 148 at 95%), through OpenDP's measurement (`continual.simulate`):
- detection: a sustained rise of 30% (about 300 a week) from week 30 is flagged at week 30 in 87% of runs
  and by week 31 in 98.5% (bound: within 2 windows in >= 90%); a 25% rise by week 31 in 92%, 20% in 73%;
- false alarms without a rise: 0.95 per 52 windows on average with the seasonal swing (65% of runs have at
  least one), most of them on its upswing, where the true count does exceed the baseline's (bound: <= 1.5),
  and 0.41 without it, Poisson variation only (35% of runs; bound: <= 0.7); windows whose true count is at
  most their baseline's true mean are flagged in 0.2% of cases (the rule's promise: at most 5%).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any

import numpy as np
import polars as pl

from veil.errors import CatalogError, QueryError
from veil.query import estimates
from veil.sql import parse_sql
from veil.wire import StandingInfo, StandingWindow

RESERVED = ("window", "start", "end", "count", "lower", "upper", "total", "total_lower", "total_upper", "sites",
            "baseline", "baseline_upper", "alarm")
"""The series' own columns, in order after `window`, `start`, `end` and the group keys."""


@functools.lru_cache(maxsize=8192)
def accuracy(scale: float, confidence: float) -> float:
    """Half-width of the interval of a sum of independent discrete Gaussian noises whose variances add up
    to scale^2: OpenDP's discrete Gaussian accuracy (P(|error| >= it) <= 1 - confidence)."""
    from opendp.accuracy import discrete_gaussian_scale_to_accuracy  # OpenDP loads on first use, not at start

    return float(discrete_gaussian_scale_to_accuracy(scale, 1.0 - confidence))


@dataclass(frozen=True)
class Alarms:
    """The rule applied to a series (windows along the last axis): the baseline mean (shown: never below 0),
    the upper end of its interval, the flags, and which windows could be judged."""

    baseline: np.ndarray
    baseline_upper: np.ndarray
    alarm: np.ndarray
    judged: np.ndarray


@dataclass(frozen=True)
class AlarmRule:
    """Flag window t when its count's interval lies above its baseline mean's (module docstring): baseline
    = the mean of windows t-guard-baseline .. t-guard-1, intervals at `confidence`. Post-processing only."""

    baseline: int = 7
    guard: int = 2
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not (isinstance(self.baseline, int) and self.baseline >= 1 and isinstance(self.guard, int)
                and self.guard >= 0 and 0.0 < self.confidence < 1.0):
            raise QueryError("invalid_alarm_rule", f"an alarm rule needs baseline >= 1 window, guard >= 0 windows and "
                             f"0 < confidence < 1, got {self}", hint="e.g. AlarmRule(baseline=7, guard=2, confidence=0.95)")

    def evaluate(self, counts: np.ndarray, scales: np.ndarray,
                 sites: Sequence[Hashable] | None = None) -> Alarms:
        """Apply the rule to combined raw DP counts (`counts`: ... x windows) whose noise in each window has
        scale `scales[w]` (nan: window not released). `sites[w]` says who released window w; a window is
        judged only when it and its baseline windows have the same."""
        counts, scales = np.asarray(counts, dtype=np.float64), np.asarray(scales, dtype=np.float64)
        windows = scales.shape[0]
        baseline = np.full(counts.shape, np.nan)
        upper = np.full(counts.shape, np.nan)
        alarm = np.zeros(counts.shape, dtype=bool)
        judged = np.zeros(windows, dtype=bool)
        for t in range(self.baseline + self.guard, windows):
            first, end = t - self.guard - self.baseline, t - self.guard
            span = [*range(first, end), t]
            if np.isnan(scales[span]).any() or (sites is not None and len({sites[w] for w in span}) > 1):
                continue
            mean = counts[..., first:end].mean(axis=-1)
            mean_accuracy = accuracy(math.sqrt(float(np.sum(scales[first:end] ** 2))), self.confidence) / self.baseline
            lower = np.maximum(counts[..., t] - accuracy(float(scales[t]), self.confidence), 0.0)
            upper[..., t] = np.maximum(mean + mean_accuracy, 0.0)
            baseline[..., t] = np.maximum(mean, 0.0)
            alarm[..., t] = lower > upper[..., t]
            judged[t] = True
        return Alarms(baseline, upper, alarm, judged)


def find(name: str, listings: dict[str, list[StandingInfo]]) -> dict[str, StandingInfo]:
    """The standing query called `name` at each site (`listings`: each site's GET /standing). Refuses a
    site that has none, or several, by that name."""
    found: dict[str, StandingInfo] = {}
    for site, infos in listings.items():
        named = [i for i in infos if i.spec.name == name]
        if not named:
            others = [s for s in listings if s != site]
            raise CatalogError("standing_not_found", f"site '{site}' has no standing query named '{name}' for "
                               f"this project (it has: {', '.join(sorted({i.spec.name for i in infos})) or 'none'})",
                               hint=f"file it there with study.standing(...), or gather from the others with "
                                    f"sites={others}" if others else "file it with study.standing(...)",
                               status=404)
        if len(named) > 1:
            raise CatalogError("standing_name_ambiguous", f"site '{site}' has {len(named)} standing queries named "
                               f"'{name}' (ids {', '.join(str(i.id) for i in named)})",
                               hint="give each standing query of a study its own name")
        found[site] = named[0]
    return found


def check_same_spec(infos: dict[str, StandingInfo]) -> None:
    """Refuse to combine sites whose standing queries differ (other SQL, dates, windows, bound, ...): name
    the site and each difference."""
    (first, reference), *others = infos.items()
    want = reference.spec.model_dump()
    for site, info in others:
        have = info.spec.model_dump()
        diff = [f"{k} {have[k]!r} (site '{first}': {want[k]!r})" for k in want if have[k] != want[k]]
        if diff:
            raise QueryError("standing_specs_differ", f"standing query '{reference.spec.name}' differs at site "
                             f"'{site}': {'; '.join(diff)}; its windows cannot be combined with site '{first}'s",
                             hint="gather the sites whose queries match (sites=[...]), or file the same standing "
                                  "query everywhere under a new name")


class Surveillance:
    """A standing query gathered from the sites of a study (`study.surveillance(name)`): one combined series
    per group (`.table`), its alarms (`.alarms()`) and a plot (`.plot()`). Costs nothing."""

    def __init__(self, name: str, infos: dict[str, StandingInfo], windows: dict[str, list[StandingWindow]],
                 rule: AlarmRule | None = None) -> None:
        if not infos:
            raise QueryError("no_sites", f"standing query '{name}' was gathered from no site",
                             hint="name at least one site")
        check_same_spec(infos)
        self.name, self.infos, self.rule = name, infos, rule or AlarmRule()
        self.spec = next(iter(infos.values())).spec
        self.keys: list[str] = list(parse_sql(self.spec.sql).group_by)
        """The group keys (the SQL's GROUP BY columns)."""
        self._parts = _parts(self.keys, windows)
        self.table = self.series()
        """The combined series per group (module docstring): one row per window and group."""

    @property
    def raw(self) -> pl.DataFrame:
        """The combined raw DP counts and running totals (unbiased; sum these, never the shown values)."""
        return self._combined(self.keys).select("window", *self.keys, "count", "total", "sites")

    def series(self, by: Sequence[str] | None = None) -> pl.DataFrame:
        """The combined series per value of the keys `by` (default: every group key; [] sums all groups),
        with the rule's alarms: window, start, end, keys, count, lower, upper, total, total_lower,
        total_upper, sites, baseline, baseline_upper, alarm (null where it cannot be judged)."""
        by = self._by(by)
        combined = self._combined(by)
        if not combined.height:  # nothing released yet
            return pl.DataFrame(schema={**{c: _SCHEMA.get(c, pl.Null) for c in ("window", "start", "end", *by)},
                                        **{c: _SCHEMA[c] for c in RESERVED[3:]}})
        out = [group.with_columns(*self._shown(group, self.spec.confidence), *self._alarm_columns(group))
               for group in (combined.partition_by(by, maintain_order=True) if by else [combined])]
        return pl.concat(out).sort(["window", *by]).select("window", "start", "end", *by, *RESERVED[3:])

    def alarms(self, by: Sequence[str] | None = None) -> pl.DataFrame:
        """The windows the alarm rule flags (the series' rows with alarm true)."""
        return self.series(by).filter(pl.col("alarm"))

    @property
    def next_release(self) -> datetime | None:
        """When the next window is released at the soonest site (None when every site has finished)."""
        times = [datetime.fromisoformat(i.next_release_at) for i in self.infos.values() if i.next_release_at]
        return min(times) if times else None

    def plot(self, by: Sequence[str] | None = None, ax: Any = None) -> Any:
        """One panel per group (of `by`): the combined count of each window with its interval as a band, the
        baseline's upper end as a dashed line, alarms in red, windows not every site has released yet hollow.
        Needs matplotlib (veil[lab]); returns the figure."""
        from veil.extras import needs

        with needs("a surveillance plot"):
            import matplotlib.pyplot as plt

        by = self._by(by)
        table = self.series(by)
        if not table.height:
            raise QueryError("nothing_released", f"standing query '{self.name}' has released no window yet: nothing "
                             "to plot", hint=f"the next window is released at {self.next_release or 'no site'}")
        groups = table.select(by).unique(maintain_order=True).rows() if by else [()]
        if ax is None:
            fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.6 * len(groups)), sharex=True, squeeze=False)
            panels = list(axes[:, 0])
        else:
            fig, panels = ax.figure, [ax] * len(groups)
        for panel, values in zip(panels, groups):
            rows = table.filter(*(pl.col(k).eq_missing(v) for k, v in zip(by, values))) if by else table
            start = rows["start"].to_list()
            panel.fill_between(start, rows["lower"].to_numpy(), rows["upper"].to_numpy(), alpha=0.25,
                               step="mid", label=f"{self.spec.confidence:.0%} interval")
            panel.plot(start, rows["count"].to_numpy(), marker=".", label="count (all sites)")
            panel.plot(start, rows["baseline_upper"].to_numpy(), linestyle="--", color="grey",
                       label="baseline (upper end)")
            partial = rows.filter(pl.col("sites").list.len() < len(self.infos))
            if partial.height:
                panel.scatter(partial["start"].to_list(), partial["count"].to_numpy(), facecolors="white",
                              edgecolors="black", zorder=3, label="partial (not every site yet)")
            flagged = rows.filter(pl.col("alarm"))
            panel.scatter(flagged["start"].to_list(), flagged["count"].to_numpy(), color="red", zorder=3,
                          label="alarm")
            panel.set_title(", ".join(f"{k} = {v}" for k, v in zip(by, values)) or self.name)
            panel.set_ylabel("count")
        panels[0].legend(loc="upper left", fontsize="small")
        fig.suptitle(f"{self.name}: {', '.join(self.infos)}")
        fig.autofmt_xdate()
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        spec = self.spec
        rows = "".join(
            f"<tr><td>{escape(site)}</td><td>{escape(i.dataset)}</td><td>{i.status}</td>"
            f"<td>{i.windows_released} of {spec.horizon}</td><td>{i.epsilon:g} (rho {i.rho:.4g})</td>"
            f"<td>{escape(i.next_release_at or '-')}</td></tr>" for site, i in self.infos.items())
        flagged = self.alarms()
        alarms = (", ".join(f"window {w}" for w in flagged["window"].unique().sort().to_list()) or "none")
        return (f"<b>Standing query {escape(self.name)}</b>: <code>{escape(spec.sql)}</code><br>"
                f"{spec.window_days}-day windows from {spec.start} ({spec.horizon} windows), each patient in at "
                f"most {spec.max_windows} cells; next release {self.next_release or 'none (finished)'}<br>"
                f"<table><tr><th>site</th><th>dataset</th><th>status</th><th>windows</th><th>epsilon (whole horizon, "
                f"charged once)</th><th>next release</th></tr>{rows}</table>"
                f"Alarms ({self.rule}): {escape(alarms)}")

    def __repr__(self) -> str:
        return (f"<Veil surveillance {self.name} at {', '.join(self.infos)}: {self.table.height} rows, "
                f"{self.alarms().height} alarm(s)>")

    # --------------------------------------------------------------- combining

    def _by(self, by: Sequence[str] | None) -> list[str]:
        by = list(self.keys if by is None else ([by] if isinstance(by, str) else by))
        unknown = [k for k in by if k not in self.keys]
        if unknown:
            raise QueryError("unknown_group_key", f"standing query '{self.name}' has no group key {unknown}",
                             hint=f"group by some of {self.keys} (or [] for all groups summed)")
        return by

    def _combined(self, by: list[str]) -> pl.DataFrame:
        """Raw sums per window and value of `by` over the sites (and groups) that released it, with the
        variances of their noise."""
        return self._parts.group_by("window", "start", "end", *by).agg(
            pl.col("count").sum(), pl.col("total").sum(),
            (pl.col("scale") ** 2).sum().alias("variance"),
            (pl.col("nodes") * pl.col("scale") ** 2).sum().alias("total_variance"),
            pl.col("site").unique().sort().alias("sites")).sort("window", *by)

    @staticmethod
    def _shown(group: pl.DataFrame, confidence: float) -> list[pl.Series]:
        """count, lower, upper, total, total_lower, total_upper as shown (`estimates.additive`)."""
        out = []
        for name, variance in (("count", "variance"), ("total", "total_variance")):
            shown = [estimates.additive("count", raw, accuracy(math.sqrt(var), confidence), None)
                     for raw, var in group.select(name, variance).iter_rows()]
            prefix = "" if name == "count" else "total_"
            out += [pl.Series(name, [s.estimate for s in shown], dtype=pl.Int64),
                    pl.Series(f"{prefix}lower", [s.lower for s in shown], dtype=pl.Float64),
                    pl.Series(f"{prefix}upper", [s.upper for s in shown], dtype=pl.Float64)]
        return out

    def _alarm_columns(self, group: pl.DataFrame) -> list[pl.Series]:
        """baseline, baseline_upper and alarm for one group's series (windows in order, gaps allowed)."""
        last = int(group["window"].max())  # type: ignore[arg-type]
        counts, scales = np.zeros(last + 1), np.full(last + 1, np.nan)
        sites: list[Hashable] = [None] * (last + 1)
        position = group["window"].to_numpy()
        counts[position] = group["count"].to_numpy()
        scales[position] = np.sqrt(group["variance"].to_numpy())
        for w, names in zip(position, group["sites"].to_list()):
            sites[w] = tuple(names)
        result = self.rule.evaluate(counts, scales, sites)
        judged = result.judged[position].tolist()

        def judged_only(values: np.ndarray) -> list[Any]:
            return [v if j else None for v, j in zip(values[position].tolist(), judged)]

        return [pl.Series("baseline", judged_only(result.baseline), dtype=pl.Float64),
                pl.Series("baseline_upper", judged_only(result.baseline_upper), dtype=pl.Float64),
                pl.Series("alarm", judged_only(result.alarm), dtype=pl.Boolean)]


_PART_COLUMNS = ("site", "window", "start", "end", "count", "total", "scale", "nodes")
_SCHEMA: dict[str, Any] = {
    "site": pl.String, "window": pl.Int64, "start": pl.Date, "end": pl.Date, "count": pl.Int64, "total": pl.Int64,
    "scale": pl.Float64, "nodes": pl.Int64, "lower": pl.Float64, "upper": pl.Float64, "total_lower": pl.Float64,
    "total_upper": pl.Float64, "sites": pl.List(pl.String), "baseline": pl.Float64, "baseline_upper": pl.Float64,
    "alarm": pl.Boolean}


def _parts(keys: list[str], windows: dict[str, list[StandingWindow]]) -> pl.DataFrame:
    """One row per site, released window and group: its raw DP count and total, noise scale and total's nodes."""
    clash = set(keys) & {*RESERVED, *_PART_COLUMNS, "variance", "total_variance"}
    if clash:
        raise QueryError("standing_key_clash", f"a group key is named like a column of the series: {sorted(clash)}",
                         hint="rename the group column in the standing query's SQL (GROUP BY another column)")
    rows = [{"site": site, "window": w.window, "start": w.start, "end": w.end,
             **{k: cell.key.get(k) for k in keys}, "count": cell.count, "total": cell.total,
             "scale": w.noise_scale, "nodes": w.total_nodes}
            for site, released in windows.items() for w in released for cell in w.cells]
    if not rows:
        return pl.DataFrame(schema={c: _SCHEMA.get(c, pl.Null) for c in ("site", "window", "start", "end", *keys,
                                                                          "count", "total", "scale", "nodes")})
    return pl.DataFrame(rows, infer_schema_length=None)
