"""Inside a query worker: plan, certify and describe a query (kept per query and loss), then run it.

Runs in the worker processes of `query_pool`; the catalog is read from the site's file, and prepared
queries are kept per (dataset, canonical query, privacy-unit mode, loss, confidence, threshold floor).
"""

from __future__ import annotations

import dataclasses

import opendp.prelude as dp
import polars as pl
from opendp.mod import OpenDPException

from veil.errors import QueryError
from veil.executor.catalog import Dataset, load_catalog
from veil.executor.query_pool import Certificate, QueryTask
from veil.query.calibrate import Certified, fits
from veil.query.plan import Plan
from veil.query.prepared import Prepared, PreparedQueries, prepare
from veil.query.release import Output, run
from veil.wire import Aggregate, QuerySpec

# The executor is the trusted party OpenDP's "honest-but-curious" flag speaks of: it collects each lazy
# result exactly once, on the streaming engine (see `release.run`). Only query workers enable it.
dp.enable_features("honest-but-curious")


def can_stream(dataset: Dataset, plan: Plan, certified: Certified) -> bool:
    """Whether OpenDP can hand this measurement's plan back as a LazyFrame (quantiles cannot).

    Tried on an empty frame of the plan's columns: no data is involved."""
    try:
        certified.measurement(pl.LazyFrame(schema=plan.input_schema(dataset))).lazy()
    except OpenDPException:
        return False
    return True


def _certificate(certified: Certified) -> Certificate:
    return Certificate(certified.rho, certified.delta, certified.threshold)


class QueryRunner:
    """A worker's view of the site: its catalog and its prepared queries."""

    def __init__(self, catalog_path: str) -> None:
        self.catalog = load_catalog(catalog_path)
        self.prepared = PreparedQueries()

    def _prepared(self, task: QueryTask) -> Prepared:
        dataset = self.catalog.dataset(task.dataset)
        spec = QuerySpec.model_validate_json(task.spec_json)

        def prepared_here() -> Prepared:
            made = prepare(dataset, spec, verified_bound=task.verified_bound, rho=task.rho, delta=task.delta,
                           confidence=task.confidence, min_threshold=task.min_threshold, accuracy=task.accuracy)
            return dataclasses.replace(made, streaming=can_stream(dataset, made.plan, made.certified))

        prepared = self.prepared.get_or_prepare(task.key, prepared_here)
        rho = task.rho if task.rho is not None else prepared.certified.rho  # an accuracy's loss is the certified one
        if not fits(prepared.certified, prepared.plan, rho, task.delta):
            raise QueryError("calibration_failed", "the prepared measurement no longer fits its loss",
                             hint="retry; if it persists, tell the site's administrators")
        return prepared

    def warm(self) -> None:
        """Plan, certify and describe one count without data, so that a worker's first real query does not
        pay for OpenDP's first-use costs (about a second) inside its time limit."""
        for dataset in list(self.catalog.datasets.values())[:1]:
            spec = QuerySpec(dataset=dataset.name, aggregates=[Aggregate(fn="count")])
            prepare(dataset, spec, verified_bound=True, rho=0.1, delta=None, confidence=0.95, min_threshold=0)

    def prepare(self, task: QueryTask) -> Certificate:
        """The certified loss of the query (planned and certified once, then kept)."""
        return _certificate(self._prepared(task).certified)

    def run(self, task: QueryTask, certificate: Certificate) -> Output:
        """Run the query on the data (the prepared measurement, re-checked by OpenDP's map), unless its certified
        loss is not `certificate`, the loss the executor checked the budget for and will charge."""
        prepared = self._prepared(task)
        if _certificate(prepared.certified) != certificate:
            raise QueryError("calibration_failed", "the query's certified loss is not the one the budget was checked "
                             "for", hint="retry; if it persists, tell the site's administrators")
        dataset = self.catalog.dataset(task.dataset)
        return run(dataset.scan(), dataset, prepared.plan, prepared.certified, prepared.description,
                   prepared.streaming)
