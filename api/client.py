"""The Python client of the moe-unlearn HTTP API (the SDK; `moe-unlearn jobs|audit` use it).

    from api.client import Client, verify_certificate
    with Client("http://127.0.0.1:8000", api_key="mu_...") as c:
        sub = c.submit_with_corpora(spec, {"forget": Path("forget.jsonl")})
        job = c.follow(sub.job["id"])                       # server-sent events until it ends
        patch = c.download_kind(job["id"], "expert_patch", Path("out/patch.safetensors"))
        assert verify_certificate(c.certificate(job["id"]), patch=patch) == []

Every call retries on connection errors and on 429/502/503/504 with exponential backoff
(`RetryPolicy`); a submit always carries an `Idempotency-Key` (a fresh UUID unless given),
and its retries reuse it, so a retried submit never makes two jobs. Errors: `ApiClientError`
(the server answered 4xx/5xx; `.field` and `.reason` name what it refused),
`ServerUnreachable` (no answer after the retries), `IntegrityError` (a download whose bytes
do not match the server's SHA-256). A new endpoint is one method over `request_json`.

Any `httpx.Client` can be passed as `http` (FastAPI's TestClient is one), so the same class
drives an in-process app and a live server.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import httpx
from httpx_sse import SSEError, connect_sse

from workers.spec import canonical_json

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
URL_ENV, KEY_ENV = "MOE_UNLEARN_URL", "MOE_UNLEARN_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
STREAM_LIFETIME_OK_S = 10.0  # a stream closed after this long was ended by policy, not broken


class Job(TypedDict, total=False):
    """A job as the API returns it (api.schemas.JobOut)."""

    id: str
    tenant: str
    state: str  # QUEUED RUNNING CANCELLING RETRYING SUCCEEDED FAILED CANCELLED
    stage: str | None
    attempt: int
    spec: dict[str, Any]
    spec_hash: str
    cancel_requested: bool
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    failure_class: str | None
    failure_message: str | None


class Corpus(TypedDict):
    id: str  # SHA-256 of the bytes: the spec's corpus_id
    size: int
    records: int
    format: str


class Event(TypedDict, total=False):
    """A progress event; the stream's last one is {"kind": "end", "job_state", "next_since"}."""

    id: int
    attempt: int
    step: int
    kind: str
    payload: dict[str, Any]
    created_at: str
    job_state: str
    next_since: int


class Artifact(TypedDict):
    id: int
    kind: str  # expert_patch, expert_map, spec, result, model
    name: str
    sha256: str
    size: int
    created_at: str


class ClientError(Exception):
    """Base of the errors this client raises."""


class ApiClientError(ClientError):
    """The server answered with a non-2xx status; `body` is its decoded error body
    (api.errors.ErrorBody: {code, message, errors: [{field, in, reason}]})."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        errors = body.get("errors") if isinstance(body, dict) else None
        self.errors: list[dict[str, Any]] = errors if isinstance(errors, list) else []
        first = self.errors[0] if self.errors else {}
        self.field: str | None = first.get("field")
        self.reason: str | None = first.get("reason")
        msg = body.get("message") if isinstance(body, dict) else None
        if not msg and self.field:
            msg = f"{self.field}: {self.reason}"
        super().__init__(f"HTTP {status}: {msg or str(body)[:200]}")

    @property
    def server_side(self) -> bool:
        """True for 5xx (the server's fault, not the request's)."""
        return self.status >= 500


class ServerUnreachable(ClientError):
    """No HTTP answer (connection refused or dropped, timeout) after every retry."""


class IntegrityError(ClientError):
    """A download whose bytes do not hash to what the server (or certificate) says."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a call that got no answer or a 429/502/503/504.

    `attempts` counts every try (1 = no retry); the n-th retry waits
    min(backoff_s * 2**(n-1), max_backoff_s), or the server's Retry-After when it is
    shorter than max_wait_s."""

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_wait_s: float = 60.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_wait_s)
            except ValueError:
                pass  # an HTTP date: use our own backoff
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)


@dataclass
class SubmitResult:
    """What `submit_with_corpora` did: the job and, per corpus name, its id and whether
    this call uploaded it (False: the server already had it)."""

    job: Job
    corpora: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency_key: str = ""


def corpus_id(data: bytes) -> str:
    """The id the server gives these bytes (content addressed: their SHA-256)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Client:
    """One API key on one server. Thread-unsafe like the httpx.Client under it."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        if http is None:
            url = httpx.URL(base_url)  # a typo must not be retried as "unreachable"
            if url.scheme not in ("http", "https") or not url.host:
                raise ClientError(f"server {base_url!r} is not an http:// or https:// URL")
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise ClientError("the API key must be printable ASCII")
        self._own = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.retry = retry or RetryPolicy()
        self.headers: dict[str, str] = {}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_env(cls, server: str | None = None, api_key: str | None = None, **kw: Any) -> Client:
        """`server` / `api_key`, else $MOE_UNLEARN_URL / $MOE_UNLEARN_KEY, else loopback."""
        return cls(
            server or os.environ.get(URL_ENV) or DEFAULT_URL,
            api_key or os.environ.get(KEY_ENV),
            **kw,
        )

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------
    def _retrying(self, call: Callable[[], httpx.Response], what: str) -> httpx.Response:
        """`call()` until it answers with a status we do not retry (returned as is)."""
        for n in range(1, self.retry.attempts + 1):
            last = n == self.retry.attempts
            try:
                r = call()
            except httpx.TransportError as e:
                if last:
                    raise ServerUnreachable(
                        f"{what}: no answer from {self.http.base_url} after {n} tries "
                        f"({type(e).__name__}: {e})"
                    ) from e
                time.sleep(self.retry.delay(n))
                continue
            if r.status_code in self.retry.statuses and not last:
                r.close()
                time.sleep(self.retry.delay(n, r.headers.get("retry-after")))
                continue
            return r
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    @staticmethod
    def _raise_for(r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        r.read()
        try:
            body: Any = r.json()
        except ValueError:
            body = r.text
        raise ApiClientError(r.status_code, body)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call with retries; raises `ApiClientError` on 4xx/5xx."""
        headers = {**self.headers, **kw.pop("headers", {})}
        r = self._retrying(
            lambda: self.http.request(method, path, headers=headers, **kw), f"{method} {path}"
        )
        self._raise_for(r)
        return r

    def request_json(self, method: str, path: str, **kw: Any) -> Any:
        """A JSON endpoint: the decoded body. New endpoints are one method over this."""
        return self.request(method, path, **kw).json()

    # -- corpora and jobs -----------------------------------------------------------
    def upload_corpus(
        self, data: bytes, *, format: str = "auto", retention_days: int = 0
    ) -> Corpus:
        """Upload a forget/retain corpus (JSONL or text); returns {id, size, records, format}.
        Uploading the same bytes again returns the same id. The server deletes it when the
        last job that uses it ends, unless `retention_days` asks to keep it that long."""
        ctype = "text/plain" if format == "text" else "application/x-ndjson"
        return self.request_json(
            "POST",
            "/v1/corpora",
            content=data,
            params={"format": format, "retention_days": retention_days},
            headers={"Content-Type": ctype},
        )

    def submit(
        self,
        spec: Any,
        *,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> Job:
        """Submit a job spec (a dict or a workers.spec.JobSpec); returns the job (QUEUED, or
        the first job of this idempotency key). `request_id` joins a deletion request."""
        body = spec.resolved() if hasattr(spec, "resolved") else spec
        key = idempotency_key or str(uuid.uuid4())
        params = {"request_id": request_id} if request_id else None
        return self.request_json(
            "POST", "/v1/jobs", json=body, params=params, headers={"Idempotency-Key": key}
        )

    def submit_with_corpora(
        self,
        spec: Mapping[str, Any],
        corpora: Mapping[str, Path | bytes],
        *,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> SubmitResult:
        """Submit `spec` with local corpora (name -> file or bytes, name `forget` or
        `retain`): their SHA-256 goes into the spec as `corpus_id` and each is uploaded
        only if the server answers that it does not have it."""
        key = idempotency_key or str(uuid.uuid4())
        body = json.loads(json.dumps(spec))  # a private deep copy
        data: dict[str, bytes] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, src in corpora.items():
            data[name] = src if isinstance(src, bytes) else Path(src).read_bytes()
            ref = body.get(name) if isinstance(body.get(name), dict) else {}
            ref = {k: v for k, v in ref.items() if k not in ("path", "demo", "corpus_id")}
            body[name] = {**ref, "corpus_id": corpus_id(data[name])}
            info[name] = {"id": corpus_id(data[name]), "size": len(data[name]), "uploaded": False}
        for _ in range(len(data) + 1):
            try:
                job = self.submit(body, idempotency_key=key, request_id=request_id)
                return SubmitResult(job, info, key)
            except ApiClientError as e:
                missing = [
                    n for n in data if not info[n]["uploaded"] and _names(e, f"{n}.corpus_id")
                ]
                if e.status != 422 or not missing:
                    raise
                for n in missing:
                    fmt = body[n].get("format", "auto")
                    up = self.upload_corpus(data[n], format=fmt)
                    info[n] |= {"uploaded": True, "records": up["records"]}
        raise AssertionError("unreachable")  # pragma: no cover - every corpus was uploaded

    def get(self, job_id: str) -> Job:
        return self.request_json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, state: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page: {items: [Job], next_cursor}, newest first."""
        params = {k: v for k, v in (("state", state), ("limit", limit), ("cursor", cursor)) if v}
        return self.request_json("GET", "/v1/jobs", params=params)

    def iter_jobs(self, *, state: str | None = None, page: int = 100) -> Iterator[Job]:
        """Every job of the tenant, newest first, page by page."""
        cursor = None
        while True:
            got = self.list_jobs(state=state, limit=page, cursor=cursor)
            yield from got["items"]
            cursor = got.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        """Request a cancel (a queued job ends at once; a running one at its next step)."""
        return self.request_json("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, since: int | None = None, limit: int | None = None) -> Any:
        """One page of events: {items: [Event], next_since, job_state}."""
        params = {k: v for k, v in (("since", since), ("limit", limit)) if v is not None}
        return self.request_json("GET", f"/v1/jobs/{job_id}/events", params=params)

    def iter_events(self, job_id: str, *, since: int = 0) -> Iterator[Event]:
        """Every recorded event after `since`, page by page (no waiting)."""
        while True:
            got = self.events(job_id, since=since, limit=1000)
            yield from got["items"]
            if not got["items"]:
                return
            since = got["next_since"]

    def stream_events(self, job_id: str, *, since: int | None = None) -> Iterator[Event]:
        """Server-sent events of a job until it is terminal; the last one yielded is
        {"kind": "end", "job_state", "next_since"}. A dropped or ended stream is resumed
        after the last event received (`since` and `Last-Event-ID`), with the retry policy."""
        last = since or 0
        failures = 0
        while True:
            headers = {**self.headers}
            if last:
                headers["Last-Event-ID"] = str(last)
            opened = time.monotonic()
            try:
                with connect_sse(
                    self.http, "GET", f"/v1/jobs/{job_id}/events",
                    params={"since": last}, headers=headers,
                ) as source:  # fmt: skip
                    r = source.response
                    if r.status_code in self.retry.statuses:
                        raise _Retryable(r.headers.get("retry-after"))
                    self._raise_for(r)
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue  # the `retry:` hint
                        ev: Event = json.loads(sse.data)
                        failures = 0
                        if ev.get("kind") == "end":
                            yield ev
                            return
                        last = int(ev.get("id", last))
                        yield ev
            except (httpx.TransportError, SSEError, _Retryable) as e:
                failures += 1
                if failures >= self.retry.attempts:
                    raise ServerUnreachable(
                        f"event stream of job {job_id}: lost after {failures} tries ({e!r})"
                    ) from e
                time.sleep(self.retry.delay(failures, getattr(e, "retry_after", None)))
                continue
            # The server closed the stream before the end: resume where it stopped. A stream
            # that lasted (a server's maximum stream lifetime) is no failure; one closed at
            # once, again and again, is.
            failures = 0 if time.monotonic() - opened > STREAM_LIFETIME_OK_S else failures + 1
            if failures >= self.retry.attempts:
                raise ServerUnreachable(f"event stream of job {job_id} keeps closing early")
            time.sleep(self.retry.delay(max(failures, 1)))

    def follow(self, job_id: str, on_event: Callable[[Event], None] | None = None) -> Job:
        """Stream the job's events to `on_event` until it ends; returns the final job."""
        for ev in self.stream_events(job_id):
            if on_event is not None:
                on_event(ev)
        return self.get(job_id)

    def wait(self, job_id: str, *, timeout: float = 600.0, interval: float = 0.5) -> Job:
        """Poll until the job is SUCCEEDED, FAILED or CANCELLED; returns the final job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")
            time.sleep(interval)

    # -- results --------------------------------------------------------------------
    def expert_map(self, job_id: str) -> dict[str, Any]:
        """{items: [{layer, expert, score, rank, selected, method}]}."""
        return self.request_json("GET", f"/v1/jobs/{job_id}/expert-map")

    def evaluations(self, job_id: str) -> dict[str, Any]:
        """{items: [{phase, task, metric, value}]}: scores before and after."""
        return self.request_json("GET", f"/v1/jobs/{job_id}/evaluations")

    def artifacts(self, job_id: str) -> list[Artifact]:
        return self.request_json("GET", f"/v1/jobs/{job_id}/artifacts")["items"]

    def download(self, job_id: str, artifact_id: str | int, dest: Path) -> Path:
        """Stream one artifact to `dest` (via `dest.part`, renamed when complete), checked
        against the server's X-Content-SHA256; retried as a whole. Returns `dest`."""
        url = f"/v1/jobs/{job_id}/artifacts/{artifact_id}"
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        failures = 0
        while True:
            try:
                with self.http.stream("GET", url, headers=self.headers) as r:
                    if r.status_code in self.retry.statuses:
                        raise _Retryable(r.headers.get("retry-after"))
                    self._raise_for(r)
                    h = hashlib.sha256()
                    with part.open("wb") as f:
                        for chunk in r.iter_bytes(1 << 20):
                            h.update(chunk)
                            f.write(chunk)
                    want = r.headers.get("x-content-sha256")
                break
            except (httpx.TransportError, _Retryable) as e:
                failures += 1
                if failures >= self.retry.attempts:
                    part.unlink(missing_ok=True)
                    raise ServerUnreachable(f"GET {url}: {failures} tries failed ({e!r})") from e
                time.sleep(self.retry.delay(failures, getattr(e, "retry_after", None)))
        if want and h.hexdigest() != want:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{url}: SHA-256 {h.hexdigest()} but the server says {want}")
        part.replace(dest)
        return dest

    def download_kind(self, job_id: str, kind: str, dest: Path) -> Path:
        """Download the job's artifact of this kind (e.g. `expert_patch`) to `dest`."""
        for a in self.artifacts(job_id):
            if a["kind"] == kind:
                return self.download(job_id, a["id"], dest)
        raise ClientError(f"job {job_id} has no {kind} artifact")

    def results(self, job_id: str, out: Path, *, model: bool = False) -> dict[str, Any]:
        """Write a finished job's results under `out`: job.json, expert_map.json,
        evaluations.json and its artifacts (the model only when `model`). Returns a manifest
        {file name: sha256} (also written as manifest.json). A patch-only job
        (`output.model: patch`) has no model to download: `model` is refused for it."""
        arts = self.artifacts(job_id)
        kinds = {a["kind"] for a in arts}
        if model and "model" not in kinds and "base_model" in kinds:
            raise ClientError(
                f"job {job_id} wrote only its expert patch (output.model patch): no model to "
                "download; apply artifacts/expert_patch.safetensors to the base model that "
                "artifacts/base_model.json names (moe-unlearn patch apply)"
            )
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, str] = {}
        for name, doc in (
            ("job.json", self.get(job_id)),
            ("expert_map.json", self.expert_map(job_id)),
            ("evaluations.json", self.evaluations(job_id)),
        ):
            (out / name).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            written[name] = file_sha256(out / name)
        for a in arts:
            if a["kind"] == "model" and not model:
                continue
            name = Path(a["name"]).name  # the server's name, never a path of ours
            if f"artifacts/{name}" in written or name in ("", ".", ".."):
                name = f"{a['kind']}-{a['id']}-{name}"
            self.download(job_id, a["id"], out / "artifacts" / name)
            written[f"artifacts/{name}"] = a["sha256"]
        (out / "manifest.json").write_text(json.dumps(written, indent=1) + "\n")
        return written

    def certificate(self, job_id: str) -> dict[str, Any]:
        """The deletion certificate of a finished job (409 while it runs)."""
        return self.request_json("GET", f"/v1/jobs/{job_id}/certificate")

    def certificate_html(self, job_id: str) -> str:
        return self.request("GET", f"/v1/jobs/{job_id}/certificate", params={"format": "html"}).text

    # -- audit, keys, health --------------------------------------------------------
    def audit_events(
        self, *, since: int | None = None, limit: int | None = None, job_id: str | None = None
    ) -> dict[str, Any]:
        """One page of the tenant's audit entries: {items, next_since} (auditor key)."""
        pairs = (("since", since), ("limit", limit), ("job_id", job_id))
        return self.request_json(
            "GET", "/v1/audit/events", params={k: v for k, v in pairs if v is not None}
        )

    def iter_audit_events(self, *, since: int = 0, job_id: str | None = None) -> Iterator[Any]:
        while True:
            got = self.audit_events(since=since, limit=1000, job_id=job_id)
            yield from got["items"]
            if not got["items"]:
                return
            since = got["next_since"]

    def audit_verify(self, against: str | None = None) -> dict[str, Any]:
        """Recompute the hash chain: {ok, checked, first_bad_seq, reason, head_seq, ...};
        with `against` (a signed checkpoint's JSON), also check the chain still extends it."""
        params = {"against": against} if against is not None else None
        return self.request_json("GET", "/v1/audit/verify", params=params)

    def audit_checkpoints(self, limit: int = 20) -> dict[str, Any]:
        """A signed checkpoint of the chain head made now (`current`) and the stored ones;
        keep `current` where the database's writers cannot change it."""
        return self.request_json("GET", "/v1/audit/checkpoints", params={"limit": limit})

    def create_key(self, role: str, tenant: str) -> dict[str, Any]:
        return self.request_json("POST", "/v1/keys", json={"role": role, "tenant": tenant})

    def health(self) -> dict[str, Any]:
        return self.request_json("GET", "/healthz")


class _Retryable(Exception):
    def __init__(self, retry_after: str | None) -> None:
        super().__init__(f"answered retryable status (Retry-After {retry_after})")
        self.retry_after = retry_after


def _names(e: ApiClientError, fld: str) -> bool:
    return any(err.get("field") == fld for err in e.errors)


def verify_certificate(cert: Mapping[str, Any], *, patch: Path | None = None) -> list[str]:
    """What is wrong with a certificate, checked offline ([] = nothing): its
    `certificate_sha256` recomputed over the canonical JSON of its facts, its Ed25519
    signature (with the key it carries: compare its fingerprint with GET
    /v1/certificate-key, or use `moe-unlearn certificate verify --key`), the server's
    verification of the audit chain, and, given the downloaded expert patch, that its
    SHA-256 is the one the certificate lists."""
    problems: list[str] = []
    # The hash covers the facts: not itself, the chain's re-verification, nor the signature
    # (made over everything else afterwards, and checked below).
    facts = {
        k: v
        for k, v in cert.items()
        if k not in ("certificate_sha256", "verification", "signature")
    }
    got = hashlib.sha256(canonical_json(facts).encode()).hexdigest()
    if got != cert.get("certificate_sha256"):
        problems.append(f"certificate_sha256 is {cert.get('certificate_sha256')}, facts hash {got}")
    from service.signing import verify_document

    sig = verify_document(dict(cert))
    if not sig.valid:
        problems.append(f"signature: {sig.reason}")
    ver = cert.get("verification") or {}
    if ver.get("chain_ok") is not True:
        problems.append(f"audit chain not intact when issued: {ver.get('reason')}")
    if patch is not None:
        listed = {a["sha256"] for a in cert.get("artifacts", []) if a.get("kind") == "expert_patch"}
        if file_sha256(patch) not in listed:
            problems.append(f"{patch.name}: its SHA-256 is not the certificate's expert patch")
    return problems
