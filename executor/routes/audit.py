"""The audit log (stewards), its verification, and the entry a receipt points to."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from veil import limits
from veil.executor.auth import Principal
from veil.executor.routes.deps import principal, site_of
from veil.executor.site import Site
from veil.wire import AuditEntry, AuditVerification

router = APIRouter()


@router.get("/audit", response_model=list[AuditEntry])
def audit_log(since: int = Query(0, ge=0, le=limits.MAX_ID), limit: int = Query(1000, ge=1, le=10_000),
              who: Principal = Depends(principal), site: Site = Depends(site_of)) -> list[AuditEntry]:
    """Audit entries after sequence number `since` (stewards)."""
    return site.audit_log(who, since, limit)


@router.get("/audit/verify", response_model=AuditVerification)
def audit_verify(who: Principal = Depends(principal), site: Site = Depends(site_of)) -> AuditVerification:
    """Walk the hash chain and compare the ledger with it (stewards)."""
    return site.verify(who)


@router.get("/receipts/{receipt}", response_model=AuditEntry)
def receipt(receipt: str, who: Principal = Depends(principal), site: Site = Depends(site_of)) -> AuditEntry:
    """The audit entry a receipt points to."""
    return site.receipt(who, receipt)
