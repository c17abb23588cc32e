"""An open dataset's DP statistics sheet: published by a steward, downloaded by any token on the site."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from veil.executor import sheets
from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import PublishRequest, StatisticsSheet

router = APIRouter()


@router.post("/datasets/{name}/sheet", response_model=StatisticsSheet, status_code=201)
def publish(name: str, body: PublishRequest, request: Request, who: Principal = Depends(principal),
            site: Site = Depends(site_of)) -> StatisticsSheet:
    """Publish the open dataset's DP statistics sheet (stewards): charged to its lifetime cap and audited."""
    request.state.context = {"dataset": name}
    return site.publish_sheet(who, name, body)


@router.get("/datasets/{name}/sheet", response_model=StatisticsSheet,
            responses={200: {"content": {"text/markdown": {}}}})
def sheet(name: str, request: Request, format: Literal["json", "markdown"] = "json",
          _: Principal = Depends(principal), site: Site = Depends(site_of)) -> StatisticsSheet | PlainTextResponse:
    """The open dataset's published DP statistics sheet, as JSON or (`?format=markdown`) Markdown: any token."""
    request.state.context = {"dataset": name}
    found = site.sheet(name)
    if format == "markdown":
        return PlainTextResponse(sheets.markdown(found), media_type="text/markdown")
    return found
