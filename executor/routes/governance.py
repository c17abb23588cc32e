"""Governance: applications and their reviews, revoking grants, and the datasets' lifetime budgets."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends

from veil.executor.auth import Principal
from veil.executor.routes.deps import Id, principal, site_of
from veil.executor.site import Site
from veil.wire import (
    ApplicationInfo,
    ApplicationRequest,
    CapRequest,
    DatasetBudget,
    DirectGrantRequest,
    GrantInfo,
    ReviewRequest,
    RevokeRequest,
)

router = APIRouter()


@router.post("/applications", response_model=ApplicationInfo, status_code=201)
def apply(body: ApplicationRequest, who: Principal = Depends(principal),
          site: Site = Depends(site_of)) -> ApplicationInfo:
    """Apply for access for your project; L1 datasets are approved at once, others await review."""
    return site.apply(who, body)


@router.get("/applications", response_model=list[ApplicationInfo])
def applications(status: Literal["pending", "approved", "rejected", "withdrawn"] | None = None,
                 who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[ApplicationInfo]:
    """Applications, newest first: your project's, or all of them for stewards."""
    return site.applications(who, status)


@router.get("/applications/{application_id}", response_model=ApplicationInfo)
def application(application_id: Id, who: Principal = Depends(principal),
                site: Site = Depends(site_of)) -> ApplicationInfo:
    return site.application(who, application_id)


@router.put("/applications/{application_id}", response_model=ApplicationInfo)
def amend(application_id: Id, body: ApplicationRequest, who: Principal = Depends(principal),
          site: Site = Depends(site_of)) -> ApplicationInfo:
    """Change your application: it becomes a new version that needs a new review."""
    return site.amend(who, application_id, body)


@router.post("/applications/{application_id}/withdraw", response_model=ApplicationInfo)
def withdraw(application_id: Id, who: Principal = Depends(principal),
             site: Site = Depends(site_of)) -> ApplicationInfo:
    return site.withdraw(who, application_id)


@router.post("/applications/{application_id}/reviews", response_model=ApplicationInfo)
def review(application_id: Id, body: ReviewRequest, who: Principal = Depends(principal),
           site: Site = Depends(site_of)) -> ApplicationInfo:
    """A steward approves or rejects the version they read, with a comment."""
    return site.review(who, application_id, body)


@router.post("/grants", response_model=ApplicationInfo, status_code=201)
def grant(body: DirectGrantRequest, who: Principal = Depends(principal), site: Site = Depends(site_of)
          ) -> ApplicationInfo:
    """Give a project a grant on a review made outside Veil (stewards): recorded and audited as an application
    the steward filed and approved, citing the review's reference."""
    return site.grant_directly(who, body)


@router.post("/grants/{grant_id}/revoke", response_model=GrantInfo)
def revoke(grant_id: Id, body: RevokeRequest, who: Principal = Depends(principal),
           site: Site = Depends(site_of)) -> GrantInfo:
    return site.revoke_grant(who, grant_id, body.reason)


@router.get("/budgets", response_model=list[DatasetBudget])
def budgets(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[DatasetBudget]:
    """Per dataset: lifetime cap, spent, remaining, and each project's grant (stewards)."""
    return site.budgets(who)


@router.put("/budgets/{dataset}/cap", response_model=DatasetBudget)
def cap(dataset: str, body: CapRequest, who: Principal = Depends(principal),
        site: Site = Depends(site_of)) -> DatasetBudget:
    return site.set_cap(who, dataset, body.epsilon, body.reason)
