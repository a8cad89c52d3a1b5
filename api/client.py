"""A small HTTP client for the moe-unlearn API (used by the CLI, the demo and the tests).

    c = Client("http://127.0.0.1:8000", api_key="mu_...")
    cid = c.upload_corpus(Path("forget.jsonl").read_bytes())["id"]
    job = c.submit({"forget": {"corpus_id": cid}, "algorithm": "npo"})
    job = c.wait(job["id"])
    c.download(job["id"], c.artifacts(job["id"])[0]["id"], Path("patch.safetensors"))

Any `httpx.Client` can be passed as `http` (FastAPI's TestClient is one), so the same
class drives an in-process app and a live server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


class ApiClientError(Exception):
    """A non-2xx answer; `body` is the decoded error body (see api.errors.ErrorBody)."""

    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.body = body


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._own = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.headers: dict[str, str] = {}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------
    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        r = self.http.request(method, url, headers=headers, **kw)
        if r.status_code >= 400:
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text
            raise ApiClientError(r.status_code, body)
        return r

    def _json(self, method: str, url: str, **kw: Any) -> Any:
        return self._request(method, url, **kw).json()

    # -- corpora and jobs -----------------------------------------------------------
    def upload_corpus(self, data: bytes, *, format: str = "auto") -> dict[str, Any]:
        """Upload a forget/retain corpus; returns {id, size, records}."""
        ctype = "text/plain" if format == "text" else "application/x-ndjson"
        return self._json(
            "POST",
            "/v1/corpora",
            content=data,
            params={"format": format},
            headers={"Content-Type": ctype},
        )

    def submit(self, spec: Any, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job spec (a dict or a workers.spec.JobSpec); returns the job."""
        body = spec.resolved() if hasattr(spec, "resolved") else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, state: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        params = {k: v for k, v in (("state", state), ("limit", limit), ("cursor", cursor)) if v}
        return self._json("GET", "/v1/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, since: int | None = None) -> dict[str, Any]:
        params = {"since": since} if since is not None else {}
        return self._json("GET", f"/v1/jobs/{job_id}/events", params=params)

    def stream_events(self, job_id: str, *, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Server-sent events of a job; the stream ends when the job is terminal."""
        params = {"since": since} if since is not None else {}
        headers = {**self.headers, "Accept": "text/event-stream"}
        with self.http.stream(
            "GET", f"/v1/jobs/{job_id}/events", params=params, headers=headers
        ) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiClientError(r.status_code, r.json())
            for line in r.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:].strip())

    def wait(self, job_id: str, *, timeout: float = 600.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED; returns the final job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(interval)

    def expert_map(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/expert-map")

    def evaluations(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/evaluations")

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["items"]

    def download(self, job_id: str, artifact_id: str | int, dest: Path) -> Path:
        """Stream one artifact to `dest`; returns `dest`."""
        headers = dict(self.headers)
        with self.http.stream(
            "GET", f"/v1/jobs/{job_id}/artifacts/{artifact_id}", headers=headers
        ) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiClientError(r.status_code, r.json())
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        return dest

    def certificate(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/certificate")

    # -- audit and keys -------------------------------------------------------------
    def audit_events(self, *, cursor: str | None = None, limit: int | None = None) -> Any:
        params = {k: v for k, v in (("cursor", cursor), ("limit", limit)) if v}
        return self._json("GET", "/v1/audit/events", params=params)

    def audit_verify(self) -> dict[str, Any]:
        return self._json("GET", "/v1/audit/verify")

    def create_key(self, role: str, tenant: str) -> dict[str, Any]:
        return self._json("POST", "/v1/keys", json={"role": role, "tenant": tenant})
