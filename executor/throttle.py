"""Rate limits per token and per client address, and refusals counted instead of logged one by one.

A token may send `requests_per_minute` requests a minute (a bucket that refills continuously, so a burst
up to the minute's allowance is fine); requests without a valid token share `anonymous_per_minute` per
client address. Refusals that no one is accountable for (no valid token, or beyond a rate limit) are
counted, per window, into ONE audit entry: the log grows by at most one such entry per window however
hard anyone knocks, while each authenticated refusal within the limits keeps its own entry and receipt.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_BUCKETS = 100_000
"""Buckets kept at once; the oldest (longest full) are forgotten first, so memory stays bounded."""
LISTED_ADDRESSES = 10
"""Addresses named in a window's audit entry (the rest are counted)."""


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets keyed by principal or address; thread-safe."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, per_minute: int) -> bool:
        """Take one request from `key`'s bucket; False when it is empty."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(float(per_minute), now)
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.at) * per_minute / 60.0)
            bucket.at = now
            allowed = bucket.tokens >= 1.0
            if allowed:
                bucket.tokens -= 1.0
            self._buckets[key] = bucket  # re-inserted: the dict's order is least recently used first
            while len(self._buckets) > MAX_BUCKETS:
                del self._buckets[next(iter(self._buckets))]
        return allowed


@dataclass
class _Window:
    started: float
    codes: Counter[str] = field(default_factory=Counter)
    addresses: Counter[str] = field(default_factory=Counter)


class RefusalCounter:
    """Counts unaccountable refusals and writes them as one audit entry per window (`write(reason)`)."""

    def __init__(self, window_seconds: float, write: Callable[[str], None]) -> None:
        self.window_seconds, self._write = window_seconds, write
        self._window = _Window(time.monotonic())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, name="veil-refusal-counter", daemon=True)
        self._thread.start()

    def count(self, address: str, code: str) -> None:
        with self._lock:
            self._window.codes[code] += 1
            self._window.addresses[address[:64]] += 1

    def flush(self) -> None:
        """Write the current window's counts (if any) as one audit entry and start a new window."""
        with self._lock:
            window, self._window = self._window, _Window(time.monotonic())
        if not window.codes:
            return
        total = sum(window.codes.values())
        codes = ", ".join(f"{code} x{n}" for code, n in window.codes.most_common())
        listed = [f"{a} x{n}" for a, n in window.addresses.most_common(LISTED_ADDRESSES)]
        more = len(window.addresses) - len(listed)
        self._write(f"{total} refusals without an accountable token in {time.monotonic() - window.started:.0f} s "
                    f"({codes}) from {', '.join(listed)}" + (f" and {more} more addresses" if more > 0 else ""))

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _flusher(self) -> None:
        while not self._stop.wait(self.window_seconds):
            try:
                self.flush()
            except Exception:  # the database was unavailable: that window's counts are lost, not the next
                continue
