"""Prepared queries: the plan, its certified measurement and its accuracy summary, kept per
(dataset, canonical query, privacy-unit mode, loss, confidence). None of it depends on the data,
so a repeated query skips planning and calibration; OpenDP's map re-checks the loss on each use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from veil.executor.calibrate import Certified
from veil.executor.plan import Plan
from veil.executor.release import Description


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    certified: Certified
    description: Description
    streaming: bool


class PreparedQueries:
    """A small thread-safe LRU of prepared queries."""

    def __init__(self, size: int = 2048) -> None:
        self._items: OrderedDict[tuple, Prepared] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get_or_prepare(self, key: tuple, prepare: Callable[[], Prepared]) -> Prepared:
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
