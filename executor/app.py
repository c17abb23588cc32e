"""The executor's HTTP API (FastAPI): every response is a release, a view of public facts, or a refusal.

Every refusal (bad input, auth, budget) is audited and answered as a `Refusal` with a receipt.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from veil import __version__, limits
from veil.errors import AuthError, VeilError, validation_problems
from veil.executor.auth import Principal, authenticate
from veil.executor.query_pool import MAX_IN_FLIGHT
from veil.executor.site import Site
from veil.wire import (
    ApplicationInfo,
    ApplicationRequest,
    AuditEntry,
    AuditVerification,
    CapRequest,
    CatalogEntry,
    DatasetBudget,
    DatasetInfo,
    GrantInfo,
    Health,
    JobInfo,
    LevelRule,
    MockInfo,
    MockRequest,
    QueryRequest,
    Refusal,
    Release,
    ReviewRequest,
    RevokeRequest,
    TrainRequest,
    WhoAmI,
)

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
Id = Annotated[int, PathParam(ge=1, le=limits.MAX_ID)]
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
           "audit", "receipts", "health", "openapi.json", "docs"}


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

    def principal(request: Request) -> Principal:
        identity = request.state.identity
        if isinstance(identity, AuthError):
            raise identity
        return identity  # type: ignore[no-any-return]

    async def audited_refusal(request: Request, error: VeilError) -> JSONResponse:
        context: dict[str, Any] = getattr(request.state, "context", {})
        address = request.client.host if request.client else "unknown"
        identity = getattr(request.state, "identity", ANONYMOUS_CALLER)
        receipt = await _audit_refusal(site, identity, address, _action(request.url.path), error,
                                       context.get("dataset"), context.get("query"))
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

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", site=site.catalog.site, version=__version__, datasets=len(site.catalog.datasets))

    @app.get("/datasets", response_model=list[DatasetInfo])
    def datasets(who: Principal = Depends(principal)) -> list[DatasetInfo]:
        """The datasets you may use, with schema and public metadata (never rows)."""
        return site.datasets(who)

    @app.get("/datasets/{name}", response_model=DatasetInfo)
    def dataset(name: str, who: Principal = Depends(principal)) -> DatasetInfo:
        return site.dataset_for(who, name).info()

    @app.post("/query", response_model=Release)
    def query(body: QueryRequest, request: Request, who: Principal = Depends(principal)) -> Release:
        """Run one DP query (SQL or JSON spec); the release carries intervals, cost and receipt."""
        request.state.context = {
            "dataset": body.spec.dataset if body.spec else None,
            "query": (body.sql if body.sql is not None else json.dumps(body.spec.model_dump(), sort_keys=True))[:4000],
        }
        return site.query(who, body)

    @app.get("/whoami", response_model=WhoAmI)
    def whoami(who: Principal = Depends(principal)) -> WhoAmI:
        """Who this token acts for: the researcher kernel checks it holds researcher tokens only."""
        return WhoAmI(principal=who.name, role=who.role, project=who.project, office=who.office)

    @app.get("/grants", response_model=list[GrantInfo])
    def grants(who: Principal = Depends(principal)) -> list[GrantInfo]:
        """Your project's grants (a steward sees all) with what is spent and what remains."""
        return site.grants(who)

    @app.get("/datasets/{name}/mock", response_model=MockInfo)
    def mock(name: str, who: Principal = Depends(principal)) -> MockInfo:
        """The dataset's mock for mock mode: schema-only (made by the kernel) or the steward's DP synthetic rows."""
        return site.mock(who, name)

    @app.put("/datasets/{name}/mock", response_model=MockInfo)
    def set_mock(name: str, body: MockRequest, request: Request, who: Principal = Depends(principal)) -> MockInfo:
        """Choose the dataset's mock (stewards); DP synthetic rows are charged to its lifetime cap."""
        request.state.context = {"dataset": name}
        return site.set_mock(who, name, body)

    @app.post("/jobs", response_model=JobInfo, status_code=201)
    def train(body: TrainRequest, request: Request, who: Principal = Depends(principal)) -> JobInfo:
        """Start a DP-SGD training job; its budget is reserved now and settled to what the accountant spends."""
        request.state.context = {"dataset": body.dataset}
        return site.train(who, body)

    @app.get("/jobs/{job_id}", response_model=JobInfo)
    def job(job_id: Id, who: Principal = Depends(principal)) -> JobInfo:
        """A job's state, progress (share of steps, epoch, epsilon spent so far) and, when done, its DP evaluation."""
        return site.job(who, job_id)

    @app.post("/jobs/{job_id}/cancel", response_model=JobInfo)
    def cancel_job(job_id: Id, who: Principal = Depends(principal)) -> JobInfo:
        return site.cancel_job(who, job_id)

    @app.post("/jobs/{job_id}/round", response_class=Response,
              responses={200: {"content": {"application/x-protobuf": {}}}})
    async def job_round(job_id: Id, request: Request, who: Principal = Depends(principal)) -> Response:
        """One round of a federated study: a Flower train message's content (protobuf RecordDict) in,
        the site's DP weights and public numbers out, in the same format."""
        body = await request.body()
        reply = await run_in_threadpool(site.train_round, who, job_id, body)
        return Response(reply, media_type="application/x-protobuf")

    @app.post("/jobs/{job_id}/finish", response_model=JobInfo)
    async def finish_job(job_id: Id, request: Request, who: Principal = Depends(principal)) -> JobInfo:
        """End a site's part of a federated study: with the final weights (safetensors) as the body, a DP
        evaluation on held-out patients; the budget is settled to what the site's accountant spent."""
        body = await request.body()
        return await run_in_threadpool(site.finish_job, who, job_id, body or None)

    @app.get("/jobs/{job_id}/weights", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def job_weights(job_id: Id, who: Principal = Depends(principal)) -> Response:
        """The trained weights as safetensors (never a pickle)."""
        return Response(site.job_weights(who, job_id), media_type="application/octet-stream")

    @app.get("/catalog", response_model=list[CatalogEntry])
    def catalog(who: Principal = Depends(principal)) -> list[CatalogEntry]:
        """Every dataset's name, title and level: what you may apply for (schema comes with a grant)."""
        return [CatalogEntry(name=d.name, title=d.title, description=d.description, level=d.level)
                for d in site.catalog.datasets.values()]

    @app.get("/levels", response_model=dict[str, LevelRule])
    def levels() -> dict[str, LevelRule]:
        """The site's privacy levels: who must approve an application, and what a release may be."""
        return site.catalog.levels

    @app.post("/applications", response_model=ApplicationInfo, status_code=201)
    def apply(body: ApplicationRequest, who: Principal = Depends(principal)) -> ApplicationInfo:
        """Apply for access for your project; L1 datasets are approved at once, others await review."""
        return site.apply(who, body)

    @app.get("/applications", response_model=list[ApplicationInfo])
    def applications(status: Literal["pending", "approved", "rejected", "withdrawn"] | None = None,
                     who: Principal = Depends(principal)) -> list[ApplicationInfo]:
        """Applications, newest first: your project's, or all of them for stewards."""
        return site.applications(who, status)

    @app.get("/applications/{application_id}", response_model=ApplicationInfo)
    def application(application_id: Id, who: Principal = Depends(principal)) -> ApplicationInfo:
        return site.application(who, application_id)

    @app.put("/applications/{application_id}", response_model=ApplicationInfo)
    def amend(application_id: Id, body: ApplicationRequest, who: Principal = Depends(principal)) -> ApplicationInfo:
        """Change your application: it becomes a new version that needs a new review."""
        return site.amend(who, application_id, body)

    @app.post("/applications/{application_id}/withdraw", response_model=ApplicationInfo)
    def withdraw(application_id: Id, who: Principal = Depends(principal)) -> ApplicationInfo:
        return site.withdraw(who, application_id)

    @app.post("/applications/{application_id}/reviews", response_model=ApplicationInfo)
    def review(application_id: Id, body: ReviewRequest, who: Principal = Depends(principal)) -> ApplicationInfo:
        """A steward approves or rejects the version they read, with a comment."""
        return site.review(who, application_id, body)

    @app.post("/grants/{grant_id}/revoke", response_model=GrantInfo)
    def revoke(grant_id: Id, body: RevokeRequest, who: Principal = Depends(principal)) -> GrantInfo:
        return site.revoke_grant(who, grant_id, body.reason)

    @app.get("/budgets", response_model=list[DatasetBudget])
    def budgets(who: Principal = Depends(principal)) -> list[DatasetBudget]:
        """Per dataset: lifetime cap, spent, remaining, and each project's grant (stewards)."""
        return site.budgets(who)

    @app.put("/budgets/{dataset}/cap", response_model=DatasetBudget)
    def cap(dataset: str, body: CapRequest, who: Principal = Depends(principal)) -> DatasetBudget:
        return site.set_cap(who, dataset, body.epsilon, body.reason)

    @app.get("/audit", response_model=list[AuditEntry])
    def audit_log(since: int = Query(0, ge=0, le=limits.MAX_ID), limit: int = Query(1000, ge=1, le=10_000),
                  who: Principal = Depends(principal)) -> list[AuditEntry]:
        """Audit entries after sequence number `since` (stewards)."""
        return site.audit_log(who, since, limit)

    @app.get("/audit/verify", response_model=AuditVerification)
    def audit_verify(who: Principal = Depends(principal)) -> AuditVerification:
        """Walk the hash chain and compare the ledger with it (stewards)."""
        return site.verify(who)

    @app.get("/receipts/{receipt}", response_model=AuditEntry)
    def receipt(receipt: str, who: Principal = Depends(principal)) -> AuditEntry:
        """The audit entry a receipt points to."""
        return site.receipt(who, receipt)

    return app


def app_from_environment() -> FastAPI:
    """The app for a worker process of `veil executor serve --workers N` (site named by the environment)."""
    return create_app(Site.open(os.environ[SITE_CONFIG_ENV], os.environ.get(DATABASE_URL_ENV)))
