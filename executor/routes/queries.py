"""DP queries: one release per request."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request

from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import QueryRequest, Release

router = APIRouter()


@router.post("/query", response_model=Release)
def query(body: QueryRequest, request: Request, who: Principal = Depends(principal),
          site: Site = Depends(site_of)) -> Release:
    """Run one DP query (SQL or JSON spec); the release carries intervals, cost and receipt."""
    spec = body.spec  # exactly one of spec and sql (QueryRequest checks)
    request.state.context = {
        "dataset": spec.dataset if spec else None,
        "query": (json.dumps(spec.model_dump(), sort_keys=True) if spec else body.sql or "")[:4000],
    }
    return site.query(who, body)
