"""Usage and value reports: what a site's data gave which project over a period, and what it cost.

A site builds its report (`veil.executor.report`) from what it already records: the audit log, the ledger,
applications and their reviews, training jobs; never from data rows. These models carry it over the wire
(JSON is the model's JSON); the renderers here turn it into Markdown, HTML (Jupyter) and CSV, for the
steward's `veil steward report` and the researcher's `study.report()` alike. Epsilons are stated at the
site's reporting delta: a period's zCDP releases compose by adding rho, then convert once.
"""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from pydantic import BaseModel, ConfigDict, Field

from veil import spreadsheet
from veil.errors import VeilError
from veil.wire import DatasetBudget, GrantInfo


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- the period


def _instant(value: str, name: str) -> datetime:
    """A date (YYYY-MM-DD, midnight UTC) or an ISO date-time (UTC when it names no zone), in UTC."""
    try:
        parsed = datetime.combine(date.fromisoformat(value), time()) if len(value) == 10 else \
            datetime.fromisoformat(value)
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # not a date, or one whose zone takes it out of the calendar
        raise VeilError("bad_date", f"{name} '{value[:40]}' is not a date",
                        hint="give dates as YYYY-MM-DD (since inclusive, until exclusive), for example "
                             "since=2026-01-01 until=2026-02-01", status=422) from None


def period(since: str | None, until: str | None, now: datetime) -> tuple[str | None, str]:
    """[since, until) as the audit log writes times (ISO, UTC, microseconds); until defaults to `now`.
    VeilError (422) for a value that is not a date or an empty period."""
    start = _instant(since, "since") if since else None
    end = _instant(until, "until") if until else now
    if start is not None and start >= end:
        raise VeilError("empty_period", f"the period from {since} until {until or 'now'} is empty",
                        hint="since must come before until (until is exclusive: --until 2026-02-01 ends with "
                             "January 31)", status=422)
    return (start.isoformat(timespec="microseconds") if start else None, end.isoformat(timespec="microseconds"))


# ---------------------------------------------------------------- the report


class ReviewNote(_Frozen):
    """One reviewer's decision on the version of an application that was decided."""

    reviewer: str
    office: str | None
    decision: str
    ts: str


class ApplicationSummary(_Frozen):
    """An application as a report cites it: what it asked for, under which ethics approval, who decided."""

    id: int
    applicant: str
    status: str
    version: int
    purpose: str
    ethics_ref: str | None
    epsilon: float = Field(description="asked per dataset, at the reporting delta")
    uses: list[str]
    created_at: str
    decided_at: str | None
    reviews: list[ReviewNote] = Field(description="empty for one the site's rule approved without review")


class Receipt(_Frozen):
    """An audit entry that moved the ledger: its hash is the receipt to cite."""

    seq: int
    ts: str
    action: str
    decision: str
    query: str | None
    epsilon: float = Field(description="this entry's cost, in epsilon at the reporting delta")
    receipt: str


class Spent(_Frozen):
    """Charges added up: rho (zCDP, composes by adding), the (epsilon, delta) of DP-SGD, delta; and their
    epsilon at the reporting delta (the epsilon of the rho, plus the DP-SGD epsilon), as the ledger counts."""

    rho: float = 0.0
    approx_epsilon: float = 0.0
    delta: float = 0.0
    epsilon: float = 0.0


class TrainedModel(_Frozen):
    """A DP-SGD job at the site that ended done."""

    job: int
    epsilon: float = Field(description="what the accountant spent")
    rows: int | None = Field(description="training rows, from a DP count")
    receipt: str | None
    updated_at: str


class FederatedPart(_Frozen):
    """The site's part in a federated study: the rounds it trained, its epsilon, its DP row count."""

    job: int
    study: str
    state: str
    round: int
    rounds: int
    epsilon: float
    rows: int | None
    receipt: str | None


class RefusalCount(_Frozen):
    code: str
    count: int


class UsageLine(_Frozen):
    """One (dataset, project): a dataset of None is the project's refusals outside any dataset; a project of
    None is the site's own releases (stewards' DP mocks and statistics sheets)."""

    dataset: str | None
    project: str | None
    applications: list[ApplicationSummary] = Field(default_factory=list)
    releases: int = Field(default=0, description="DP releases: query results, training rounds' weights, mocks")
    spent: Spent = Field(default_factory=Spent)
    receipts: list[Receipt] = Field(default_factory=list)
    models: list[TrainedModel] = Field(default_factory=list)
    studies: list[FederatedPart] = Field(default_factory=list)
    refusals: list[RefusalCount] = Field(default_factory=list)
    grant: GrantInfo | None = Field(default=None, description="the project's grant now (lifetime figures)")


class TimelinePoint(_Frozen):
    ts: str
    epsilon: float = Field(description="cumulative epsilon spent up to and including this entry")
    seq: int = Field(description="the audit entry (0: before the period)")


class DatasetTimeline(_Frozen):
    """Cumulative epsilon spent on a dataset (by the projects the report covers), one point per charge."""

    dataset: str
    points: list[TimelinePoint]


class UsageReport(_Frozen):
    """A site's usage and value report for [since, until), per dataset and project."""

    site: str
    since: str | None
    until: str
    generated_at: str
    reporting_delta: float
    project: str | None = Field(description="the project the report is restricted to (a researcher's: theirs)")
    dataset: str | None
    audit_seq: int = Field(description="the last audit entry the report read")
    lines: list[UsageLine]
    timelines: list[DatasetTimeline]
    budgets: list[DatasetBudget] = Field(default_factory=list, description="lifetime caps (stewards only)")
    anonymous_refusals: list[RefusalCount] = Field(
        default_factory=list, description="refusals without an accountable token, counted per window (stewards)")

    def _repr_markdown_(self) -> str:
        return to_markdown(self)

    def _repr_html_(self) -> str:
        return to_html(self)


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Para:
    text: str


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


_Block = _Heading | _Para | _Table


def _eps(value: float) -> str:
    return f"{value:.4g}"


def _who(line: UsageLine) -> str:
    project = f"project {line.project}" if line.project else "the site's own releases"
    return f"{project}, dataset {line.dataset}" if line.dataset else f"{project}, outside any dataset"


def _approval(a: ApplicationSummary) -> str:
    """'application 3 v1 approved (ethics ref E-1; carol, data_center): purpose'."""
    deciders = ", ".join(f"{r.reviewer} {r.decision}s as {r.office or 'steward'}" for r in a.reviews) or (
        "the site's rule" if a.status == "approved" else "no review yet")
    ethics = f"ethics approval {a.ethics_ref}; " if a.ethics_ref else ""
    return f"application {a.id} v{a.version} {a.status} ({ethics}{deciders}): {a.purpose}"


def contribution(site: str, line: UsageLine) -> str:
    """One sentence: what the site's dataset gave the project and at what cost."""
    parts = [f"{line.releases} DP release{'s' * (line.releases != 1)}, epsilon {_eps(line.spent.epsilon)} spent in all"]
    if line.models:
        parts.append(f"{len(line.models)} model{'s' * (len(line.models) != 1)} trained with DP-SGD")
    for s in line.studies:
        parts.append(f"{s.round} of {s.rounds} rounds of federated study {s.study} (epsilon {_eps(s.epsilon)}, "
                     f"{s.rows if s.rows is not None else 'no'} DP-counted rows)")
    return f"Site {site} contributed to {_who(line)}: " + "; ".join(parts) + "."


def _line_blocks(site: str, line: UsageLine) -> list[_Block]:
    blocks: list[_Block] = [_Heading(3, _who(line).capitalize()), _Para(contribution(site, line))]
    blocks += [_Para(_approval(a)) for a in line.applications]
    if line.grant is not None:
        g = line.grant
        blocks.append(_Para(f"Grant {g.id} ({g.status}): epsilon granted {_eps(g.epsilon)}, spent in all "
                            f"{_eps(g.epsilon_spent)}, largest next release {_eps(g.largest_next_epsilon)}."))
    if line.refusals:
        blocks.append(_Para("Refusals: " + ", ".join(f"{r.code} x{r.count}" for r in line.refusals) + "."))
    if line.receipts:
        blocks.append(_Table(("seq", "time", "what", "epsilon", "receipt"), [
            (str(r.seq), r.ts[:19], f"{r.action} {r.decision}", _eps(r.epsilon), r.receipt) for r in line.receipts]))
    return blocks


def _blocks(report: UsageReport) -> list[_Block]:
    scope = ", ".join(f"{k} {v}" for k, v in (("project", report.project), ("dataset", report.dataset)) if v)
    blocks: list[_Block] = [
        _Heading(2, f"Usage report: site {report.site}" + (f" ({scope})" if scope else "")),
        _Para(f"From {report.since[:19] if report.since else 'the start'} until {report.until[:19]} (UTC, until "
              f"excluded), read from the audit log up to entry {report.audit_seq}. Epsilons are at the site's "
              f"reporting delta {report.reporting_delta:g}; a period's releases compose in zCDP (rho adds up)."),
    ]
    for line in report.lines:
        blocks += _line_blocks(report.site, line)
    if not report.lines:
        blocks.append(_Para("Nothing was released, applied for or refused in this period."))
    spent = [(t.dataset, t.points[0].epsilon, t.points[-1].epsilon) for t in report.timelines if t.points]
    if spent:
        blocks += [_Heading(3, "Epsilon spent over the period"),
                   _Table(("dataset", "at the start", "at the end"), [(d, _eps(a), _eps(b)) for d, a, b in spent])]
    if report.budgets:
        blocks += [_Heading(3, "Lifetime budgets"), _Table(
            ("dataset", "level", "cap", "spent", "largest next release"),
            [(b.dataset, b.level, _eps(b.cap_epsilon), _eps(b.spent_epsilon), _eps(b.largest_next_epsilon))
             for b in report.budgets])]
    if report.anonymous_refusals:
        blocks.append(_Para("Refusals without an accountable token: "
                            + ", ".join(f"{r.code} x{r.count}" for r in report.anonymous_refusals) + "."))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[_Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, _Para):
            out.append(b.text)
        else:
            rows = [b.header, tuple("---" for _ in b.header), *b.rows]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows))
    return "\n\n".join(out) + "\n"


def _html(blocks: list[_Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, _Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            out.append(f"<p>{html.escape(b.text)}</p>")
        else:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in b.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(out)


def to_markdown(report: UsageReport) -> str:
    """The report as a Markdown document."""
    return _markdown(_blocks(report))


def to_html(report: UsageReport) -> str:
    return _html(_blocks(report))


CSV_COLUMNS = ("site", "since", "until", "dataset", "project", "applications", "approved", "releases", "rho",
               "approx_epsilon", "delta", "epsilon", "models_trained", "federated_rounds", "federated_epsilon",
               "federated_rows", "refusals", "grant_epsilon", "grant_spent", "grant_largest_next", "receipts")
"""One CSV row per (dataset, project); `receipts` is space-separated, `refusals` `code xN` separated by '; '."""


def _csv_row(report: UsageReport, line: UsageLine) -> tuple[object, ...]:
    s, g = line.spent, line.grant
    return (report.site, report.since or "", report.until, line.dataset or "", line.project or "",
            " ".join(str(a.id) for a in line.applications),
            " ".join(str(a.id) for a in line.applications if a.status == "approved"),
            line.releases, s.rho, s.approx_epsilon, s.delta, s.epsilon, len(line.models),
            sum(p.round for p in line.studies), sum(p.epsilon for p in line.studies),
            sum(p.rows or 0 for p in line.studies), "; ".join(f"{r.code} x{r.count}" for r in line.refusals),
            g.epsilon if g else "", g.epsilon_spent if g else "", g.largest_next_epsilon if g else "",
            " ".join(r.receipt for r in line.receipts))


def to_csv(*reports: UsageReport) -> str:
    """One row per (site, dataset, project), a header first (`CSV_COLUMNS`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(tuple(spreadsheet.cell(v) for v in _csv_row(r, line)) for r in reports for line in r.lines)
    return out.getvalue()


FORMATS = ("md", "csv", "json")


def render(report: UsageReport, fmt: str) -> str:
    """The report as Markdown (`md`), CSV (`csv`) or JSON (`json`, the model's own)."""
    if fmt == "md":
        return to_markdown(report)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return report.model_dump_json(indent=2) + "\n"
    raise ValueError(f"unknown report format {fmt!r}: {', '.join(FORMATS)}")


_WINDOW_CODES = re.compile(r"([a-z0-9_]+) x([0-9]+)")


def window_codes(reason: str) -> list[tuple[str, int]]:
    """The codes counted in a refusal window's audit entry ('N refusals ... (code xN, code xN) from ...')."""
    counted = reason[reason.find("(") + 1:reason.find(")")] if "(" in reason else ""
    return [(code, int(n)) for code, n in _WINDOW_CODES.findall(counted)]


class StudyUsage(_Frozen):
    """A project's report across a study's sites; in Jupyter it shows as Markdown or HTML."""

    study: str
    project: str
    reports: dict[str, UsageReport]

    def _blocks(self) -> list[_Block]:
        statements = [contribution(site, line) for site, r in self.reports.items() for line in r.lines
                      if line.dataset is not None]
        blocks: list[_Block] = [_Heading(1, f"Study {self.study} (project {self.project}): contributions"),
                                *(_Para(s) for s in statements or ["No site has released anything to this project "
                                                                   "in this period."])]
        for report in self.reports.values():
            blocks += _blocks(report)
        return blocks

    def markdown(self) -> str:
        return _markdown(self._blocks())

    def csv(self) -> str:
        return to_csv(*self.reports.values())

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def _repr_html_(self) -> str:
        return _html(self._blocks())
