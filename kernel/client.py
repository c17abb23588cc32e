"""A minimal HTTP client for one site executor (researcher side: it never sees raw rows).

The kernel and SDK of issue [2/6] build on this; the demo and the tests use it directly.
"""

from __future__ import annotations

from typing import Any

import httpx

from veil.kernel.errors import VeilSiteUnavailable, refusal_error
from veil.wire import (
    AuditEntry,
    DatasetInfo,
    GrantInfo,
    Health,
    QueryRequest,
    QuerySpec,
    Refusal,
    Release,
    WhoAmI,
)


class SiteClient:
    """Talks to one executor with one researcher or steward token."""

    def __init__(self, name: str, url: str, token: str | None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.name = name
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise VeilSiteUnavailable(self.name, str(self._http.base_url), exc) from exc
        if response.status_code >= 400:
            raise refusal_error(self.name, response.status_code, Refusal.model_validate(response.json()))
        return response.json()

    def receipt(self, receipt: str) -> AuditEntry:
        return AuditEntry.model_validate(self._call("GET", f"/receipts/{receipt}"))

    def health(self) -> Health:
        return Health.model_validate(self._call("GET", "/health"))

    def whoami(self) -> WhoAmI:
        return WhoAmI.model_validate(self._call("GET", "/whoami"))

    def datasets(self) -> list[DatasetInfo]:
        return [DatasetInfo.model_validate(d) for d in self._call("GET", "/datasets")]

    def grants(self) -> list[GrantInfo]:
        return [GrantInfo.model_validate(g) for g in self._call("GET", "/grants")]

    def query(self, sql: str | None = None, spec: QuerySpec | None = None, **loss: Any) -> Release:
        """Run one DP query; `loss` is epsilon= or rho=, optionally delta= and confidence=."""
        request = QueryRequest(sql=sql, spec=spec, **loss)
        return Release.model_validate(self._call("POST", "/query", json=request.model_dump(exclude_none=True)))
