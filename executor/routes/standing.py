"""Standing DP counts: each released once per window; their project reads them, a steward may stop one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from veil import limits
from veil.executor.auth import Principal
from veil.executor.routes.deps import Id, principal, site_of
from veil.executor.site import Site
from veil.wire import RevokeRequest, StandingInfo, StandingWindow

router = APIRouter()


@router.get("/standing", response_model=list[StandingInfo])
def standing_queries(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[StandingInfo]:
    """Standing queries, oldest first: the caller's project's (stewards: all), with their next release."""
    return site.standing_queries(who)


@router.get("/standing/{standing_id}", response_model=StandingInfo)
def standing_query(standing_id: Id, who: Principal = Depends(principal), site: Site = Depends(site_of)
                   ) -> StandingInfo:
    """One standing query (another project's is unknown)."""
    return site.standing_query(who, standing_id)


@router.get("/standing/{standing_id}/windows", response_model=list[StandingWindow])
def standing_windows(standing_id: Id, after: Annotated[int, Query(ge=-1, le=limits.MAX_ID)] = -1,
                     who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[StandingWindow]:
    """Its released windows numbered above `after` (all by default), oldest first."""
    return site.standing_windows(who, standing_id, after)


@router.post("/standing/{standing_id}/stop", response_model=StandingInfo)
def stop(standing_id: Id, body: RevokeRequest, who: Principal = Depends(principal),
         site: Site = Depends(site_of)) -> StandingInfo:
    """A steward stops it: no later window is released; nothing is refunded (it was charged up front)."""
    return site.stop_standing(who, standing_id, body.reason)
