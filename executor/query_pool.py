"""Queries are planned, certified and run in worker processes under a time limit: the site's watchdog.

OpenDP's native code cannot be interrupted from Python: a query that runs long, recurses deep or eats
memory would hold a thread of the web server for good (or crash the executor). Each query therefore runs
in one of a few worker processes. The executor waits at most the site's `query_seconds` (planning and
run together), then kills the worker, starts a fresh one and refuses the query; a worker that dies (a
native crash) is replaced the same way. Nothing is charged for either: the charge is written only after
the result is back. Processes, not threads, because only a process can be stopped while it runs native
code, and its memory goes back to the system with it. One principal may hold at most `workers - 1`
workers at a time, so a stalled request of one project leaves a worker to everyone else.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import queue
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from veil import errors
from veil.errors import VeilError
from veil.executor.cancellation import cancelled
from veil.query.release import Output

MAX_WORKER_RSS_BYTES = 3 * 1024**3
"""A worker whose resident memory passes this after a query is replaced (its memory goes back)."""
STARTUP_SECONDS = 120.0
"""How long a new worker may take to import and warm up (not counted against a query's time limit)."""
MAX_IN_FLIGHT = 64
"""Queries one principal may have in the executor at once (running or waiting for a worker)."""
STOP_CHECK_SECONDS = 0.05
"""How often a request waiting on its worker looks whether it was cancelled."""
MAX_CERTIFICATES = 4096
"""Certified losses the pool keeps per query key (beyond, it forgets them all and starts again)."""


class Stopped(Exception):
    """The request was cancelled while its worker was busy with it."""


@dataclass(frozen=True)
class QueryTask:
    """What a worker needs to plan and certify a query; all of it plain data."""

    key: tuple
    dataset: str
    spec_json: str
    verified_bound: bool
    rho: float | None
    delta: float | None
    confidence: float
    min_threshold: int
    accuracy: float | None = None
    """Given instead of rho: the half-width every count and sum must reach (the certified loss is charged)."""


@dataclass(frozen=True)
class Certificate:
    """The loss OpenDP certified for a prepared query: what the ledger will charge."""

    rho: float
    delta: float
    threshold: int | None


def _timeout(seconds: float) -> VeilError:
    return VeilError("query_timeout", f"the query ran past this site's limit of {seconds:g} s and was stopped; "
                     "nothing was charged",
                     hint="simplify it (fewer groups, fewer statistics, a smaller IN list) or ask at a quieter "
                          "time; the site's stewards set the limit ([limits] query_seconds)", status=503)


def _crashed() -> VeilError:
    return VeilError("query_failed", "the query stopped the process that ran it (an error in native code); "
                     "nothing was charged",
                     hint="simplify the query; if a simple query fails, tell the site's administrators", status=422)


def _busy(seconds: float) -> VeilError:
    return VeilError("site_busy", f"no query worker was free within {seconds:g} s; nothing was charged",
                     hint="retry in a moment", status=503)


@functools.cache
def _context() -> multiprocessing.context.BaseContext:
    """Workers fork from a forkserver that has imported Polars, OpenDP and the planner once: a new worker
    (at start, or replacing a killed one) costs a fork, not a second of imports. The forkserver itself is
    single-threaded, so forking it is safe even though the executor's own process runs threads."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["veil.executor.queries"])
    return context


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, catalog_path: Path) -> None:
        context = _context()
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, str(catalog_path)), daemon=True,
                                       name="veil-query-worker")
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        """Wait until the worker's imports are done and OpenDP is warm (it says so once)."""
        if not self.ready:
            self._receive(time.monotonic() + STARTUP_SECONDS)
            self.ready = True

    def call(self, message: tuple, deadline: float, stopped: threading.Event) -> Any:
        """Send one message and wait for the answer until `deadline` (monotonic) or until `stopped` is set;
        raise on overrun (TimeoutError) or stop (Stopped)."""
        self.conn.send(message)
        status, value = self._receive(deadline, stopped)
        if status == "refused":
            kind, code, message_text, hint, http_status = value
            raise getattr(errors, kind, VeilError)(code, message_text, hint=hint, status=http_status)
        if status == "error":
            raise RuntimeError(value)
        return value

    def _receive(self, deadline: float, stopped: threading.Event | None = None) -> Any:
        while not self.conn.poll(min(STOP_CHECK_SECONDS, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError
            if stopped is not None and stopped.is_set():
                raise Stopped
        return self.conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class QueryPool:
    """A few query worker processes for one site; `session` lends one to a request under a deadline."""

    def __init__(self, catalog_path: Path, workers: int, seconds: float) -> None:
        self.catalog_path, self.seconds = catalog_path, seconds
        self.per_principal = max(1, workers - 1)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()  # a principal's queries in the executor
        self._running: Counter[str] = Counter()  # ... and those holding a worker
        self._closed = False
        self._workers: set[_Worker] = set()
        self._certificates: dict[tuple, Certificate] = {}
        for _ in range(workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker(self.catalog_path)
        with self._lock:
            self._workers.add(worker)
        return worker

    @contextmanager
    def session(self, principal: str, stopped: threading.Event | None = None) -> Iterator[Session]:
        """A worker for one query of `principal`, returned (or replaced, after an overrun or a stop) afterwards.
        Setting `stopped` (the request was cancelled) ends the wait for a worker or an answer at once."""
        deadline = time.monotonic() + self.seconds
        with self._lock:
            if self._in_flight[principal] >= MAX_IN_FLIGHT:
                raise VeilError("too_many_queries", f"you have {MAX_IN_FLIGHT} queries in flight at this site",
                                hint="wait for answers before sending more", status=429)
            self._in_flight[principal] += 1
        try:
            stopped = stopped or threading.Event()
            worker = self._acquire(principal, deadline, stopped)
            session = Session(worker, deadline, self.seconds, stopped, self._certificates)
            try:
                session.start()  # a fresh worker's start-up is not the query's time
                yield session
            finally:
                self._release(principal, session)
        finally:
            with self._lock:
                self._in_flight[principal] -= 1
                if not self._in_flight[principal]:
                    del self._in_flight[principal]

    def _acquire(self, principal: str, deadline: float, stopped: threading.Event) -> _Worker:
        while True:
            with self._lock:
                if self._running[principal] < self.per_principal:
                    try:
                        worker = self._idle.get_nowait()
                    except queue.Empty:
                        worker = None
                    if worker is not None:
                        self._running[principal] += 1
                        return worker
            if time.monotonic() >= deadline:
                raise _busy(self.seconds)
            if stopped.is_set():
                raise cancelled(None)
            time.sleep(0.002)

    def _release(self, principal: str, session: Session) -> None:
        with self._lock:
            self._running[principal] -= 1
            if not self._running[principal]:
                del self._running[principal]
        worker = session.worker
        if self._closed or session.broken or _rss(worker.process.pid) > MAX_WORKER_RSS_BYTES:
            worker.stop()
            with self._lock:
                self._workers.discard(worker)
            if self._closed:
                return
            worker = self._start()
        self._idle.put(worker)

    def close(self) -> None:
        """Stop every worker, busy ones too (the executor is shutting down; their queries are refused)."""
        self._closed = True
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()


class Session:
    """One request's use of a worker: prepare (plan + certify), then run, both before the deadline."""

    def __init__(self, worker: _Worker, deadline: float, seconds: float, stopped: threading.Event,
                 certificates: dict[tuple, Certificate]) -> None:
        self.worker, self.deadline, self.seconds, self.stopped, self.broken = worker, deadline, seconds, stopped, False
        self.certificates = certificates

    def start(self) -> None:
        """Wait for the worker to be ready, then start the query's clock."""
        try:
            self.worker.wait_ready()
        except (TimeoutError, EOFError, OSError):
            self.broken = True
            raise _crashed() from None
        self.deadline = time.monotonic() + self.seconds

    def _call(self, message: tuple) -> Any:
        try:
            return self.worker.call(message, self.deadline, self.stopped)
        except TimeoutError:
            self.broken = True
            raise _timeout(self.seconds) from None
        except Stopped:  # the worker is still busy with the abandoned query: replace it
            self.broken = True
            raise cancelled(None) from None
        except (EOFError, OSError, BrokenPipeError):
            self.broken = True
            raise _crashed() from None

    def prepare(self, task: QueryTask) -> Certificate:
        """Plan and certify the query (kept by the worker for `run`); its certified loss. The pool keeps the loss
        per query key, so a repeated query skips this round trip to the worker."""
        known = self.certificates.get(task.key)
        if known is None:
            known = self._call(("prepare", task))
            if len(self.certificates) >= MAX_CERTIFICATES:
                self.certificates.clear()
            self.certificates[task.key] = known
        return known

    def run(self, task: QueryTask, certificate: Certificate) -> Output:
        """Run the prepared query on the data: rows with intervals, statistics and the result's digest. The worker
        (planning and certifying again if it has not yet) refuses if its certified loss is not `certificate`."""
        return self._call(("run", (task, certificate)))  # type: ignore[no-any-return]


def _rss(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- the worker process


def _serve(conn: Connection, catalog_path: str) -> None:
    """A worker's loop: prepare and run queries for its parent until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a native crash leaves no core file with data in it
    from veil.executor.queries import QueryRunner

    runner = QueryRunner(catalog_path)
    runner.warm()
    conn.send(("ready", None))
    while True:
        try:
            kind, body = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", runner.prepare(body) if kind == "prepare" else runner.run(*body))
        except VeilError as exc:
            reply = ("refused", (type(exc).__name__, exc.code, exc.message, exc.hint, exc.status))
        except Exception as exc:  # a bug: the parent logs it and answers internal_error
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)
