"""The Python client against the app served over real HTTP (uvicorn in a thread, SQLite),
with jobs advanced by the service's own functions: an event stream cut mid-way resumes
after the last event it delivered, and a download is checked against its SHA-256."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import create_app
from api.client import (
    ApiClientError,
    Client,
    ClientError,
    IntegrityError,
    RetryPolicy,
    ServerUnreachable,
)
from service import db, keys
from service.settings import Settings
from tests.api.conftest import FORGET, Driver, serve_in_thread, spec
from tests.client.kit import StreamCuttingProxy

FAST = RetryPolicy(attempts=3, backoff_s=0.05)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, Driver]]:
    """(url, requester key of tenant acme, driver) for a fresh app on a fresh database."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'sdk.db'}", data_dir=tmp_path / "d")
    db.upgrade(settings.database_url)
    app = create_app(settings)
    with db.session_scope(app.state.session_factory) as s:
        key = keys.create_key(s, "requester", "acme", actor="test")[1]
    try:
        with serve_in_thread(app) as url:
            yield url, key, Driver(app)
    finally:
        app.state.engine.dispose()


def test_a_cut_event_stream_resumes_after_the_last_event(served, tmp_path: Path):
    url, key, driver = served
    with Client(url, key, retry=FAST) as c:
        job = c.submit(spec(c.upload_corpus(FORGET)["id"]))
        driver.run_to_success(job["id"])
        recorded = c.events(job["id"], limit=1000)["items"]
    assert [e["step"] for e in recorded if e["kind"] == "train"] == [1, 2, 3]

    proxy = StreamCuttingProxy(int(url.rsplit(":", 1)[1]), kind="train")
    try:
        with Client(proxy.url, key, retry=FAST) as c:
            streamed = list(c.stream_events(job["id"]))
    finally:
        proxy.close()
    assert proxy.cut == 1  # the first stream ended right after the first train event
    assert streamed[-1] == {
        "kind": "end", "job_state": "SUCCEEDED", "next_since": recorded[-1]["id"],
    }  # fmt: skip
    assert [e["id"] for e in streamed[:-1]] == [e["id"] for e in recorded]  # each once


def test_download_is_checked_and_errors_name_the_field(served, tmp_path: Path):
    url, key, driver = served
    with Client(url, key, retry=FAST) as c:
        job = c.submit(spec(c.upload_corpus(FORGET)["id"]), idempotency_key="sdk-1")
        assert c.submit(spec(c.upload_corpus(FORGET)["id"]), idempotency_key="sdk-1") == job
        driver.run_to_success(job["id"], artifact=b"patch-bytes")
        got = c.download_kind(job["id"], "expert_patch", tmp_path / "p" / "patch.bin")
        assert got.read_bytes() == b"patch-bytes"
        assert not (tmp_path / "p" / "patch.bin.part").exists()
        written = c.results(job["id"], tmp_path / "res")
        assert set(written) >= {"job.json", "expert_map.json", "artifacts/patch.bin"}
        # The blob rots on the server's disk: the bytes no longer match the recorded hash.
        (blob,) = (tmp_path / "d").rglob("patch.bin")
        blob.write_bytes(b"patch-bytez")
        with pytest.raises(IntegrityError):
            c.download_kind(job["id"], "expert_patch", tmp_path / "q" / "patch.bin")
        assert list((tmp_path / "q").iterdir()) == []  # nothing half-written is left

        with pytest.raises(ApiClientError) as e:
            c.submit({"forget": {"corpus_id": "ab" * 32}, "algorithm": "npo"})
        assert (e.value.status, e.value.field) == (422, "forget.corpus_id")
        assert "no such corpus of this tenant" in (e.value.reason or "")
    with pytest.raises(ServerUnreachable):
        Client("http://127.0.0.1:9", key, retry=RetryPolicy(attempts=2, backoff_s=0.01)).get("x")


def test_a_patch_only_job_has_no_model_to_download(served, tmp_path: Path):
    url, key, driver = served
    with Client(url, key, retry=FAST) as c:
        job = c.submit(spec(c.upload_corpus(FORGET)["id"]))
        driver.run_to_success(job["id"], more=(("base_model", "base_model.json", b"{}"),))
        with pytest.raises(ClientError, match="wrote only its expert patch"):
            c.results(job["id"], tmp_path / "res", model=True)
        assert not (tmp_path / "res").exists()  # refused before anything was written
        written = c.results(job["id"], tmp_path / "res")
        assert {"artifacts/patch.bin", "artifacts/base_model.json"} <= set(written)
