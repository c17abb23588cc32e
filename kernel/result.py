"""Releases as researchers see them: one type for one site's release and for several sites' releases
combined (post-processing only). Either way a Result has the same attributes, the same HTML and the same
notebook metadata: rows (estimate, `_lower`, `_upper` per statistic) as a Polars frame with their level,
the raw noisy values behind them, notes, the cost and receipt of each site's release."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from veil.kernel.errors import VeilUsageError
from veil.query.estimates import cell_text
from veil.wire import Release

MOCK_LABEL = "MOCK (made-up rows; not a release; nothing spent)"


def _frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows as a frame; a column with no value (e.g. every estimate not informative) is Float64, not Null,
    so that frames from several sites or queries concatenate."""
    frame = pl.DataFrame(rows) if rows else pl.DataFrame()
    empty = [name for name, dtype in frame.schema.items() if dtype == pl.Null]
    return frame.with_columns(pl.col(empty).cast(pl.Float64)) if empty else frame


def _table(rows: list[dict[str, Any]], keys: list[str], stats: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*keys, *stats])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k)))}</td>" for k in keys)
        + "".join(f"<td>{html.escape(cell_text(r, s))}</td>" for s in stats) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class Result:
    """A DP result: `df` holds, per statistic, the estimate and its `_lower`/`_upper` bounds at `level`.

    `results` holds each site's own Result (a single site's is the result itself); `releases`, `cost` and
    `receipts` are per site. Make one with `Result.of` (one site) or `Result.combined` (several)."""

    rows: list[dict[str, Any]]
    raw_rows: list[dict[str, Any]]
    group_by: list[str]
    statistics: list[str]
    confidence: float
    releases: dict[str, Release]
    mock: bool = False
    notes: list[str] = field(default_factory=list)
    parts: dict[str, Result] = field(default_factory=dict)
    """Each site's Result when several are combined; empty for one site's release."""

    @classmethod
    def of(cls, release: Release, mock: bool = False) -> Result:
        """One site's release."""
        return cls(release.rows, release.raw, list(release.group_by), [s.name for s in release.statistics],
                   release.confidence, {release.site: release}, mock, list(release.notes))

    @classmethod
    def combined(cls, results: dict[str, Result], rows: list[dict[str, Any]], raw_rows: list[dict[str, Any]],
                 group_by: list[str], statistics: list[str], confidence: float, notes: list[str]) -> Result:
        """Several sites' results and their combination (rows computed by `combine.combine`)."""
        site_notes = [f"{site}: {note}" for site, r in results.items() for note in r.notes]
        releases = {site: r.release for site, r in results.items()}
        return cls(rows, raw_rows, group_by, statistics, confidence, releases,
                   all(r.mock for r in results.values()), [*notes, *site_notes], dict(results))

    # ---------------------------------------------------------------- what every result has

    @property
    def df(self) -> pl.DataFrame:
        return _frame(self.rows).with_columns(pl.lit(self.confidence).alias("level"))

    @property
    def raw(self) -> pl.DataFrame:
        """The raw noisy values behind `df` (unbiased; `df` moves each into its interval and public range);
        for several sites, the sums of theirs."""
        return _frame(self.raw_rows)

    @property
    def results(self) -> dict[str, Result]:
        """Each site's own result: for one site's release, the result itself."""
        return self.parts or {site: self for site in self.releases}

    @property
    def sites(self) -> list[str]:
        return list(self.releases)

    @property
    def dataset(self) -> str:
        return next(iter(self.releases.values())).dataset

    @property
    def cost(self) -> dict[str, dict[str, float]]:
        """What each site charged: epsilon (at its reporting delta), delta (total) and rho (what adds up)."""
        return {site: {"epsilon": r.cost.epsilon, "delta": r.cost.delta + r.cost.epsilon_delta, "rho": r.cost.rho}
                for site, r in self.releases.items()}

    @property
    def receipts(self) -> dict[str, str]:
        """Each site's receipt: the hash of its audit entry (check with `veil receipts verify`)."""
        return {site: r.receipt for site, r in self.releases.items()}

    @property
    def provenance(self) -> list[dict[str, Any]]:
        """What the notebook records of each site's release: site, dataset, canonical query, cost, receipt, and the
        project's grant just after it (`grant`, live releases)."""
        return [{"site": r.site, "dataset": r.dataset, "query": r.query, "cost": r.cost.model_dump(),
                 "receipt": r.receipt, "mock": self.results[site].mock, **({"grant": r.grant} if r.grant else {})}
                for site, r in self.releases.items()]

    # ---------------------------------------------------------------- one site's, by name

    @property
    def release(self) -> Release:
        """The one site's release (several sites: `results[site].release`)."""
        if len(self.releases) != 1:
            raise VeilUsageError(f"this result combines {len(self.releases)} sites' releases: "
                                 "read one with .results[site].release, or all with .releases")
        return next(iter(self.releases.values()))

    @property
    def receipt(self) -> str:
        """The one site's receipt (several sites: `receipts`)."""
        return self.release.receipt

    # ---------------------------------------------------------------- display

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        data = {"text/html": self._repr_html_(), "text/plain": repr(self)}
        live = [p for p in self.provenance if not p["mock"]]
        return data, ({"veil": {"releases": live}} if live else {})

    def _caption(self) -> str:
        if len(self.releases) == 1:
            where = f"site {self.sites[0]}"
        else:
            where = f"{len(self.releases)} sites combined ({', '.join(self.sites)})"
        label = f"{MOCK_LABEL} · " if self.mock else ""
        costs = ", ".join(f"{s}: ε={c['epsilon']:.3g}" for s, c in self.cost.items())
        receipts = "" if self.mock else " · receipt " + ", ".join(r[:16] for r in self.receipts.values())
        return f"{label}{where} · {self.dataset} · {self.confidence:.0%} intervals · cost {costs}{receipts}"

    def _repr_html_(self) -> str:
        caption = html.escape(self._caption()).replace("MOCK", "<b>MOCK</b>", 1)
        notes = "".join(f"<br><i>{html.escape(n)}</i>" for n in self.notes)
        return f"<p>{caption}{notes}</p>" + _table(self.rows, self.group_by, self.statistics)

    def __repr__(self) -> str:
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return f"<Veil result: {self._caption()}>{notes}\n{self.df}"
