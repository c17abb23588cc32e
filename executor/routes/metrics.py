"""Prometheus metrics, for the site's IT: requests, releases, refusals and the budget spent per dataset.

Who may read them: a steward's or an admin's token, or the scraper's own secret (VEIL_METRICS_TOKEN) that
opens nothing else. A researcher may not: spending per dataset sums up what other projects did.
"""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from veil import __version__
from veil.errors import AuthError
from veil.executor.auth import Principal, require
from veil.executor.observability import CONTENT_TYPE, METRICS_TOKEN_ENV, exposition
from veil.executor.routes.deps import site_of
from veil.executor.site import Site

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, site: Site = Depends(site_of)) -> Response:
    """The executor's metrics in Prometheus' text exposition format."""
    identity = request.state.identity
    if not _scraper(request.headers.get("authorization")):
        if isinstance(identity, AuthError):
            raise identity
        assert isinstance(identity, Principal)
        require(identity, "steward", "admin")
    body = await run_in_threadpool(exposition, site.engine, site.catalog.site, __version__)
    return Response(body, media_type=CONTENT_TYPE)


def _scraper(authorization: str | None) -> bool:
    """Whether the request carries the scraper's secret (VEIL_METRICS_TOKEN), compared in constant time."""
    secret = os.environ.get(METRICS_TOKEN_ENV, "")
    if len(secret) < 16 or not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization.removeprefix("Bearer ").strip().encode(), secret.encode())
