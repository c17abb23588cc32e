"""The audit log (stewards), its verification, and the entry a receipt points to."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import PlainTextResponse

from veil import limits
from veil.executor.audit import MAX_FIELD_CHARS
from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import AuditEntry, AuditVerification

router = APIRouter()


Since = Annotated[int, Query(ge=0, le=limits.MAX_ID, description="only entries after this seq")]
Filter = Annotated[str | None, Query(min_length=1, max_length=MAX_FIELD_CHARS, description="exact match")]


@router.get("/audit", response_model=list[AuditEntry])
def audit_log(response: Response, since: Since = 0, limit: int = Query(100, ge=1, le=1000),
              before: int | None = Query(None, ge=1, le=limits.MAX_ID,
                                         description="only entries before this seq: the last seq of the previous page"),
              project: Filter = None, dataset: Filter = None, action: Filter = None, decision: Filter = None,
              who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[AuditEntry]:
    """Audit entries, newest first, `limit` a page, paged back with `before`; filtered by project, dataset,
    action and decision (stewards). The X-Total-Count header says how many entries after `since` match."""
    found, total = site.audit_page(who, limit=limit, before=before, since=since, project=project, dataset=dataset,
                                   action=action, decision=decision)
    response.headers["X-Total-Count"] = str(total)
    return found


@router.get("/audit/export", response_class=PlainTextResponse)
def audit_export(fmt: Literal["jsonl", "csv"] = Query("jsonl", alias="format"), since: Since = 0,
                 project: Filter = None, dataset: Filter = None, action: Filter = None, decision: Filter = None,
                 who: Principal = Depends(principal), site: Site = Depends(site_of)) -> PlainTextResponse:
    """Every entry matching the filters, oldest first, as JSON lines or CSV (stewards)."""
    text = site.audit_export(who, fmt, since=since, project=project, dataset=dataset, action=action,
                             decision=decision)
    media = "application/x-ndjson" if fmt == "jsonl" else "text/csv"
    disposition = f'attachment; filename="{site.catalog.site}-audit.{fmt}"'
    return PlainTextResponse(text, media_type=media, headers={"Content-Disposition": disposition})


@router.get("/audit/verify", response_model=AuditVerification)
def audit_verify(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> AuditVerification:
    """Walk the hash chain and compare the ledger with it (stewards)."""
    return site.verify(who)


@router.get("/receipts/{receipt}", response_model=AuditEntry)
def receipt(receipt: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> AuditEntry:
    """The audit entry a receipt points to."""
    return site.receipt(who, receipt)
