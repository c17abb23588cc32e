"""DP queries: one release per request, charged only while its client still wants it."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from veil.executor.auth import Principal
from veil.executor.cancellation import Ticket
from veil.executor.observability import released
from veil.executor.routes.deps import RequestId, principal, site_of
from veil.executor.site import Site
from veil.wire import Cancellation, QueryRequest, Release

router = APIRouter()


@router.post("/query", response_model=Release)
async def query(body: QueryRequest, request: Request, who: Principal = Depends(principal),
                site: Site = Depends(site_of)) -> Release:
    """Run one DP query (SQL or JSON spec); the release carries intervals, cost and receipt. A client that
    goes away before the release is charged cancels it: nothing is charged."""
    spec = body.spec  # exactly one of spec and sql (QueryRequest checks)
    request.state.context = {
        "dataset": spec.dataset if spec else None,
        "query": (json.dumps(spec.model_dump(), sort_keys=True) if spec else body.sql or "")[:4000],
    }
    ticket = await run_in_threadpool(site.begin_query, who, body)
    watch = asyncio.create_task(_cancel_when_gone(request, ticket))
    retry = ticket.release is not None  # the same release again, charged once: counted once
    try:
        release = await run_in_threadpool(site.query, who, body, ticket)
    finally:
        watch.cancel()
    if not retry:
        released(release.dataset, release.cost.rho)
    return release


@router.post("/query/{request_id}/cancel", response_model=Cancellation)
def cancel(request_id: RequestId, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> Cancellation:
    """Cancel your project's query by its request_id: nothing is charged, or (when it was already charged) the
    release is in the answer. A query not seen yet is refused when it arrives."""
    return site.cancel_query(who, request_id)


async def _cancel_when_gone(request: Request, ticket: Ticket) -> None:
    """Cancel the ticket when the client disconnects (its body is read already: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    await run_in_threadpool(ticket.cancel)
