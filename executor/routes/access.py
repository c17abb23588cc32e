"""Who a token acts for, and the grants its project holds."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import GrantInfo, WhoAmI

router = APIRouter()


@router.get("/whoami", response_model=WhoAmI)
def whoami(who: Principal = Depends(principal)) -> WhoAmI:
    """Who this token acts for: the researcher kernel checks it holds researcher tokens only."""
    return WhoAmI(principal=who.name, role=who.role, project=who.project, office=who.office)


@router.get("/grants", response_model=list[GrantInfo])
def grants(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[GrantInfo]:
    """Your project's grants (a steward sees all) with what is spent and what remains."""
    return site.grants(who)
