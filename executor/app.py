"""The executor's HTTP API (FastAPI): every response is a release, a view of public facts, or a refusal.

Every refusal (bad input, auth, budget) is audited and answered as a `Refusal` with a receipt. The gate
(identity, rate, body size) runs before any route; the routes, one router per concern, are in `routes/`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from veil import __version__
from veil.errors import AuthError, VeilError, validation_problems
from veil.executor.auth import Principal, authenticate
from veil.executor.observability import AccessLog, configure_logging, refused
from veil.executor.query_pool import MAX_IN_FLIGHT
from veil.executor.routes import (
    access,
    audit,
    bridge,
    catalog,
    datasets,
    governance,
    jobs,
    lifecycle,
    metrics,
    mocks,
    queries,
    reports,
    sheets,
    standing,
    witness,
)
from veil.executor.site import Site
from veil.wire import Refusal

MAX_BODY_BYTES = 64 * 1024
MAX_ANONYMOUS_BODY_BYTES = 1024
"""A request without a valid token is refused whatever it says: it may not send more than this."""
MAX_WEIGHTS_BYTES = 64 * 1024 * 1024
"""Federated rounds and a study's final model carry weights: their endpoints take up to this, and only
for a job the token's project holds."""
WEIGHTS_PATH = re.compile(r"^/jobs/([0-9]{1,18})/(round|finish)$")
SHUTDOWN_SECONDS = 10
"""How long the executor lets requests in flight finish after SIGTERM (queries stop at their own limit)."""
THREADS = 2 * MAX_IN_FLIGHT
SITE_CONFIG_ENV, DATABASE_URL_ENV = "VEIL_SITE_CONFIG", "VEIL_DATABASE_URL"
log = logging.getLogger("veil.executor")


class Gate:
    """Pure ASGI middleware: who is calling, whether they are within their rate, and how large a body they
    may send are settled before any body is read or any route runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        site: Site = scope["app"].state.site
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        identity: Principal | AuthError = ANONYMOUS_CALLER
        if authorization is not None:
            identity = await run_in_threadpool(_authenticate, site, authorization)
        scope.setdefault("state", {})["identity"] = identity
        address = scope["client"][0] if scope.get("client") else "unknown"
        known = isinstance(identity, Principal)
        key, per_minute = ((f"token:{identity.name}", site.catalog.limits.requests_per_minute) if known
                           else (f"address:{address}", site.catalog.limits.anonymous_per_minute))
        if not site.rates.allow(key, per_minute):
            error = VeilError("rate_limited", f"more than {per_minute} requests a minute from "
                              f"{'this token' if known else 'this address without a valid token'}",
                              hint="slow down and retry in a few seconds", status=429)
            site.refusals.count(address, error.code)
            refused(scope["state"], error.code)
            return await _refusal_response(error, None)(scope, _no_receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = await self._body_limit(site, identity, scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"")
        announced = declared.isdigit() and (len(declared) > 18 or int(declared) > limit)
        body = b"" if announced else await _read_body(receive, limit)
        if body is None:  # the client went away
            return None
        if announced or len(body) > limit:
            error = VeilError("body_too_large", f"the request body exceeds {limit} bytes",
                              hint="send one query per request (a few hundred bytes), or a smaller model"
                              if known else "send a valid bearer token", status=413)
            receipt = await _audit_refusal(site, identity, address, _action(scope["path"]), error)
            refused(scope["state"], error.code)
            return await _refusal_response(error, receipt)(scope, _no_receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _body_limit(site: Site, identity: Principal | AuthError, path: str) -> int:
        if not isinstance(identity, Principal):
            return MAX_ANONYMOUS_BODY_BYTES
        weights = WEIGHTS_PATH.match(path)
        if weights and identity.role == "researcher" and await run_in_threadpool(
                site.trainer.holds, identity, int(weights.group(1))):
            return MAX_WEIGHTS_BYTES
        return MAX_BODY_BYTES


ANONYMOUS_CALLER = AuthError("missing_token", "this request carries no bearer token",
                             hint="send 'Authorization: Bearer <token>'; a steward creates tokens with "
                                  "'veil executor token create'")


def _authenticate(site: Site, authorization: str) -> Principal | AuthError:
    try:
        return authenticate(site.engine, authorization)
    except AuthError as exc:
        return exc


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The body, read up to `limit` + 1 bytes (then reading stops); None if the client disconnected."""
    chunks, size, more = [], 0, True
    while more and size <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    return b"".join(chunks)


def _action(path: str) -> str:
    """The audit log's action for a request path: its first segment, if it is one of the API's."""
    first = path.strip("/").split("/")[0]
    return first if first in ACTIONS else "request"


ACTIONS = {"query", "datasets", "whoami", "grants", "jobs", "catalog", "levels", "applications", "budgets",
           "audit", "receipts", "health", "metrics", "openapi.json", "docs", "report", "standing", "bridge"}


async def _audit_refusal(site: Site, identity: Principal | AuthError, address: str, action: str,
                         error: VeilError, dataset: str | None = None, query: str | None = None) -> str | None:
    """An accountable refusal (a valid token) gets its own audit entry and receipt; the others are counted."""
    if not isinstance(identity, Principal):
        site.refusals.count(address, error.code)
        return None
    return await run_in_threadpool(site.refuse, identity, action, error, dataset, query)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _refusal_response(error: VeilError, receipt: str | None) -> JSONResponse:
    body = Refusal(code=error.code, message=error.message, hint=error.hint, receipt=receipt,
                   remaining=error.remaining)
    return JSONResponse(body.model_dump(), status_code=error.status)


REFUSAL_STATUSES = (400, 401, 403, 404, 405, 409, 413, 422, 429, 503)
_HTTP_CODES = {404: ("unknown_route", "there is no such route", "see the routes at /openapi.json"),
               405: ("method_not_allowed", "this route does not take that method", "see /openapi.json"),
               400: ("malformed_request", "the body could not be parsed", "send JSON as /openapi.json describes")}


def create_app(site: Site) -> FastAPI:
    """The executor app for one site."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # threads wait on query workers and the database: enough of them that one client's stalled
        # requests (at most query_pool.MAX_IN_FLIGHT) cannot take them all
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield
        await run_in_threadpool(site.close)

    app = FastAPI(
        title=f"Veil site executor: {site.catalog.title}",
        version=__version__,
        description="Answers only with differentially private releases, charged to a ledger and audited.",
        lifespan=lifespan,
        responses={status: {"model": Refusal} for status in REFUSAL_STATUSES},  # every refusal has one shape
    )
    app.state.site = site
    app.add_middleware(Gate)
    app.add_middleware(AccessLog)  # outermost: it times and logs what the Gate refuses too

    async def audited_refusal(request: Request, error: VeilError) -> JSONResponse:
        context: dict[str, Any] = getattr(request.state, "context", {})
        address = request.client.host if request.client else "unknown"
        identity = getattr(request.state, "identity", ANONYMOUS_CALLER)
        receipt = await _audit_refusal(site, identity, address, _action(request.url.path), error,
                                       context.get("dataset"), context.get("query"))
        refused(request.state, error.code)
        return _refusal_response(error, receipt)

    @app.exception_handler(VeilError)
    async def _on_refusal(request: Request, exc: VeilError) -> JSONResponse:
        return await audited_refusal(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = VeilError("malformed_request", f"the request is not valid: {validation_problems(exc.errors())}",
                          hint="see the request schema at /openapi.json", status=422)
        return await audited_refusal(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, message, hint = _HTTP_CODES.get(exc.status_code, (f"http_{exc.status_code}", "refused", None))
        where = f"{request.method} {request.url.path}"[:200]
        error = VeilError(code, f"{message} ({where})", hint=hint, status=exc.status_code)
        return await audited_refusal(request, error)

    @app.exception_handler(Exception)
    async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        error = VeilError("internal_error", f"the executor failed ({type(exc).__name__}); nothing was charged",
                          hint="retry later; if it persists, tell the site's administrators", status=500)
        return await audited_refusal(request, error)

    # in this order, the routes (and the OpenAPI document's paths) keep the order they always had
    for routes in (datasets, queries, access, mocks, jobs, catalog, governance, lifecycle, audit, metrics, sheets,
                   reports, witness, standing, bridge):
        app.include_router(routes.router)
    return app


def app_from_environment() -> FastAPI:
    """The app for a worker process of `veil executor serve --workers N` (site named by the environment)."""
    configure_logging()
    return create_app(Site.open(os.environ[SITE_CONFIG_ENV], os.environ.get(DATABASE_URL_ENV)))
