"""Releases as researchers see them: Polars frames with estimate, interval and level, plus cost and
receipt, rendered as HTML in notebooks; and multi-center results combined by post-processing only."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import polars as pl

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


@dataclass
class Result:
    """One site's DP release. `df` holds, per statistic, the estimate and its `_lower`/`_upper` bounds."""

    release: Release
    mock: bool = False

    @property
    def df(self) -> pl.DataFrame:
        return _frame(self.release.rows).with_columns(pl.lit(self.release.confidence).alias("level"))

    @property
    def raw(self) -> pl.DataFrame:
        """The raw noisy values behind `df` (unbiased; `df` moves each into its interval and public range)."""
        return _frame(self.release.raw)

    @property
    def statistics(self) -> list[str]:
        return [s.name for s in self.release.statistics]

    @property
    def cost(self) -> dict[str, float]:
        c = self.release.cost
        return {"epsilon": c.epsilon, "delta": c.delta + c.epsilon_delta, "rho": c.rho}

    @property
    def receipt(self) -> str:
        return self.release.receipt

    @property
    def provenance(self) -> dict[str, Any]:
        """What the notebook records of a release: site, dataset, canonical query, cost, receipt."""
        r = self.release
        return {"site": r.site, "dataset": r.dataset, "query": r.query, "cost": r.cost.model_dump(),
                "receipt": r.receipt, "mock": self.mock}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        data = {"text/html": self._repr_html_(), "text/plain": repr(self)}
        return data, ({} if self.mock else {"veil": {"releases": [self.provenance]}})

    def _repr_html_(self) -> str:
        r = self.release
        label = MOCK_LABEL if self.mock else f"site {html.escape(r.site)}"
        caption = (f"<p><b>{label}</b> · {html.escape(r.dataset)} · {r.confidence:.0%} intervals · "
                   f"cost ε={r.cost.epsilon:.3g} (δ={r.cost.epsilon_delta + r.cost.delta:.2g}) · "
                   f"receipt <code>{html.escape(r.receipt[:16])}</code></p>")
        return caption + _table(r.rows, r.group_by, self.statistics)

    def __repr__(self) -> str:
        kind = "MOCK result (nothing spent)" if self.mock else "release"
        return f"<Veil {kind} from {self.release.site}: {self.release.query}>\n{self.df}"


@dataclass
class Combined:
    """A multi-center result: per-site releases and their combination (post-processing only)."""

    results: dict[str, Result]
    rows: list[dict[str, Any]]
    group_by: list[str]
    statistics: list[str]
    confidence: float
    notes: list[str] = field(default_factory=list)
    raw_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def df(self) -> pl.DataFrame:
        return _frame(self.rows).with_columns(pl.lit(self.confidence).alias("level"))

    @property
    def raw(self) -> pl.DataFrame:
        """The sums of the sites' raw noisy values behind `df` (unbiased)."""
        return _frame(self.raw_rows)

    @property
    def cost(self) -> dict[str, dict[str, float]]:
        return {site: r.cost for site, r in self.results.items()}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        data = {"text/html": self._repr_html_(), "text/plain": repr(self)}
        live = [r.provenance for r in self.results.values() if not r.mock]
        return data, ({"veil": {"releases": live}} if live else {})

    @property
    def mock(self) -> bool:
        return all(r.mock for r in self.results.values())

    def _repr_html_(self) -> str:
        costs = ", ".join(f"{html.escape(s)}: ε={c['epsilon']:.3g}" for s, c in self.cost.items())
        notes = "".join(f"<br><i>{html.escape(n)}</i>" for n in self.notes)
        label = f"{MOCK_LABEL} · " if self.mock else ""
        return (f"<p><b>{label}{len(self.results)} sites combined</b> · {self.confidence:.0%} intervals · cost {costs}"
                f"{notes}</p>" + _table(self.rows, self.group_by, self.statistics))

    def __repr__(self) -> str:
        kind = "MOCK multi-center result (nothing spent)" if self.mock else "multi-center result"
        return f"<Veil {kind} over {', '.join(self.results)}>\n{self.df}"
