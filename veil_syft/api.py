"""A small client of the executor's HTTP API: only the routes the bridge needs, plain JSON."""

from __future__ import annotations

from typing import Any

import httpx


class Refused(Exception):
    """The executor's refusal (its JSON `Refusal`): code, message, hint and the audit receipt."""

    def __init__(self, code: str, message: str, hint: str | None = None, receipt: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.hint, self.receipt = code, message, hint, receipt


class ExecutorAPI:
    """The executor at `url`, called with one project's researcher token."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                raise Refused(f"http_{response.status_code}", response.text[:500]) from None
            raise Refused(str(body.get("code", f"http_{response.status_code}")), str(body.get("message", "")),
                          body.get("hint"), body.get("receipt"))
        return response.json()

    def whoami(self) -> Any:
        return self._answer(self.http.get("/whoami"))

    def datasets(self) -> Any:
        return self._answer(self.http.get("/datasets"))

    def mock(self, dataset: str) -> Any:
        return self._answer(self.http.get(f"/datasets/{dataset}/mock"))

    def query(self, body: dict[str, Any]) -> Any:
        """One DP release (POST /query); the same `request_id` again returns the same release, charged once."""
        return self._answer(self.http.post("/query", json=body))

    def apply(self, purpose: str, dataset: str, epsilon: float, uses: list[str], delta: float | None = None,
              duration_days: float = 30) -> Any:
        """File a Veil application for the project (POST /applications): the stewards review it by its level."""
        return self._answer(self.http.post("/applications", json={
            "purpose": purpose[:4000], "datasets": [dataset], "epsilon": epsilon, "uses": uses, "delta": delta,
            "duration_days": duration_days}))

    def default(self, schema: str, field: str) -> Any:
        """A request field's default as the executor's OpenAPI schema states it (the bridge imports no Veil code)."""
        schemas = self._answer(self.http.get("/openapi.json"))["components"]["schemas"]
        return schemas[schema]["properties"][field]["default"]

    def train(self, body: dict[str, Any]) -> Any:
        """Start a DP-SGD job (POST /jobs): its target is reserved now and settled to what the accountant spends."""
        return self._answer(self.http.post("/jobs", json=body))

    def job(self, job_id: int) -> Any:
        return self._answer(self.http.get(f"/jobs/{job_id}"))

    def jobs(self) -> Any:
        """The project's training jobs at the site, newest first."""
        return self._answer(self.http.get("/jobs"))

    def weights(self, job_id: int) -> bytes:
        """A finished job's DP-SGD weights (safetensors)."""
        response = self.http.get(f"/jobs/{job_id}/weights")
        if response.status_code >= 400:
            self._answer(response)
        return response.content

    def application(self, application_id: int) -> Any:
        return self._answer(self.http.get(f"/applications/{application_id}"))

    def record_refusal(self, job: str, submitter: str, code: str, message: str,
                       dataset: str | None = None) -> Any:
        """Write a job the bridge refused into the site's audit log (POST /bridge/refusals): its receipt."""
        body = {"source": "pysyft", "job": job, "submitter": submitter, "code": code,
                "message": " ".join(message.split())[:2000],
                "dataset": dataset}
        return self._answer(self.http.post("/bridge/refusals", json=body))
