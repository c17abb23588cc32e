"""Health and the datasets a token may use."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from veil import __version__
from veil.executor.auth import Principal
from veil.executor.observability import refused
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.executor.store import reachable
from veil.wire import DatasetInfo, Health, Refusal

router = APIRouter()
log = logging.getLogger("veil.executor")


@router.get("/health", response_model=Health)
def health(request: Request, site: Site = Depends(site_of)) -> Health | JSONResponse:
    """Whether this executor can answer: it is up and its state database answers (else 503): one row
    read, as cheap as `SELECT 1`, from the server or (SQLite) the file as it is now."""
    if not reachable(site.engine):
        log.error("health: the state database does not answer")
        refused(request.state, "database_unreachable")  # not audited: the audit log is in that database
        refusal = Refusal(code="database_unreachable", message="the executor cannot reach its state database",
                          hint="the site's administrators should check the database server and its URL")
        return JSONResponse(refusal.model_dump(), status_code=503)
    return Health(status="ok", site=site.catalog.site, version=__version__, datasets=len(site.catalog.datasets))


@router.get("/datasets", response_model=list[DatasetInfo])
def datasets(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[DatasetInfo]:
    """The datasets you may use, with schema and public metadata (never rows)."""
    return site.datasets(who)


@router.get("/datasets/{name}", response_model=DatasetInfo)
def dataset(name: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> DatasetInfo:
    return site.dataset_info(who, name)
