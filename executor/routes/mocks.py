"""A dataset's mock for mock mode: read it, or (stewards) choose it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import MockInfo, MockRequest

router = APIRouter()


@router.get("/datasets/{name}/mock", response_model=MockInfo)
def mock(name: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> MockInfo:
    """The dataset's mock for mock mode: schema-only (made by the kernel) or the steward's DP synthetic rows."""
    return site.mock(who, name)


@router.put("/datasets/{name}/mock", response_model=MockInfo)
def set_mock(name: str, body: MockRequest, request: Request, who: Principal = Depends(principal),
             site: Site = Depends(site_of)) -> MockInfo:
    """Choose the dataset's mock (stewards); DP synthetic rows are charged to its lifetime cap."""
    request.state.context = {"dataset": name}
    return site.set_mock(who, name, body)
