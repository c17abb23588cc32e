"""The executor's HTTP API (FastAPI): every response is a release, a view of public facts, or a refusal.

Every refusal (bad input, auth, budget) is audited and answered as a `Refusal` with a receipt.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from veil import __version__
from veil.errors import VeilError, validation_problems
from veil.executor.auth import Principal, authenticate, identify
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
MAX_WEIGHTS_BYTES = 64 * 1024 * 1024
"""Federated rounds and a study's final model carry weights: their endpoints take up to this."""
WEIGHTS_PATHS = ("/round", "/finish")
SITE_CONFIG_ENV, DATABASE_URL_ENV = "VEIL_SITE_CONFIG", "VEIL_DATABASE_URL"
log = logging.getLogger("veil.executor")


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over `limit` bytes before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, weights_limit: int = MAX_WEIGHTS_BYTES) -> None:
        self.app, self.limit, self.weights_limit = app, limit, weights_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        limit = self.weights_limit if scope["path"].endswith(WEIGHTS_PATHS) else self.limit
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, send, limit)
        chunks, size, more = [], 0, True
        while more:  # read (at most limit + 1 bytes of) the body, then replay it
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._too_large(scope, send, limit)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, limit: int) -> None:
        error = VeilError("body_too_large", f"the request body exceeds {limit} bytes",
                          hint="send one query per request (a few hundred bytes), or a smaller model", status=413)
        site: Site = scope["app"].state.site
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1") or None
        who = await run_in_threadpool(identify, site.engine, authorization)
        receipt = await run_in_threadpool(site.refuse, who, scope["path"].strip("/") or "request", error)
        response = _refusal_response(error, receipt)
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _refusal_response(error: VeilError, receipt: str | None) -> JSONResponse:
    body = Refusal(code=error.code, message=error.message, hint=error.hint, receipt=receipt,
                   remaining=error.remaining)
    return JSONResponse(body.model_dump(), status_code=error.status)


def create_app(site: Site) -> FastAPI:
    """The executor app for one site."""
    app = FastAPI(
        title=f"Veil site executor: {site.catalog.title}",
        version=__version__,
        description="Answers only with differentially private releases, charged to a ledger and audited.",
    )
    app.state.site = site
    app.add_middleware(BodyLimit)

    def principal(request: Request, authorization: str | None = Header(default=None)) -> Principal:
        who = authenticate(site.engine, authorization)
        request.state.principal = who
        return who

    async def audited_refusal(request: Request, error: VeilError) -> JSONResponse:
        who = getattr(request.state, "principal", None)
        if who is None:  # refused before authentication (e.g. a body that is not JSON)
            who = await run_in_threadpool(identify, site.engine, request.headers.get("authorization"))
        context: dict[str, Any] = getattr(request.state, "context", {})
        receipt = await run_in_threadpool(site.refuse, who, request.url.path.strip("/").split("/")[0] or "request",
                                          error, context.get("dataset"), context.get("query"))
        return _refusal_response(error, receipt)

    @app.exception_handler(VeilError)
    async def _on_refusal(request: Request, exc: VeilError) -> JSONResponse:
        return await audited_refusal(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = VeilError("malformed_request", f"the request is not valid: {validation_problems(exc.errors())}",
                          hint="see the request schema at /openapi.json", status=422)
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

    @app.post("/query", response_model=Release, responses={400: {"model": Refusal}, 409: {"model": Refusal}})
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
    def job(job_id: int, who: Principal = Depends(principal)) -> JobInfo:
        """A job's state, progress (share of steps, epoch, epsilon spent so far) and, when done, its DP evaluation."""
        return site.job(who, job_id)

    @app.post("/jobs/{job_id}/cancel", response_model=JobInfo)
    def cancel_job(job_id: int, who: Principal = Depends(principal)) -> JobInfo:
        return site.cancel_job(who, job_id)

    @app.post("/jobs/{job_id}/round", response_class=Response,
              responses={200: {"content": {"application/x-protobuf": {}}}})
    async def job_round(job_id: int, request: Request, who: Principal = Depends(principal)) -> Response:
        """One round of a federated study: a Flower train message's content (protobuf RecordDict) in,
        the site's DP weights and public numbers out, in the same format."""
        body = await request.body()
        reply = await run_in_threadpool(site.train_round, who, job_id, body)
        return Response(reply, media_type="application/x-protobuf")

    @app.post("/jobs/{job_id}/finish", response_model=JobInfo)
    async def finish_job(job_id: int, request: Request, who: Principal = Depends(principal)) -> JobInfo:
        """End a site's part of a federated study: with the final weights (safetensors) as the body, a DP
        evaluation on held-out patients; the budget is settled to what the site's accountant spent."""
        body = await request.body()
        return await run_in_threadpool(site.finish_job, who, job_id, body or None)

    @app.get("/jobs/{job_id}/weights", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def job_weights(job_id: int, who: Principal = Depends(principal)) -> Response:
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
    def application(application_id: int, who: Principal = Depends(principal)) -> ApplicationInfo:
        return site.application(who, application_id)

    @app.put("/applications/{application_id}", response_model=ApplicationInfo)
    def amend(application_id: int, body: ApplicationRequest, who: Principal = Depends(principal)) -> ApplicationInfo:
        """Change your application: it becomes a new version that needs a new review."""
        return site.amend(who, application_id, body)

    @app.post("/applications/{application_id}/withdraw", response_model=ApplicationInfo)
    def withdraw(application_id: int, who: Principal = Depends(principal)) -> ApplicationInfo:
        return site.withdraw(who, application_id)

    @app.post("/applications/{application_id}/reviews", response_model=ApplicationInfo)
    def review(application_id: int, body: ReviewRequest, who: Principal = Depends(principal)) -> ApplicationInfo:
        """A steward approves or rejects the version they read, with a comment."""
        return site.review(who, application_id, body)

    @app.post("/grants/{grant_id}/revoke", response_model=GrantInfo)
    def revoke(grant_id: int, body: RevokeRequest, who: Principal = Depends(principal)) -> GrantInfo:
        return site.revoke_grant(who, grant_id, body.reason)

    @app.get("/budgets", response_model=list[DatasetBudget])
    def budgets(who: Principal = Depends(principal)) -> list[DatasetBudget]:
        """Per dataset: lifetime cap, spent, remaining, and each project's grant (stewards)."""
        return site.budgets(who)

    @app.put("/budgets/{dataset}/cap", response_model=DatasetBudget)
    def cap(dataset: str, body: CapRequest, who: Principal = Depends(principal)) -> DatasetBudget:
        return site.set_cap(who, dataset, body.epsilon, body.reason)

    @app.get("/audit", response_model=list[AuditEntry])
    def audit_log(since: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=10_000),
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
