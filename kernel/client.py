"""A minimal HTTP client for one site executor (researcher side: it never sees raw rows).

The kernel and SDK build on it for researchers; `veil steward` uses it with a steward's token.
"""

from __future__ import annotations

from typing import Any

import httpx

from veil.kernel.errors import VeilSiteUnavailable, refusal_error
from veil.usage import UsageReport
from veil.wire import (
    ApplicationInfo,
    ApplicationRequest,
    AuditEntry,
    AuditVerification,
    Cancellation,
    CapRequest,
    CatalogEntry,
    DatasetBudget,
    DatasetInfo,
    DatasetState,
    DirectGrantRequest,
    GrantInfo,
    Health,
    JobInfo,
    MockInfo,
    MockRequest,
    PublishRequest,
    QueryRequest,
    QuerySpec,
    Refusal,
    Release,
    ReviewRequest,
    RevokeRequest,
    StandingInfo,
    StandingWindow,
    StatisticsSheet,
    TrainingCheck,
    TrainRequest,
    TransitionInfo,
    TransitionRequest,
    TransitionReview,
    WhoAmI,
)


class SiteClient:
    """Talks to one executor with one researcher or steward token."""

    def __init__(self, name: str, url: str, token: str | None, timeout: float = 120.0) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.name, self.url, self.timeout = name, url, timeout
        self._http = httpx.Client(base_url=url, headers=self._headers, timeout=timeout)
        self._async: httpx.AsyncClient | None = None  # made on the event loop that uses it (`kernel.inflight`)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SiteClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise VeilSiteUnavailable(self.name, self.url, exc) from exc
        return self._checked(response)

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise refusal_error(self.name, response.status_code, Refusal.model_validate(response.json()))
        return response

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

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

    async def query_async(self, request: QueryRequest) -> Release:
        """`query` on an event loop (always the same one: `veil.kernel.inflight`'s), so that it can be cancelled:
        cancelling closes the connection, and a site charges nothing for a request whose client went away."""
        if self._async is None:
            self._async = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout)
        try:
            response = await self._async.post("/query", json=request.model_dump(exclude_none=True))
        except httpx.TransportError as exc:
            raise VeilSiteUnavailable(self.name, self.url, exc) from exc
        return Release.model_validate(self._checked(response).json())

    def cancel(self, request_id: str, timeout: float) -> Cancellation:
        """Cancel a query by its request_id: the site says nothing was charged, or returns the release it made."""
        return Cancellation.model_validate(self._call("POST", f"/query/{request_id}/cancel", timeout=timeout))

    # ---------------------------------------------------------- applications (researchers)

    def catalog(self) -> list[CatalogEntry]:
        return [CatalogEntry.model_validate(e) for e in self._call("GET", "/catalog")]


    def apply(self, request: ApplicationRequest) -> ApplicationInfo:
        return ApplicationInfo.model_validate(self._call("POST", "/applications", json=request.model_dump(mode="json")))

    def amend(self, application_id: int, request: ApplicationRequest) -> ApplicationInfo:
        return ApplicationInfo.model_validate(
            self._call("PUT", f"/applications/{application_id}", json=request.model_dump(mode="json")))

    def withdraw(self, application_id: int) -> ApplicationInfo:
        return ApplicationInfo.model_validate(self._call("POST", f"/applications/{application_id}/withdraw"))

    def applications(self, status: str | None = None) -> list[ApplicationInfo]:
        params = {"status": status} if status else {}
        return [ApplicationInfo.model_validate(a) for a in self._call("GET", "/applications", params=params)]

    def application(self, application_id: int) -> ApplicationInfo:
        return ApplicationInfo.model_validate(self._call("GET", f"/applications/{application_id}"))

    def standing_queries(self) -> list[StandingInfo]:
        return [StandingInfo.model_validate(s) for s in self._call("GET", "/standing")]

    def standing_windows(self, standing_id: int, after: int = -1) -> list[StandingWindow]:
        return [StandingWindow.model_validate(w)
                for w in self._call("GET", f"/standing/{standing_id}/windows", params={"after": after})]

    def mock(self, dataset: str) -> MockInfo:
        return MockInfo.model_validate(self._call("GET", f"/datasets/{dataset}/mock"))

    # ---------------------------------------------------------- stewardship

    def review(self, application_id: int, decision: ReviewRequest) -> ApplicationInfo:
        return ApplicationInfo.model_validate(
            self._call("POST", f"/applications/{application_id}/reviews", json=decision.model_dump()))

    def grant_directly(self, request: DirectGrantRequest) -> ApplicationInfo:
        """Give a project a grant on a review made outside Veil (recorded as an application you approved)."""
        return ApplicationInfo.model_validate(self._call("POST", "/grants", json=request.model_dump()))

    def revoke_grant(self, grant_id: int, reason: str) -> GrantInfo:
        body = RevokeRequest(reason=reason).model_dump()
        return GrantInfo.model_validate(self._call("POST", f"/grants/{grant_id}/revoke", json=body))

    def budgets(self) -> list[DatasetBudget]:
        return [DatasetBudget.model_validate(b) for b in self._call("GET", "/budgets")]

    def set_cap(self, dataset: str, epsilon: float, reason: str = "") -> DatasetBudget:
        body = CapRequest(epsilon=epsilon, reason=reason).model_dump()
        return DatasetBudget.model_validate(self._call("PUT", f"/budgets/{dataset}/cap", json=body))

    def dataset_state(self, dataset: str) -> DatasetState:
        return DatasetState.model_validate(self._call("GET", f"/datasets/{dataset}/state"))

    def request_transition(self, dataset: str, to: str, reason: str) -> TransitionInfo:
        body = TransitionRequest(to=to, reason=reason).model_dump()  # type: ignore[arg-type]
        return TransitionInfo.model_validate(self._call("POST", f"/datasets/{dataset}/transitions", json=body))

    def transitions(self, status: str = "pending") -> list[TransitionInfo]:
        """Dataset requests: "pending", "done", "rejected" or "all"."""
        return [TransitionInfo.model_validate(t)
                for t in self._call("GET", "/dataset-transitions", params={"status": status})]

    def review_transition(self, transition_id: int, decision: str, comment: str) -> TransitionInfo:
        body = TransitionReview(decision=decision, comment=comment).model_dump()  # type: ignore[arg-type]
        return TransitionInfo.model_validate(
            self._call("POST", f"/dataset-transitions/{transition_id}/reviews", json=body))

    def set_mock(self, dataset: str, request: MockRequest) -> MockInfo:
        return MockInfo.model_validate(
            self._call("PUT", f"/datasets/{dataset}/mock", json=request.model_dump(exclude_none=True)))

    def publish_sheet(self, dataset: str, epsilon: float) -> StatisticsSheet:
        """Publish an open dataset's DP statistics sheet (stewards; charged to its lifetime cap)."""
        body = PublishRequest(epsilon=epsilon).model_dump()
        return StatisticsSheet.model_validate(self._call("POST", f"/datasets/{dataset}/sheet", json=body))

    def sheet(self, dataset: str) -> StatisticsSheet:
        """An open dataset's published DP statistics sheet (any token)."""
        return StatisticsSheet.model_validate(self._call("GET", f"/datasets/{dataset}/sheet"))

    def sheet_markdown(self, dataset: str) -> str:
        """The same sheet as a Markdown document."""
        return self._send("GET", f"/datasets/{dataset}/sheet", params={"format": "markdown"}).text



    def audit(self, since: int = 0, limit: int = 100, before: int | None = None, *, project: str | None = None,
              dataset: str | None = None, action: str | None = None, decision: str | None = None) -> list[AuditEntry]:
        """The site's audit log, newest first: up to `limit` entries after `since` and before `before`, filtered by
        project, dataset, action and decision (stewards)."""
        return self.audit_page(since, limit, before, project=project, dataset=dataset, action=action,
                               decision=decision)[0]

    def audit_page(self, since: int = 0, limit: int = 100, before: int | None = None, *, project: str | None = None,
                   dataset: str | None = None, action: str | None = None, decision: str | None = None
                   ) -> tuple[list[AuditEntry], int]:
        """(a page of the audit log, newest first; how many entries match the filters in all) (stewards)."""
        params = {"since": since, "limit": limit, "before": before, "project": project, "dataset": dataset,
                  "action": action, "decision": decision}
        response = self._send("GET", "/audit", params={k: v for k, v in params.items() if v is not None})
        return [AuditEntry.model_validate(e) for e in response.json()], int(response.headers["X-Total-Count"])

    def audit_export(self, fmt: str = "jsonl", since: int = 0, *, project: str | None = None,
                     dataset: str | None = None, action: str | None = None, decision: str | None = None) -> str:
        """Every entry matching the filters, oldest first, as JSON lines (`jsonl`) or CSV (`csv`) (stewards)."""
        params = {"format": fmt, "since": since, "project": project, "dataset": dataset, "action": action,
                  "decision": decision}
        return self._send("GET", "/audit/export", params={k: v for k, v in params.items() if v is not None}).text

    def report(self, since: str | None = None, until: str | None = None, *, dataset: str | None = None,
               project: str | None = None) -> UsageReport:
        """Usage and value over [since, until) (dates YYYY-MM-DD, until excluded): a researcher's own project,
        or any project for stewards."""
        params = {"since": since, "until": until, "dataset": dataset, "project": project}
        return UsageReport.model_validate(self._call("GET", "/report", params={k: v for k, v in params.items()
                                                                              if v is not None}))

    def verify_audit(self) -> AuditVerification:
        """The site's check of its audit chain against its ledger (stewards)."""
        return AuditVerification.model_validate(self._call("GET", "/audit/verify"))

    # ---------------------------------------------------------- training

    def train(self, request: TrainRequest) -> JobInfo:
        return JobInfo.model_validate(self._call("POST", "/jobs", json=request.model_dump(mode="json")))

    def check_training(self, request: TrainRequest) -> TrainingCheck:
        """Whether the site would accept `request` now; nothing is reserved or read (VeilError if not)."""
        return TrainingCheck.model_validate(self._call("POST", "/job-checks", json=request.model_dump(mode="json")))

    def job(self, job_id: int) -> JobInfo:
        return JobInfo.model_validate(self._call("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: int) -> JobInfo:
        return JobInfo.model_validate(self._call("POST", f"/jobs/{job_id}/cancel"))

    def job_round(self, job_id: int, content: bytes) -> bytes:
        """One federated round: a Flower message's content (protobuf) in, the site's reply content out. A round
        trains for as long as the site allows (its own time limit applies), so no read timeout here."""
        return self._send("POST", f"/jobs/{job_id}/round", content=content,
                          headers={"Content-Type": "application/x-protobuf"},
                          timeout=httpx.Timeout(None, connect=10.0)).content

    def finish_job(self, job_id: int, weights: bytes | None) -> JobInfo:
        """End a federated part: the final global weights (safetensors) for the site's DP evaluation."""
        return JobInfo.model_validate(self._call("POST", f"/jobs/{job_id}/finish", content=weights or b"",
                                                 headers={"Content-Type": "application/octet-stream"}))

    def job_weights(self, job_id: int) -> bytes:
        """The trained weights, as safetensors bytes."""
        return self._send("GET", f"/jobs/{job_id}/weights").content
