"""Inside a query worker: plan, certify and describe a query (kept per query and loss), then run it.

Runs in the worker processes of `query_pool`; the catalog is read from the site's file, and prepared
queries are kept per (dataset, canonical query, privacy-unit mode, loss, confidence, threshold floor).
"""

from __future__ import annotations

from veil.errors import QueryError
from veil.executor.calibrate import certify, fits
from veil.executor.catalog import load_catalog
from veil.executor.plan import build_plan
from veil.executor.prepared import Prepared, PreparedQueries
from veil.executor.query_pool import Certificate, QueryTask
from veil.executor.release import Output, can_stream, describe, run
from veil.wire import Aggregate, QuerySpec


class QueryRunner:
    """A worker's view of the site: its catalog and its prepared queries."""

    def __init__(self, catalog_path: str) -> None:
        self.catalog = load_catalog(catalog_path)
        self.prepared = PreparedQueries()

    def _prepared(self, task: QueryTask) -> Prepared:
        dataset = self.catalog.dataset(task.dataset)
        spec = QuerySpec.model_validate_json(task.spec_json)

        def prepare() -> Prepared:
            plan = build_plan(dataset, spec, verified_bound=task.verified_bound, thresholded=task.delta is not None)
            certified = certify(plan, task.rho, task.delta if not plan.public_keys else None, task.min_threshold)
            return Prepared(plan, certified, describe(plan, certified, task.confidence),
                            can_stream(dataset, plan, certified))

        prepared = self.prepared.get_or_prepare(task.key, prepare)
        if not fits(prepared.certified, prepared.plan, task.rho, task.delta):
            raise QueryError("calibration_failed", "the prepared measurement no longer fits its loss",
                             hint="retry; if it persists, tell the site's administrators")
        return prepared

    def warm(self) -> None:
        """Plan, certify and describe one count without data, so that a worker's first real query does not
        pay for OpenDP's first-use costs (about a second) inside its time limit."""
        for dataset in list(self.catalog.datasets.values())[:1]:
            spec = QuerySpec(dataset=dataset.name, aggregates=[Aggregate(fn="count")])
            plan = build_plan(dataset, spec, verified_bound=True, thresholded=False)
            describe(plan, certify(plan, 0.1, None), 0.95)

    def prepare(self, task: QueryTask) -> Certificate:
        """The certified loss of the query (planned and certified once, then kept)."""
        certified = self._prepared(task).certified
        return Certificate(certified.rho, certified.delta, certified.threshold)

    def run(self, task: QueryTask) -> Output:
        """Run the query on the data (the prepared measurement, re-checked by OpenDP's map)."""
        prepared = self._prepared(task)
        return run(self.catalog.dataset(task.dataset), prepared.plan, prepared.certified, prepared.description,
                   prepared.streaming)
