"""Sites, datasets and queries as a researcher uses them, from the kernel or from plain Python."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from veil.kernel import inflight
from veil.kernel.builder import Agg, Col, Cond, Shape
from veil.kernel.client import SiteClient
from veil.kernel.combine import combine, per_site_accuracy, site_aggregates
from veil.kernel.errors import VeilConfigError, VeilError, VeilUsageError
from veil.kernel.result import Result
from veil.kernel.training import TrainedModel, run_job
from veil.models.spec import ModelSpec, TrainSpec
from veil.query.table import DTYPES
from veil.sql import parse_sql
from veil.wire import (
    EVALUATION_EPSILON,
    ApplicationInfo,
    ApplicationRequest,
    DatasetInfo,
    Federation,
    GrantInfo,
    QueryRequest,
    QuerySpec,
    StandingInfo,
    StandingWindow,
    TrainRequest,
)

if TYPE_CHECKING:
    from veil.kernel.mock import MockSite

RELEASE_LISTENERS: list[Callable[[Site, Result], None]] = []
"""Called after every release a Site makes, live or mock (the kernel records and announces them)."""


def train_request(dataset: str, features: Sequence[str], label: str, epsilon: float, delta: float,
                  model: ModelSpec | None, epochs: int, batch_size: int, learning_rate: float, optimizer: str,
                  max_grad_norm: float, holdout: float, evaluation_epsilon: float,
                  federated: Federation | None = None) -> TrainRequest:
    """A training request from the SDK's keyword arguments (logistic regression unless `model` says)."""
    return TrainRequest(
        dataset=dataset, features=list(features), label=label, model=model or ModelSpec.logistic(),
        train=TrainSpec(epsilon=epsilon, delta=delta, epochs=epochs, batch_size=batch_size,
                        learning_rate=learning_rate, optimizer=optimizer,  # type: ignore[arg-type]
                        max_grad_norm=max_grad_norm),
        holdout=holdout, evaluation_epsilon=evaluation_epsilon, federated=federated)


def live_only(mode: str) -> None:
    """Training happens at the sites on live data; refuse in mock mode rather than spend unasked."""
    if mode != "live":
        raise VeilUsageError("training runs at the sites on live data and spends budget: switch with `%veil mode live` "
                        "(or study.mode = 'live'); mock rows are for trying queries, or a model locally in PyTorch")


class VeilPartialFailure(VeilError):
    """Some sites released and some did not: the releases made (and charged) are kept in `results` (a notebook
    shows them above the error)."""

    def __init__(self, results: dict[str, Result], errors: dict[str, VeilError]) -> None:
        failed = "; ".join(str(e) for e in errors.values())
        super().__init__("partial_failure",
                         f"{len(errors)} of {len(results) + len(errors)} sites failed ({failed}). "
                         f"The releases of {', '.join(results) or 'no site'} were made and are kept in "
                         ".results; retry the failed sites alone.", "retry the failed sites alone")
        self.results, self.errors = results, errors


class VeilInterrupted(VeilPartialFailure):
    """The researcher interrupted a release. What completed (and was charged) is kept in `results`; each
    request still in flight was cancelled, and `errors` says what each of those sites confirmed."""

    def __init__(self, results: dict[str, Result], errors: dict[str, VeilError]) -> None:
        kept = (f"the releases of {', '.join(results)} were made, charged and kept (shown above; .results)"
                if results else "no release was made")
        VeilError.__init__(self, "interrupted", f"interrupted: {kept}. "
                           + "; ".join(e.message for e in errors.values()), "run the cell again to retry")
        self.results, self.errors = results, errors


class Site:
    """One hospital's executor, reached with the researcher's token."""

    def __init__(self, name: str, url: str, token: str, default_epsilon: float = 0.1) -> None:
        self.name, self.url, self.default_epsilon = name, url, default_epsilon
        self.client = SiteClient(name, url, token)
        self.mode = "live"
        self._datasets: dict[str, Dataset] | None = None
        self._mock: MockSite | None = None

    @property
    def mock(self) -> MockSite:
        """This site's mock twin, run locally: its datasets' public metadata over made-up rows, or over the
        DP synthetic rows a steward chose for a dataset (already paid for; free to use)."""
        if self._mock is None:
            from veil.kernel.mock import MockSite, synthetic_rows  # OpenDP loads on first use, not at start

            infos = [d.info for d in self.datasets.values()]
            synthetic = {i.name: rows for i in infos if (rows := synthetic_rows(i, self.client.mock(i.name))) is not None}
            self._mock = MockSite(self.name, infos, synthetic)
        return self._mock

    @property
    def datasets(self) -> dict[str, Dataset]:
        """The datasets this site lets the project use: schema and public metadata, never rows."""
        if self._datasets is None:
            self._check_researcher()
            self._datasets = {d.name: Dataset([self], d) for d in self.client.datasets()}
        return self._datasets

    def _check_researcher(self) -> None:
        """The researcher side holds researcher tokens only: a steward's or admin's is refused here."""
        who = self.client.whoami()
        if who.role != "researcher":
            raise VeilConfigError(f"the token for site '{self.name}' belongs to {who.principal}, a {who.role}; "
                                  "a study config holds researcher tokens only. Ask the site for a researcher "
                                  "token for your project.")

    def budget(self) -> list[GrantInfo]:
        return self.client.grants()

    def train(self, dataset: str, features: Sequence[str], label: str, epsilon: float, delta: float = 1e-5,
              model: ModelSpec | None = None, epochs: int = 20, batch_size: int = 64, learning_rate: float = 1.0,
              optimizer: str = "sgd", max_grad_norm: float = 1.0, holdout: float = 0.2,
              evaluation_epsilon: float = EVALUATION_EPSILON, progress: bool = True) -> TrainedModel:
        """Train a model with DP-SGD where the data lives; Ctrl-C cancels (only spent steps are charged).

        `model` defaults to logistic regression (`ModelSpec.mlp([64, 64])` for an MLP). The result holds the
        weights (`.module()`), the accountant's (epsilon, delta) and a DP evaluation on held-out patients."""
        live_only(self.mode)
        request = train_request(dataset, features, label, epsilon, delta, model, epochs, batch_size, learning_rate,
                                optimizer, max_grad_norm, holdout, evaluation_epsilon)
        return run_job(self.client, request, progress=progress)

    def catalog(self) -> pl.DataFrame:
        """Every dataset the site publishes (name, title, level), including those you must apply for."""
        return pl.DataFrame([e.model_dump() for e in self.client.catalog()])

    def apply(self, purpose: str, datasets: Sequence[str], epsilon: float, duration_days: float = 365,
              uses: Sequence[str] = ("query",), delta: float | None = None, ethics_ref: str | None = None,
              model_source: str | None = None) -> ApplicationInfo:
        """Apply to this site's data stewards for access for your project (budget per dataset, in epsilon).

        L1 datasets are approved at once up to the project's share of the cap (more waits for a steward);
        L2 needs a steward's approval, L3 an ethics reference and two reviewers. The result says what the application still needs; `applications()` shows its progress.
        `model_source` (with 'training' in `uses`) asks to train a custom `nn.Module` (`ModelSpec.custom`)."""
        request = ApplicationRequest(purpose=purpose, datasets=list(datasets), epsilon=epsilon,
                                     duration_days=duration_days, uses=list(uses), delta=delta,  # type: ignore[arg-type]
                                     ethics_ref=ethics_ref, model_source=model_source)
        self._datasets = None  # an approval may open datasets
        return self.client.apply(request)

    def amend(self, application_id: int, **changes: Any) -> ApplicationInfo:
        """Change an application (purpose, datasets, epsilon, ...): it is reviewed again from scratch."""
        current = self.client.application(application_id).request
        self._datasets = None
        return self.client.amend(application_id, ApplicationRequest(**{**current.model_dump(), **changes}))

    def withdraw(self, application_id: int) -> ApplicationInfo:
        """Withdraw a pending application."""
        return self.client.withdraw(application_id)

    def applications(self) -> list[ApplicationInfo]:
        """Your project's applications at this site, newest first, with their status and reviews."""
        self._datasets = None
        return self.client.applications()

    def standing_queries(self) -> list[StandingInfo]:
        """Your project's standing queries at this site, oldest first: spec, status, cost (charged once, at
        approval) and when the next window is released."""
        return self.client.standing_queries()

    def standing_windows(self, standing_id: int, after: int = -1) -> list[StandingWindow]:
        """The windows standing query `standing_id` has released, numbered above `after` (all by default),
        oldest first; reading them costs nothing."""
        return self.client.standing_windows(standing_id, after)

    def __repr__(self) -> str:
        return f"<Veil site {self.name} at {self.url}>"


@dataclass(frozen=True)
class Query:
    """A query bound to a dataset at one or more sites; `.release(...)` runs it."""

    dataset: Dataset
    shape: Shape

    def filter(self, cond: Cond) -> Query:
        return Query(self.dataset, self.shape.filter(cond))

    def group_by(self, *columns: str | Col) -> Query:
        return Query(self.dataset, self.shape.grouped(*columns))

    def agg(self, *aggs: Agg) -> Query:
        return Query(self.dataset, self.shape.with_aggregates(*aggs))

    def spec(self) -> QuerySpec:
        """The executor's JSON query spec for this query."""
        return QuerySpec(dataset=self.dataset.name, where=self.shape.where, group_by=list(self.shape.group_by),
                         aggregates=list(self.shape.aggregates))

    def release(self, epsilon: float | None = None, rho: float | None = None, delta: float | None = None,
                confidence: float = 0.95, accuracy: float | None = None) -> Result:
        """Spend budget for a DP release: one site's Result, or several sites' combined into one. Give the loss
        (epsilon or rho), or the `accuracy` you need: the half-width every count and sum must have at
        `confidence` (combined over the sites for a study), and each site charges the least loss OpenDP
        certifies for it. With none, each release costs the study's `default_epsilon` (0.1 unless configured)."""
        return self.dataset.run(self.spec(), dict(epsilon=epsilon, rho=rho, delta=delta, accuracy=accuracy),
                                confidence)


class Dataset:
    """A dataset by name at one site, or the same-named dataset across the sites of a study."""

    def __init__(self, sites: Sequence[Site], info: DatasetInfo) -> None:
        self.sites, self.info = list(sites), info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def level(self) -> str:
        return self.info.level

    @property
    def schema(self) -> pl.Schema:
        return pl.Schema({c.name: DTYPES[c.dtype] for c in self.info.columns})

    @property
    def metadata(self) -> pl.DataFrame:
        """Public metadata per column: dtype, bounds, categories, nullability."""
        return pl.DataFrame([{"column": c.name, "dtype": c.dtype, "bounds": str(c.bounds or ""),
                              "categories": ", ".join(map(str, c.categories or [])), "nullable": c.nullable}
                             for c in self.info.columns])

    def mock(self, rows: int = 20) -> pl.DataFrame:
        """Mock rows with this dataset's schema: the steward's DP synthetic rows where they chose them (at the
        first site), else rows made from public metadata. Neither holds any patient's record."""
        from veil.kernel.mock import mock_rows, synthetic_rows

        synthetic = synthetic_rows(self.info, self.sites[0].client.mock(self.name))
        return synthetic.head(rows) if synthetic is not None else mock_rows(self.info, rows)

    def sql(self, sql: str) -> Query:
        """A query from SQL text (parsed here to the same spec the executor would build)."""
        spec = parse_sql(sql)
        if spec.dataset != self.name:
            raise VeilUsageError(f"this SQL reads '{spec.dataset}', but it was asked of dataset '{self.name}'")
        return Query(self, Shape(spec.where, tuple(spec.group_by), tuple(spec.aggregates)))

    def filter(self, cond: Cond) -> Query:
        return Query(self, Shape()).filter(cond)

    def group_by(self, *columns: str | Col) -> Query:
        return Query(self, Shape()).group_by(*columns)

    def agg(self, *aggs: Agg) -> Query:
        return Query(self, Shape()).agg(*aggs)

    def run(self, spec: QuerySpec, loss: dict[str, Any], confidence: float) -> Result:
        """Send the spec to every site of this dataset (in parallel) and combine when there are several."""
        loss = {k: v for k, v in loss.items() if v is not None}
        if not {"epsilon", "rho", "accuracy"} & loss.keys():
            loss["epsilon"] = self.sites[0].default_epsilon
        if len(self.sites) == 1:
            return _release(self.sites, spec, confidence, loss)[self.sites[0].name]
        requested = list(spec.aggregates)
        if "accuracy" in loss:
            loss["accuracy"] = per_site_accuracy(loss["accuracy"], requested, len(self.sites))
        per_site = spec.model_copy(update={"aggregates": site_aggregates(requested)})
        results = _release(self.sites, per_site, confidence, loss)
        bounds = {c.name: c.bounds for c in self.info.columns}
        rows, raw, notes = combine({s: r.release for s, r in results.items()}, requested, list(spec.group_by),
                                   bounds, confidence)
        return Result.combined(results, rows, raw, list(spec.group_by), [a.name for a in requested], confidence, notes)

    def __repr__(self) -> str:
        where = ", ".join(s.name for s in self.sites)
        return f"<Veil dataset {self.name} ({self.level}) at {where}>\n{self.metadata}"


def _release(sites: list[Site], spec: QuerySpec, confidence: float, loss: dict[str, Any]) -> dict[str, Result]:
    """Each site's release of `spec`, live or mock as its mode says, all at once; each one made is announced
    (RELEASE_LISTENERS). A refusal or an unreachable site raises, the other sites' releases kept
    (VeilPartialFailure; one site's own error when there is one site), and so does an interrupt
    (VeilInterrupted: see `veil.kernel.inflight`)."""
    results: dict[str, Result] = {}
    errors: dict[str, VeilError] = {}
    mock = [s for s in sites if s.mode != "live"]
    if mock:
        with ThreadPoolExecutor(max_workers=len(mock)) as pool:
            futures = {s.name: pool.submit(s.mock.query, spec, confidence=confidence, **loss) for s in mock}
        results |= {name: Result.of(future.result(), mock=True) for name, future in futures.items()}
    flight = inflight.release({s.name: (s.client, QueryRequest(spec=spec, confidence=confidence,
                                                               request_id=uuid.uuid4().hex, **loss))
                               for s in sites if s.mode == "live"})
    results |= {name: Result.of(release) for name, release in flight.released.items()}
    errors |= flight.errors
    for site in sites:
        for listener in RELEASE_LISTENERS if site.name in results else ():
            listener(site, results[site.name])
    if flight.interrupted:
        raise VeilInterrupted(results, errors)
    if errors:
        raise next(iter(errors.values())) if len(sites) == 1 else VeilPartialFailure(results, errors)
    return {s.name: results[s.name] for s in sites}
