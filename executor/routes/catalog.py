"""The site's public catalog: every dataset one may apply for, and the privacy levels."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import CatalogEntry, LevelRule

router = APIRouter()


@router.get("/catalog", response_model=list[CatalogEntry])
def catalog(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[CatalogEntry]:
    """Every dataset's name, title and level: what you may apply for (schema comes with a grant)."""
    return [CatalogEntry(name=d.name, title=d.title, description=d.description, level=d.level)
            for d in site.catalog.datasets.values()]


@router.get("/levels", response_model=dict[str, LevelRule])
def levels(site: Site = Depends(site_of)) -> dict[str, LevelRule]:
    """The site's privacy levels: who must approve an application, and what a release may be."""
    return site.catalog.levels
