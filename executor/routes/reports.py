"""Usage and value reports: what the site's data gave each project over a period, and what it cost."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.names import NAME_PATTERN
from veil.usage import UsageReport

router = APIRouter()

Named = Annotated[str | None, Query(pattern=NAME_PATTERN)]
Day = Annotated[str | None, Query(max_length=40, description="YYYY-MM-DD or an ISO date-time (UTC)")]


@router.get("/report", response_model=UsageReport)
def report(since: Day = None, until: Day = None, dataset: Named = None, project: Named = None,
           who: Principal = Depends(principal), site: Site = Depends(site_of)) -> UsageReport:
    """Per dataset and project over [since, until) (until defaults to now): applications and approvals,
    releases with their receipts and cost, models trained, federated rounds, refusals, budgets left and the
    cumulative epsilon spent. Stewards and admins see every project; a researcher their own."""
    return site.report(who, since, until, dataset, project)
