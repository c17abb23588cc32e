"""What a hospital's IT watches: one structured log line per request, and Prometheus metrics.

The access log says who asked for what and how it went (method, path, route, status, duration, principal,
role, refusal code) and never what was asked or answered: no query string, no header, no body, no token.
Metrics count requests, releases, refusals and the privacy budget spent per dataset; they are read at
`/metrics` with a steward's or admin's token, or with the scraper's own secret (VEIL_METRICS_TOKEN).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from veil.executor.auth import Principal
from veil.executor.store import caps

LOG_FORMAT_ENV = "VEIL_LOG_FORMAT"
"""`json` (the default: one JSON object a line) or `text` (one readable line), for the executor's log."""
METRICS_TOKEN_ENV = "VEIL_METRICS_TOKEN"
"""A secret that lets a scraper (Prometheus) read /metrics and nothing else, besides stewards' and admins' tokens."""
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's folder for the counters of several worker processes (`serve --workers N` sets one)."""
access_log = logging.getLogger("veil.executor.access")
_MAX_PATH = 200
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}

disable_created_metrics()  # no `_created` series beside every counter: rate() needs none
REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("veil_requests", "HTTP requests answered, by route template and status",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("veil_request_duration_seconds", "Time to answer an HTTP request, by route template",
                    ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
RELEASES = Counter("veil_releases", "DP query releases made by this executor, by dataset", ["dataset"],
                   registry=REGISTRY)
RHO_CHARGED = Counter("veil_rho_charged", "zCDP rho charged by this executor's query releases, by dataset",
                      ["dataset"], registry=REGISTRY)
REFUSALS = Counter("veil_refusals", "Refusals answered, by refusal code", ["code"], registry=REGISTRY)


# ------------------------------------------------------------------ logs


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and an access record's fields at the top."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": _iso(record.created), "level": record.levelname.lower(),
                                "logger": record.name}
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """One readable line: time, level, logger, then the access record's fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        message = (" ".join(f"{k}={v}" for k, v in fields.items() if k != "time") if isinstance(fields, dict)
                   else record.getMessage())
        line = f"{_iso(record.created)} {record.levelname} {record.name}: {message}"
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(fmt: str | None = None) -> None:
    """Send the executor's logs (access log included) to standard error, formatted as VEIL_LOG_FORMAT says.
    Called by `veil executor serve` and by each worker process; idempotent."""
    fmt = (fmt or os.environ.get(LOG_FORMAT_ENV) or "json").lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"{LOG_FORMAT_ENV} must be 'json' or 'text', not '{fmt}'")
    logger = logging.getLogger("veil.executor")
    for handler in [h for h in logger.handlers if getattr(h, "_veil", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._veil = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Pure ASGI middleware, outside the Gate: times each request, then logs it and counts it.

    The Gate leaves the caller's identity in the scope's state, and every refusal its code (`refusal`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, recorded = 0, False

        async def observed(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                recorded = True  # logged before the client has the whole answer: a reader of the log sees it
                _record(scope, status, time.perf_counter() - start)
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, observed)
            failed = False
        finally:
            if not recorded:  # the app crashed (the server answers 500) or the client went away (499)
                _record(scope, status or (500 if failed else 499), time.perf_counter() - start)


def _record(scope: Scope, status: int, seconds: float) -> None:
    state = scope.get("state") or {}
    identity = state.get("identity")
    who = identity if isinstance(identity, Principal) else None
    route = getattr(scope.get("route"), "path", None)
    code = state.get("refusal") or ("internal_error" if status == 500 else None)
    method = str(scope.get("method", ""))[:16]
    label = route or "unmatched"  # a bounded set of labels: unknown paths and methods are not each a series
    verb = method if method in _METHODS else "other"
    REQUESTS.labels(verb, label, str(status)).inc()
    LATENCY.labels(verb, label).observe(seconds)
    if code:
        REFUSALS.labels(code).inc()
    client = scope.get("client")
    access_log.info("request", extra={"access": {
        "event": "request",
        "method": method,
        "path": str(scope.get("path", ""))[:_MAX_PATH],  # never the query string
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "principal": who.name if who else "anonymous",
        "role": who.role if who else None,
        "project": who.project if who else None,
        "refusal": code,
        "client": client[0] if client else None,
    }})


def refused(scope_state: Any, code: str) -> None:
    """Note a refusal's code for the access log and the metrics (`scope_state`: the scope's state dict or
    a Starlette request's `state`)."""
    if isinstance(scope_state, dict):
        scope_state["refusal"] = code
    else:
        scope_state.refusal = code


# ------------------------------------------------------------------ metrics


def released(dataset: str, rho: float) -> None:
    """Count one DP query release and the rho it charged."""
    RELEASES.labels(dataset).inc()
    RHO_CHARGED.labels(dataset).inc(rho)


class LedgerCollector(Collector):
    """Each dataset's lifetime budget, read from the site's ledger at each scrape (the same figures whichever
    worker or replica answers): rho spent by all projects together, and the cap."""

    def __init__(self, engine: Engine, site: str) -> None:
        self.engine, self.site = engine, site

    def collect(self) -> Iterable[Metric]:
        spent = GaugeMetricFamily("veil_dataset_rho_spent", "zCDP rho spent on a dataset by all projects "
                                  "(its lifetime cap's ledger)", labels=["dataset"])
        total = GaugeMetricFamily("veil_dataset_rho_cap", "A dataset's lifetime cap, in zCDP rho", labels=["dataset"])
        with self.engine.connect() as conn:
            for row in conn.execute(select(caps.c.dataset, caps.c.rho_spent, caps.c.rho_total)):
                spent.add_metric([row.dataset], row.rho_spent)
                total.add_metric([row.dataset], row.rho_total)
        yield from (spent, total)


def exposition(engine: Engine, site: str, version: str) -> bytes:
    """The metrics in Prometheus' text format: this process's (or, under several workers, all workers')
    counters and the ledger's gauges."""
    registry = CollectorRegistry(auto_describe=True)
    if os.environ.get(MULTIPROCESS_ENV):
        MultiProcessCollector(registry)
        counted = b""
    else:
        counted = generate_latest(REGISTRY)
    registry.register(LedgerCollector(engine, site))
    registry.register(_Info(site, version))
    return counted + generate_latest(registry)


class _Info(Collector):
    def __init__(self, site: str, version: str) -> None:
        self.site, self.version = site, version

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("veil_executor_info", "The site and the Veil version this executor runs",
                                 labels=["site", "version"])
        info.add_metric([self.site, self.version], 1.0)
        yield info


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def uvicorn_log_config(fmt: str | None = None) -> dict[str, Any]:
    """uvicorn's own loggers (start, stop, errors) in the executor's format; its access log stays off, since
    `AccessLog` writes one without query strings."""
    fmt = (fmt or os.environ.get(LOG_FORMAT_ENV) or "json").lower()
    formatter = f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"veil": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "veil", "stream": "ext://sys.stderr"}},
        "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                    "uvicorn.error": {"level": "INFO"},
                    "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False}},
    }
