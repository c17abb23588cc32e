"""Prepared queries: the plan, its certified measurement and its accuracy summary, kept per
(dataset, canonical query, privacy-unit mode, loss or requested accuracy, confidence). None of it depends on the data,
so a repeated query skips planning and calibration; OpenDP's map re-checks the loss on each use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from veil.query.calibrate import Certified, certify, certify_accuracy
from veil.query.plan import Plan, build_plan
from veil.query.release import Description, describe
from veil.query.table import Table
from veil.wire import QuerySpec


@dataclass(frozen=True)
class Prepared:
    """A query planned, certified by OpenDP at its loss, and described at its confidence."""

    plan: Plan
    certified: Certified
    description: Description
    streaming: bool = False
    """Whether the site may collect the result on Polars' streaming engine (see `release.run`)."""


def prepare(dataset: Table, spec: QuerySpec, *, verified_bound: bool, rho: float | None, delta: float | None,
            confidence: float, min_threshold: int, accuracy: float | None = None) -> Prepared:
    """Plan `spec` on the dataset's public metadata and let OpenDP certify it at (rho, delta), or at the
    smallest loss that gives every count and sum the half-width `accuracy` (give one of rho, accuracy):
    no rows are involved, so the researcher's mock mode and the site arrive at the same measurement and price.

    `delta` is only used for groups whose keys are not public (thresholding)."""
    plan = build_plan(dataset, spec, verified_bound=verified_bound, thresholded=delta is not None)
    private_keys_delta = delta if not plan.public_keys else None
    if accuracy is not None:
        certified = certify_accuracy(plan, accuracy, confidence, private_keys_delta, min_threshold)
    else:
        assert rho is not None, "give rho or accuracy"
        certified = certify(plan, rho, private_keys_delta, min_threshold)
    return Prepared(plan, certified, describe(plan, certified, confidence))


class PreparedQueries:
    """A small thread-safe LRU of prepared queries."""

    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[tuple[Any, ...], Prepared] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get_or_prepare(self, key: tuple[Any, ...], prepare: Callable[[], Prepared]) -> Prepared:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        prepared = prepare()  # outside the lock: two threads may prepare the same query; both are valid
        with self._lock:
            self._items[key] = prepared
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return prepared
