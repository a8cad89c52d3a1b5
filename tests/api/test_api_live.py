"""The same API over real HTTP: uvicorn on a loopback port, driven by `api.client.Client`
(httpx), on SQLite and PostgreSQL. Server-sent events are read while a driver thread
advances the job."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from api.client import ApiClientError, Client
from tests.api.conftest import FORGET, RETAIN, Driver, Keys, sha256, spec

pytestmark = pytest.mark.slow


def test_live_request_poll_flow(
    live_url: str, api_keys: Keys, driver: Driver, tmp_path: Path
) -> None:
    with Client(live_url, api_key=api_keys.requester) as c:
        fid = c.upload_corpus(FORGET)["id"]
        rid = c.upload_corpus(RETAIN, format="text")["id"]
        assert fid == sha256(FORGET)
        job = c.submit(spec(fid, rid), idempotency_key="live-1")
        assert c.submit(spec(fid, rid), idempotency_key="live-1")["id"] == job["id"]
        with pytest.raises(ApiClientError) as e:
            c.submit(spec(fid, rid, algorithm="rmu"), idempotency_key="live-1")
        assert e.value.status == 422 and e.value.body["errors"][0]["field"] == "Idempotency-Key"

        errors: list[BaseException] = []

        def advance() -> None:
            try:
                time.sleep(0.3)  # let the client subscribe first
                driver.run_to_success(job["id"], artifact=b"live-patch")
            except BaseException as ex:  # surfaced by the assertion below
                errors.append(ex)

        t = threading.Thread(target=advance)
        t.start()
        streamed = list(c.stream_events(job["id"]))  # returns when the job is terminal
        t.join(timeout=30)
        assert not errors, errors
        assert streamed[-1]["kind"] == "end" and streamed[-1]["job_state"] == "SUCCEEDED"
        polled = c.events(job["id"], since=0)["items"]
        assert [e["id"] for e in streamed[:-1]] == [e["id"] for e in polled]
        assert [e["step"] for e in polled if e["kind"] == "train"] == [1, 2, 3]

        final = c.wait(job["id"], timeout=10, interval=0.1)
        assert final["state"] == "SUCCEEDED"
        art = c.artifacts(job["id"])[0]
        dest = c.download(job["id"], art["id"], tmp_path / "patch.bin")
        assert dest.read_bytes() == b"live-patch" and art["sha256"] == sha256(b"live-patch")
        cert = c.certificate(job["id"])
        assert cert["experts"]["selected"][0] == {"layer": 1, "expert": 3, "score": 0.7, "rank": 1}

    with Client(live_url, api_key=api_keys.auditor) as aud:
        assert aud.audit_verify()["ok"] is True
        with pytest.raises(ApiClientError) as e:
            aud.cancel(job["id"])
        assert e.value.status == 403


def test_live_errors_are_json_4xx(live_url: str, api_keys: Keys) -> None:
    r = httpx.get(f"{live_url}/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["errors"][0]["field"] == "Authorization"
    r = httpx.post(
        f"{live_url}/v1/corpora",
        content=b"\xc3\x28 invalid",
        headers=Keys.h(api_keys.requester),
    )
    assert r.status_code == 422 and "UTF-8" in r.json()["message"]
    # A body over the cap is refused from its Content-Length, before it is read.
    r = httpx.post(
        f"{live_url}/v1/corpora", content=b"a\n" * 5000, headers=Keys.h(api_keys.requester)
    )
    assert r.status_code == 413 and r.json()["errors"][0]["field"] == "body"
    assert httpx.get(f"{live_url}/readyz").json()["status"] == "ready"
