"""Health and the datasets a token may use."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from veil import __version__
from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import DatasetInfo, Health

router = APIRouter()


@router.get("/health", response_model=Health)
def health(site: Site = Depends(site_of)) -> Health:
    return Health(status="ok", site=site.catalog.site, version=__version__, datasets=len(site.catalog.datasets))


@router.get("/datasets", response_model=list[DatasetInfo])
def datasets(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[DatasetInfo]:
    """The datasets you may use, with schema and public metadata (never rows)."""
    return site.datasets(who)


@router.get("/datasets/{name}", response_model=DatasetInfo)
def dataset(name: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> DatasetInfo:
    return site.dataset_for(who, name).info()
