"""Bridges beside the site (the PySyft bridge) record the jobs they refused, so the audit log has them too."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from veil.errors import VeilError
from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import BridgeRefusal, Refusal

router = APIRouter()


@router.post("/bridge/refusals", response_model=Refusal, status_code=201)
def bridge_refusal(body: BridgeRefusal, request: Request, who: Principal = Depends(principal),
                   site: Site = Depends(site_of)) -> Refusal:
    """Record a job the caller's bridge refused (any valid token; the entry names the caller): audited as a
    refusal with its receipt. Nothing is charged or released."""
    request.state.context = {"dataset": body.dataset}
    message = f"{body.source} job {body.job} from {body.submitter}: {body.message}"
    receipt = site.refuse(who, "bridge", VeilError(body.code, message), body.dataset, None)
    return Refusal(code=body.code, message=message, receipt=receipt)
