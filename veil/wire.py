"""The wire contract between researcher side (kernel) and data-owner side (executor).

Everything that crosses the trust boundary is one of these pydantic models, sent as plain JSON:
a *request* (a query), a *release* (a DP result with its accuracy and cost) or a *refusal*
(a reason and what to do). Nothing pickled and no serialized Polars plan is ever part of it.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from veil import limits
from veil.models.spec import ModelSpec, TrainSpec
from veil.names import NAME_PATTERN as NAME_PATTERN  # re-exported: both sides import it from the contract
from veil.names import Name


def _printable(text: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("text values may not hold control characters (line breaks, tabs)")
    return text


Scalar = Union[
    bool,
    Annotated[int, Field(ge=limits.INT64[0], le=limits.INT64[1])],
    Annotated[float, Field(allow_inf_nan=False)],
    Annotated[str, Field(max_length=limits.MAX_TEXT_VALUE), AfterValidator(_printable)],
]
Epsilon = Annotated[float, Field(ge=limits.MIN_EPSILON, le=limits.MAX_BUDGET_EPSILON)]
"""A budget in epsilon (grant, cap, application): within the range the ledger's conversions handle."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- query spec


class Comparison(_Strict):
    """`column op value`; `is_null`/`is_not_null` take no value, `in` takes a list."""

    column: Name
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "is_null", "is_not_null"]
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_matches_op(self) -> Comparison:
        if self.op in ("is_null", "is_not_null"):
            if self.value is not None:
                raise ValueError(f"operator {self.op} takes no value")
        elif self.op == "in":
            if not isinstance(self.value, list) or not self.value:
                raise ValueError("operator 'in' needs a non-empty list of values")
            if len(self.value) > limits.MAX_IN_VALUES:
                raise ValueError(f"an 'in' list holds at most {limits.MAX_IN_VALUES} values, "
                                 f"this one {len(self.value)}: split the query, or group by the column")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"operator {self.op} needs a single value")
        return self


class And(_Strict):
    all: list[Condition] = Field(min_length=1, max_length=limits.MAX_CONDITION_NODES)


class Or(_Strict):
    any: list[Condition] = Field(min_length=1, max_length=limits.MAX_CONDITION_NODES)


class Not(_Strict):
    negate: Condition


Condition = Union[Comparison, And, Or, Not]


class Aggregate(_Strict):
    """One DP statistic. `count` without a column counts rows; with one, non-null values."""

    fn: Literal["count", "sum", "mean", "median", "quantile"]
    column: Name | None = None
    q: float | None = Field(default=None, gt=0.0, lt=1.0)
    alias: Name | None = None

    @model_validator(mode="after")
    def _arguments(self) -> Aggregate:
        if self.fn != "count" and self.column is None:
            raise ValueError(f"{self.fn} needs a column")
        if (self.fn == "quantile") != (self.q is not None):
            raise ValueError("q is required for quantile and only for quantile")
        return self

    @property
    def name(self) -> str:
        """The output column name: the alias, or a readable default such as `mean_age`."""
        if self.alias:
            return self.alias
        if self.column is None:
            return "count"
        if self.fn == "quantile":
            return f"q{round(self.q * 100)}_{self.column}"
        return f"{self.fn}_{self.column}"


class QuerySpec(_Strict):
    """A DP aggregate query in JSON: filter, then optionally group, then aggregate."""

    dataset: Name
    where: Condition | None = None
    group_by: list[Name] = Field(default_factory=list, max_length=4)
    aggregates: list[Aggregate] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _filter_size(self) -> QuerySpec:
        if self.where is not None:
            check_condition_size(self.where)
        return self


def check_condition_size(condition: Condition) -> None:
    """ValueError when a filter is deeper, larger or holds more values than the limits allow.
    Iterative, so that no filter can exhaust the stack while it is being measured."""
    nodes = values = 0
    stack: list[tuple[Condition, int]] = [(condition, 1)]
    while stack:
        cond, depth = stack.pop()
        nodes += 1
        if depth > limits.MAX_CONDITION_DEPTH:
            raise ValueError(f"the filter nests AND / OR / NOT deeper than {limits.MAX_CONDITION_DEPTH} levels: "
                             "write it flatter (a IN (...) instead of chained ORs)")
        if isinstance(cond, And):
            stack.extend((c, depth + 1) for c in cond.all)
        elif isinstance(cond, Or):
            stack.extend((c, depth + 1) for c in cond.any)
        elif isinstance(cond, Not):
            stack.append((cond.negate, depth + 1))
        else:
            values += len(cond.value) if isinstance(cond.value, list) else 1
    if nodes > limits.MAX_CONDITION_NODES:
        raise ValueError(f"the filter has {nodes} conditions, more than {limits.MAX_CONDITION_NODES}: "
                         "use IN lists or ranges (BETWEEN) instead of many comparisons")
    if values > limits.MAX_FILTER_VALUES:
        raise ValueError(f"the filter holds {values} values, more than {limits.MAX_FILTER_VALUES}")


REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"


class QueryRequest(_Strict):
    """Run one DP query. Give `sql` or `spec`, and the privacy loss as `epsilon` or `rho`, or the
    `accuracy` the release must reach instead.

    `epsilon` is this release's own epsilon at the site's reporting delta (zCDP underneath);
    `accuracy` is the half-width every count and sum of the query must have at `confidence`: the site
    charges the smallest loss OpenDP certifies for it. `delta` is only needed to release group keys
    that are not public (thresholding).
    """

    sql: str | None = Field(default=None, max_length=limits.MAX_SQL_CHARS)
    spec: QuerySpec | None = None
    epsilon: float | None = Field(default=None, ge=limits.MIN_EPSILON, le=limits.MAX_RELEASE_EPSILON)
    rho: float | None = Field(default=None, ge=limits.MIN_RHO, le=limits.MAX_RHO)
    accuracy: float | None = Field(default=None, gt=0.0, le=limits.MAX_ACCURACY, allow_inf_nan=False)
    delta: float | None = Field(default=None, ge=limits.MIN_DELTA, lt=1e-3)
    confidence: float = Field(default=0.95, ge=limits.MIN_CONFIDENCE, le=limits.MAX_CONFIDENCE)
    project: Name | None = None
    request_id: str | None = Field(
        default=None, pattern=REQUEST_ID_PATTERN,
        description="made up by the client, new for each request: it can then cancel the request "
        "(POST /query/{request_id}/cancel) and learn whether it was charged")

    @model_validator(mode="after")
    def _one_of_each(self) -> QueryRequest:
        if (self.sql is None) == (self.spec is None):
            raise ValueError("give exactly one of 'sql' or 'spec'")
        if sum(v is not None for v in (self.epsilon, self.rho, self.accuracy)) != 1:
            raise ValueError("give exactly one of 'epsilon' or 'rho' (the privacy loss of this release) or "
                             "'accuracy' (the half-width its counts and sums must reach)")
        return self


# ---------------------------------------------------------------- releases


class Cost(_Strict):
    """The privacy cost of one release, as charged. rho is what the ledger adds up (zCDP)."""

    rho: float
    delta: float = 0.0
    epsilon: float
    epsilon_delta: float = Field(description="the delta at which `epsilon` is stated")


class Statistic(_Strict):
    """How one released column was made and how accurate it is."""

    name: str
    fn: str
    column: str | None
    distribution: str | None
    scale: float | None
    accuracy: float | None = Field(description="half-width of the interval at `confidence`; None if unknown")
    note: str | None = None


class Checkpoint(_Strict):
    """The site's Ed25519 signature over its audit log's head: entry `seq` has hash `hash`.

    The signed bytes are `veil-audit-checkpoint:v1:{site}:{seq}:{hash}:{ts}` (UTF-8); a checkpoint
    published outside the site later proves that the log up to `seq` was not rewritten."""

    site: str
    seq: int
    hash: str
    ts: str
    key_id: str = Field(description="the first 16 hex digits of SHA-256 over the raw public key")
    public_key: str = Field(description="the raw 32-byte Ed25519 public key, hex")
    signature: str = Field(description="Ed25519 signature, hex")


class Witnessed(_Strict):
    """A peer's answer to a pushed checkpoint (`POST /witness`): it now holds that signed head."""

    witness: str = Field(description="the site that witnessed the head")
    site: str
    seq: int
    new: bool = Field(description="false when the witness already held this very head")


class Release(_Strict):
    """A DP release: rows with estimate, lower and upper per statistic, its cost and receipt."""

    kind: Literal["release"] = "release"
    site: str
    dataset: str
    project: str
    query: str = Field(description="the canonical query text, as audited")
    confidence: float
    group_by: list[str]
    statistics: list[Statistic]
    rows: list[dict[str, Any]]
    raw: list[dict[str, Any]] = Field(
        default_factory=list, description="per row, the group keys and each statistic's raw noisy value (a mean's: "
        "DP sum / DP count): unbiased, for adding up; `rows` shows them moved into their intervals")
    threshold: int | None = Field(default=None, description="groups with a noisy count below this were dropped")
    notes: list[str] = Field(default_factory=list, description="what a reader must know about this release as a "
                             "whole (e.g. rows truncated per patient), one sentence each")
    cost: Cost
    receipt: str
    released_at: str
    checkpoint: Checkpoint | None = Field(default=None, description="the signed head that covers this receipt")
    grant: dict[str, float] | None = Field(
        default=None, description="the project's grant on this dataset just after this release, in the same "
        "figures as a refusal's `remaining`")


class Cancellation(_Strict):
    """What became of a cancelled query: nothing charged, or the release it had already made (and charged)."""

    request_id: str
    outcome: Literal["cancelled", "released"]
    release: Release | None = None
    message: str


LARGEST_NEXT = ("the largest epsilon one more release could have (epsilon of the remaining rho at the reporting "
                "delta); epsilons of several releases do not add up: rho does, so granted minus spent is not this")


class Refusal(_Strict):
    """Why a request was refused and what to do next. Nothing was charged."""

    kind: Literal["refusal"] = "refusal"
    code: str
    message: str
    hint: str | None = None
    receipt: str | None = None
    remaining: dict[str, float] | None = Field(
        default=None, description="the caller's own grant: `rho` and `delta` left, `rho_granted`, `epsilon_granted`, "
        "`epsilon_spent` and `largest_next_epsilon` (" + LARGEST_NEXT + ")")


# ---------------------------------------------------------------- catalog and budget views


class ColumnInfo(_Strict):
    name: str
    dtype: str
    description: str | None = None
    bounds: tuple[float, float] | None = None
    categories: list[Scalar] | None = None
    nullable: bool = False


class Pricing(_Strict):
    """How this site prices and bounds a release on a dataset (public): mock mode uses it to charge,
    to the last digit, what a live release will."""

    reporting_delta: float = Field(gt=0, lt=1, description="the delta at which epsilons are stated")
    max_epsilon_per_release: float = Field(gt=0, description="the level's ceiling on one release")
    min_group_threshold: int = Field(ge=0, description="least count a thresholded group may be released at")


Sharing = Literal["open", "controlled", "enclave"]
"""A dataset's sharing model (veil/query/sharing.py): open DP statistics (L1), controlled releases under its level's
rules, or an enclave that releases no query results, only approved training jobs and their DP evaluations."""
DEFAULT_SHARING: Sharing = "controlled"
"""A dataset whose catalog entry names no sharing model (and what an older site's datasets are): as before."""


DatasetStateName = Literal["draft", "active", "suspended", "retired", "destroyed"]
"""Where a dataset is in its lifecycle (executor/lifecycle.py): only an active one serves anything."""


class DatasetInfo(_Strict):
    """What a caller may see of a dataset: schema and public metadata, never rows."""

    name: str
    title: str
    description: str
    level: Literal["L1", "L2", "L3"]
    privacy_unit: str
    max_rows_per_unit: int
    max_rows: int = Field(description="public upper bound on the number of rows")
    columns: list[ColumnInfo]
    pricing: Pricing | None = Field(default=None, description="set where the caller may query the dataset")
    sharing: Sharing = Field(default=DEFAULT_SHARING, description="open, controlled or enclave (no query releases)")
    state: DatasetStateName = Field(default="active", description="its lifecycle: only an active dataset serves; a "
                                    "suspended or retired one is listed so that its refusal can say why")


Use = Literal["query", "training", "surveillance"]
Office = Literal["data_center", "data_committee"]


class GrantInfo(_Strict):
    """A project's budget on a dataset: granted, spent and the largest next release, and whether it may still be
    used. Budgets compose in zCDP (rho adds up exactly); epsilons are stated at the site's reporting delta."""

    id: int
    project: str
    dataset: str
    status: Literal["active", "revoked", "expired"]
    expires_at: str | None
    application_id: int | None
    uses: list[Use]
    epsilon: float = Field(description="granted: the grant's whole budget, in epsilon at the reporting delta")
    delta: float
    rho_total: float = Field(description="granted, in rho")
    rho_spent: float
    rho_remaining: float = Field(description="what one more zCDP release may still cost, in rho")
    epsilon_spent: float = Field(description="spent: the epsilon of the rho spent so far (plus any (epsilon, delta) "
                                 "training), at the reporting delta")
    largest_next_epsilon: float = Field(description=LARGEST_NEXT)
    delta_spent: float


# ---------------------------------------------------------------- governance


class LevelRule(_Strict):
    """What a privacy level demands of an application and bounds in a release (public, per site)."""

    level: str
    reviewers: int = Field(ge=0, le=10, description="distinct approving reviewers needed")
    offices: list[Office] = Field(default_factory=list,
                                  description="offices that must each be among the approving reviewers")
    ethics_required: bool = False
    max_epsilon_per_release: float = Field(ge=limits.MIN_EPSILON, le=limits.MAX_RELEASE_EPSILON)
    min_group_threshold: int = Field(ge=0, description="least count a thresholded group may be released at")
    training: bool = True
    max_epsilon_per_model: float = Field(default=8.0, ge=limits.MIN_EPSILON, le=50.0,
                                         description="most a training job may spend")
    default_grant_epsilon: Epsilon | None = Field(
        default=None, description="a budget every project gets without applying (L1); None: apply first")
    max_project_share: float = Field(
        default=0.25, gt=0, le=1,
        description="most of a dataset's lifetime cap (as a fraction of its epsilon) one project may hold by "
                    "the rule alone, without a reviewer (approvals of a level with 0 reviewers, default "
                    "grants); above it an application waits for a steward's review")


class CatalogEntry(_Strict):
    """A dataset as the site's published catalog names it: what one may apply for (no schema, no rows)."""

    name: str
    title: str
    description: str
    level: str


def _each_once(datasets: list[str], uses: list[str]) -> None:
    if len(set(datasets)) != len(datasets) or len(set(uses)) != len(uses):
        raise ValueError("list each dataset and each use once")


class StandingQuery(_Strict):
    """A standing count: `sql` (`SELECT [keys,] COUNT(*) FROM dataset [WHERE ...] [GROUP BY keys]`, keys being
    columns with public values) counted in windows of `window_days` over `time_column`, from `start` (a date,
    UTC) for `horizon` windows. It counts patients (privacy units): each at most once per window and group,
    and in at most `max_windows` (window, group) cells over the whole horizon (later ones are not counted).
    The site releases each window once, `lag_days` after it ends, with its running total."""

    name: Name = Field(description="the study-wide name; the same at every site, so a study can gather it")
    sql: str = Field(min_length=1, max_length=limits.MAX_SQL_CHARS)
    time_column: Name = Field(description="the Date or Datetime column that places a row in a window")
    start: date = Field(description="the first day of the first window")
    window_days: int = Field(default=7, ge=1, le=366)
    horizon: int = Field(default=52, ge=1, le=10_000, description="how many windows the standing count has")
    max_windows: int = Field(ge=1, description="the most (window, group) cells one patient is counted in "
                             "over the horizon (public; a patient's later cells are not counted)")
    lag_days: int = Field(default=0, ge=0, le=365, description="days after a window ends before it is released "
                          "(for records that arrive late)")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="the stated intervals' confidence")
    levels: int | None = Field(default=None, ge=1, le=15, description="the binary tree's levels: unset for the "
                               "full tree (running totals err least), 1 for each window released alone (each "
                               "window's count errs least); the stated errors of each choice: veil.query.continual")


class StandingCell(_Strict):
    """One group's figures in a released window: the DP count of the window and the DP running total up to
    it, each with its interval's half-width at the standing query's confidence."""

    key: dict[str, Scalar | None] = Field(description="the group's public key values ({} without GROUP BY)")
    count: int
    count_accuracy: float
    total: int
    total_accuracy: float


class StandingWindow(_Strict):
    """A released window of a standing query: its dates, its cells, and the audit entry that recorded it."""

    standing_id: int
    window: int
    start: date
    end: date = Field(description="the day after the window's last day")
    released_at: str
    receipt: str = Field(description="the audit entry's hash (GET /receipts/{receipt})")
    noise_scale: float = Field(description="the discrete Gaussian scale of each released node")
    total_nodes: int = Field(description="how many released nodes the running total sums")
    cells: list[StandingCell]


class StandingInfo(_Strict):
    """A standing query at a site: its spec, its status, what it cost (charged once, up front) and when its
    next window is released."""

    id: int
    project: str
    dataset: str
    application_id: int
    spec: StandingQuery
    status: Literal["active", "finished", "stopped"]
    status_reason: str | None = None
    epsilon: float = Field(description="the whole horizon's loss, in epsilon at `delta`")
    delta: float = Field(description="the site's reporting delta, at which `epsilon` is stated")
    rho: float = Field(description="the whole horizon's loss in zCDP, charged to the dataset's cap at approval")
    levels: int
    noise_scale: float
    windows_released: int
    next_window: int | None = Field(description="the next window to release, None once finished")
    next_release_at: str | None = Field(description="when the next window is released (ISO, UTC)")
    created_at: str
    receipt: str = Field(description="the audit entry of the up-front charge")


class ApplicationRequest(_Strict):
    """A project's request for access: what for, which datasets, how much budget (per dataset), how long."""

    purpose: str = Field(min_length=10, max_length=4000)
    datasets: list[Name] = Field(min_length=1, max_length=20)
    epsilon: float = Field(ge=limits.MIN_EPSILON, le=100, description="budget per dataset, at the site's reporting delta")
    delta: float | None = Field(default=None, ge=0, lt=1e-3,
                                description="budget for thresholded GROUP BY (default: the site's reporting delta)")
    duration_days: float = Field(gt=0, le=3650)
    uses: list[Use] = Field(default_factory=lambda: ["query"], min_length=1)
    ethics_ref: str | None = Field(default=None, max_length=200,
                                   description="the ethics board's approval reference (required for L3)")
    model_source: str | None = Field(default=None, max_length=100_000,
                                     description="a custom model's source, for the reviewers to read; approval "
                                                 "lets training jobs use exactly this source (needs 'training')")

    standing: StandingQuery | None = Field(
        default=None, description="a standing count the site releases window by window (needs uses "
        "['surveillance'] and the one dataset its SQL reads); approval charges its whole horizon to the "
        "dataset's lifetime cap at once and gives no grant")

    @model_validator(mode="after")
    def _distinct(self) -> ApplicationRequest:
        _each_once(self.datasets, self.uses)
        if self.model_source is not None and "training" not in self.uses:
            raise ValueError("a model source is for training: add 'training' to uses")
        if ("surveillance" in self.uses) != (self.standing is not None):
            raise ValueError("a standing query needs uses ['surveillance'], and 'surveillance' needs a standing query")
        if self.standing is not None and (self.uses != ["surveillance"] or len(self.datasets) != 1):
            raise ValueError("an application for a standing query has uses ['surveillance'] and names the one "
                             "dataset its SQL reads; apply for other uses separately")
        return self


class Review(_Strict):
    """One reviewer's decision on one version of an application."""

    reviewer: str
    office: str | None
    decision: Literal["approve", "reject"]
    comment: str
    version: int
    ts: str


class ApplicationInfo(_Strict):
    """An application, the rule it is reviewed under, the reviews of its current version, what is missing."""

    id: int
    project: str
    applicant: str
    status: Literal["pending", "approved", "rejected", "withdrawn"]
    version: int
    request: ApplicationRequest
    rule: LevelRule
    reviews: list[Review]
    needs: str | None = Field(description="what the application still needs before it is approved")
    created_at: str
    updated_at: str
    decided_at: str | None
    existing_grants: list[GrantInfo] = Field(
        default_factory=list, description="stewards' view of a pending application: the project's active grants on "
        "the requested datasets, so a reviewer sees both; approving over one given by another application needs "
        "`on_existing_grant` in the review")


ExistingGrantChoice = Literal["add", "replace", "keep"]


class ReviewRequest(_Strict):
    """A reviewer's decision on the version of the application they read."""

    decision: Literal["approve", "reject"]
    comment: str = Field(min_length=1, max_length=4000)
    version: int = Field(ge=1, description="the version you reviewed; a changed application needs a new review")
    on_existing_grant: ExistingGrantChoice | None = Field(
        default=None, description="what an approval does to a grant the project already holds on a requested "
        "dataset (from another application or the site's default): `add` (the new budget composes with it: its "
        "rho is added to the grant's, its delta to the grant's delta, the later expiry and both uses stand), "
        "`replace` (the grant becomes what this application asks; what it spent stays spent), `keep` (the grant "
        "stays as it is; the application is approved without changing it). Required when there is one")


class DirectGrantRequest(_Strict):
    """A grant a steward gives without an application in Veil, for a site that reviews on paper: Veil records
    it as an application filed and approved by the steward at once, citing `reference`, audited as any approval."""

    project: Name
    datasets: list[Name] = Field(min_length=1, max_length=20)
    epsilon: float = Field(ge=limits.MIN_EPSILON, le=100, description="budget per dataset, at the site's reporting delta")
    delta: float | None = Field(default=None, ge=0, lt=1e-3)
    duration_days: float = Field(gt=0, le=3650)
    uses: list[Use] = Field(default_factory=lambda: ["query"], min_length=1)
    ethics_ref: str | None = Field(default=None, max_length=200, description="required for L3, as for an application")
    reference: str = Field(min_length=3, max_length=1000, description="the paper review it rests on (a file number, "
                           "a committee's minutes), recorded with the grant and in the audit log")
    on_existing_grant: ExistingGrantChoice | None = Field(
        default=None, description="as in a review: add, replace or keep a grant the project already holds")

    @model_validator(mode="after")
    def _distinct(self) -> DirectGrantRequest:
        _each_once(self.datasets, self.uses)
        return self


class RevokeRequest(_Strict):
    reason: str = Field(min_length=1, max_length=1000)


class CapRequest(_Strict):
    """A new lifetime cap for a dataset, in epsilon at the site's reporting delta."""

    epsilon: Epsilon
    reason: str = Field(default="", max_length=1000)


class DatasetBudget(_Strict):
    """A dataset's lifetime cap, every project's grant on it, and how its file keeps the catalog's
    rows-per-patient bound (stewards' view only: never in a researcher's response)."""

    dataset: str
    level: str
    cap_epsilon: float = Field(description="the lifetime cap, in epsilon at the reporting delta")
    cap_rho: float
    spent_rho: float
    spent_epsilon: float
    remaining_rho: float = Field(description="what one more zCDP release may still cost the cap, in rho")
    largest_next_epsilon: float = Field(description=LARGEST_NEXT + " (of the cap, all projects together)")
    granted_rho: float = Field(description="what the active grants could still spend, together")
    grants: list[GrantInfo]
    max_rows_per_unit: int | None = Field(default=None, description="the catalog's bound on rows per patient")
    most_rows_per_patient: int | None = Field(default=None, description="the most rows one patient has in the "
                                              "site's file, as last checked")
    patients_over_bound: int = Field(default=0, description="patients with more rows in the file than the bound "
                                     "(truncated, or requests refused: `on_excess_rows`)")
    on_excess_rows: Literal["truncate", "refuse"] = Field(default="truncate", description="what the site does "
                                                          "when its file breaks the bound")


class MockRequest(_Strict):
    """The steward's choice of mock: schema-only rows (free) or DP synthetic rows (charged to the cap)."""

    kind: Literal["schema", "synthetic"]
    epsilon: float | None = Field(default=None, ge=limits.MIN_EPSILON, le=10)
    rows: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _epsilon_for_synthetic(self) -> MockRequest:
        if self.kind == "synthetic" and self.epsilon is None:
            raise ValueError("synthetic mock data needs an epsilon: fitting it to the real data spends budget")
        if self.kind == "schema" and self.epsilon is not None:
            raise ValueError("schema-only mock rows spend nothing; leave epsilon out")
        return self


class MockInfo(_Strict):
    """A dataset's mock as researchers get it: made from public metadata, or DP synthetic rows."""

    dataset: str
    kind: Literal["schema", "synthetic"]
    epsilon: float
    rows: int
    created_by: str
    created_at: str
    receipt: str | None
    data: dict[str, list[Any]] | None = Field(default=None, description="synthetic columns; dates as ISO text")


class PublishRequest(_Strict):
    """A steward's publication of an open dataset's DP statistics sheet, charged to its lifetime cap."""

    epsilon: float = Field(ge=limits.MIN_EPSILON, le=10, description="the whole sheet's epsilon")


class SheetPart(_Strict):
    """One query of a statistics sheet: the whole dataset's row count, or one column's statistics."""

    column: str | None = Field(description="None: the dataset's rows")
    statistics: list[str] = Field(description="what each row holds: count, count_COLUMN or mean_COLUMN")
    rows: list[dict[str, Any]] = Field(description="per category when grouped: each statistic with its interval "
                                                   "(NAME, NAME_lower, NAME_upper)")


class StatisticsSheet(_Strict):
    """An open dataset's DP statistics sheet: released once, charged to the dataset's lifetime cap, public."""

    site: str
    dataset: str
    title: str
    epsilon: float
    confidence: float
    parts: list[SheetPart]
    published_by: str
    published_at: str
    receipt: str = Field(description="the audit entry that charged and recorded it")


# ---------------------------------------------------------------- training


class Federation(_Strict):
    """A site's part in a federated study: `rounds` rounds of `train.epochs` epochs each, all under the
    site's one (epsilon, delta) target; the study's coordinator sends the rounds (Flower messages)."""

    study: Name
    rounds: int = Field(ge=1, le=1000)


class Layout(_Strict):
    """How a job's features are encoded (public metadata only); a coordinator builds the model from it."""

    numeric: list[str]
    categorical: list[tuple[str, int]]
    outputs: int


class TrainingCheck(_Strict):
    """A training request a site would accept now (policy, public metadata, budget), checked without reserving
    or reading anything: its features' encoding and what joining would reserve."""

    dataset: str
    layout: Layout
    epsilon: float
    delta: float
    rho: float = Field(description="the rho of the job's two DP releases (its count of rows, its evaluation)")


EVALUATION_EPSILON = 0.5
"""The one default for a trained model's held-out evaluation (the job's DP count of the dataset's rows
costs the same). The evaluation is one DP sum of scores over a public held-out size
(`veil.query.evaluation`): at 0.5 a held-out set of 300 patients gives an accuracy interval 0.12 wide at
95%, 114 patients 0.32; under 73 held-out patients (41 at epsilon 1) the interval would cover half of
[0, 1] or more, and the release says plainly that the held-out set is too small to evaluate privately,
with no number (bench/evaluation_width.py)."""
MAX_EVALUATION_EPSILON = 1.0
"""The largest evaluation epsilon a training request may ask for."""


class TrainRequest(_Strict):
    """A DP-SGD job: which columns (scaled by their public bounds or categories), which model, which target.

    The label needs public categories (classification) or public bounds (regression). A share of the
    rows is held out; accuracy on it comes back as a DP release costing `evaluation_epsilon`, and a DP
    count of the dataset's rows (same cost) sets the sampling rate and the held-out size, so that
    neither reveals anything more."""

    dataset: Name
    features: list[Name] = Field(min_length=1, max_length=200)
    label: Name
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec
    holdout: float = Field(default=0.2, ge=0.05, le=0.5)
    evaluation_epsilon: float = Field(default=EVALUATION_EPSILON, ge=limits.MIN_EPSILON,
                                      le=MAX_EVALUATION_EPSILON)
    federated: Federation | None = Field(
        default=None, description="set: this site's part in a federated study, trained round by round")


class JobInfo(_Strict):
    """A training job as its researcher sees it; only DP quantities and the public plan appear in it."""

    id: int
    project: str
    dataset: str
    state: Literal["running", "done", "cancelled", "failed"]
    progress: float = Field(description="share of the planned steps taken")
    epoch: int
    epochs: int
    epsilon: float = Field(description="what the accountant says the steps taken so far spent")
    target_epsilon: float
    delta: float
    rows: int | None = Field(default=None, description="training rows, from a DP count of the dataset's rows")
    evaluation: Release | None = None
    error: str | None = None
    receipt: str | None = None
    created_at: str
    updated_at: str
    study: str | None = Field(default=None, description="the federated study this job is a site's part of")
    round: int = Field(default=0, description="federated: the last round this site trained")
    rounds: int = Field(default=1, description="federated: the rounds planned")
    layout: Layout | None = None


class AuditVerification(_Strict):
    ok: bool
    entries: int
    problems: list[str]


class AuditEntry(_Strict):
    """One entry of a site's hash-chained audit log; its `hash` is the receipt."""

    seq: int
    ts: str
    principal: str
    role: str
    project: str | None
    action: str
    dataset: str | None
    query: str | None
    rho: float
    epsilon: float = Field(default=0.0, description="a release accounted in (epsilon, delta), e.g. DP-SGD")
    delta: float
    result_digest: str | None
    decision: str
    reason: str | None
    prev_hash: str
    hash: str
    checkpoint: Checkpoint | None = Field(default=None, description="the first signed head at or after this entry")
    epsilon_at_reporting_delta: float | None = Field(
        default=None, description="the entry's cost as epsilon at the site's reporting delta: epsilon_of(rho) plus "
        "`epsilon`, computed by the site (OpenDP's conversion); None where the site did not compute it")


class WhoAmI(_Strict):
    """The caller as the site knows it (from its token)."""

    principal: str
    role: str
    project: str | None
    office: str | None = None


class Health(_Strict):
    status: Literal["ok"]
    site: str
    version: str
    datasets: int
    database: Literal["ok"] = Field(default="ok", description="the state database answered; when it does not, "
                                    "/health is refused with 503 database_unreachable")


Comparison.model_rebuild()
And.model_rebuild()
Or.model_rebuild()
Not.model_rebuild()
QuerySpec.model_rebuild()



class TransitionRequest(_Strict):
    """A steward asks to move a dataset to another state of its lifecycle."""

    to: Literal["active", "suspended", "retired", "destroyed"]
    reason: str = Field(min_length=1, max_length=2000)


class TransitionReview(_Strict):
    """Another steward's decision on a pending transition (the dataset's level may need a second office)."""

    decision: Literal["approve", "reject"]
    comment: str = Field(min_length=1, max_length=2000)


class DeletedCopy(_Strict):
    """A copy of a dataset the site deleted when destroying it, with its digest before deletion."""

    what: str = Field(description="a file's path, or a stored blob such as 'mock' or 'job 12 weights'")
    sha256: str
    bytes: int


class TransitionInfo(_Strict):
    id: int
    dataset: str
    to: str
    reason: str
    requested_by: str
    requested_office: str | None = None
    requested_at: str
    status: Literal["pending", "done", "rejected"]
    reviewed_by: str | None = None
    reviewed_office: str | None = None
    reviewed_at: str | None = None
    needs: str | None = Field(default=None, description="what approval it still lacks, while pending")
    deleted: list[DeletedCopy] = Field(default_factory=list, description="destruction: the copies deleted")


class DatasetState(_Strict):
    """Where a dataset is in its lifecycle, since when, why, and the changes awaiting review."""

    dataset: str
    state: DatasetStateName
    reason: str
    changed_by: str
    changed_at: str | None = None
    receipt: str | None = None
    pending: list[TransitionInfo] = Field(default_factory=list)


class BridgeRefusal(_Strict):
    """A job that a bridge beside the site (the PySyft bridge, `veil syft serve`) refused without sending it
    here: recorded in the audit log under the caller's own token. It charges nothing and releases nothing."""

    source: Literal["pysyft"] = "pysyft"
    job: str = Field(pattern=r"^[A-Za-z0-9_.@+-]{1,200}$", description="the job's id at the bridge")
    submitter: Annotated[str, Field(min_length=1, max_length=254, description="who submitted the job there (an "
                                    "email)"), AfterValidator(_printable)]
    code: str = Field(pattern=r"^[a-z_]{1,40}$", description="why, as a refusal code")
    message: Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_printable)]
    dataset: Name | None = None
