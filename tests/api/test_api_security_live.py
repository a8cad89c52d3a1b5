"""Issue 14 against a real server process (uvicorn): the memory of a corpus upload, and
the per-tenant limit on open event streams over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from service import db, keys
from tests.api.conftest import free_port

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


@contextmanager
def server(tmp_path: Path, **env_extra: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """uvicorn serving api.app on a fresh SQLite database; yields (url, requester key, proc)."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.session_scope(db.make_session_factory(engine)) as s:
        _, secret = keys.create_key(s, "requester", "acme", actor="test")
    engine.dispose()
    port = free_port()
    env = os.environ | {
        "DATABASE_URL": url,
        "MOE_UNLEARN_DATA_DIR": str(tmp_path / "data"),
        **env_extra,
    }
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield base, secret, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _chunks(line: bytes, count: int, per_chunk: int = 32768) -> Iterator[bytes]:
    block = line * per_chunk
    full, rest = divmod(count, per_chunk)
    for _ in range(full):
        yield block
    yield line * rest


def test_upload_memory_is_bounded_by_one_record(tmp_path: Path) -> None:
    with server(tmp_path) as (base, key, proc):
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, timeout=120) as c:
            assert c.get("/v1/jobs", headers=h).status_code == 200
            before = _peak_rss(proc.pid)
            # The attack: 63 MiB of "a\n" (33M records, under the byte cap, over the record
            # cap). The old server built the list of every line first: +3.7 GB peak.
            r = c.post("/v1/corpora", content=_chunks(b"a\n", 33_000_000), headers=h)
            assert r.status_code == 422, r.text
            assert "records is over the limit of 1000000" in r.json()["errors"][0]["reason"]
            # A valid corpus near the caps: 40 MB, 1M records.
            line = b'{"text": "a record of thirty bytes"}\n'
            r = c.post("/v1/corpora", content=_chunks(line, 1_000_000), headers=h)
            assert r.status_code == 201, r.text
            assert (r.json()["records"], r.json()["size"]) == (1_000_000, 1_000_000 * len(line))
            growth = _peak_rss(proc.pid) - before
            print(f"server peak RSS growth over both uploads: {growth / MiB:.1f} MiB")
            assert growth < 100 * MiB, growth / MiB
            assert c.get("/v1/jobs", headers=h).status_code == 200
        rss = psutil.Process(proc.pid).memory_info().rss
        assert rss < before + 100 * MiB  # nothing was kept either


def test_open_stream_limit_over_http(tmp_path: Path) -> None:
    with server(tmp_path, MOE_UNLEARN_MAX_STREAMS_PER_TENANT="2") as (base, key, _proc):
        h = {"Authorization": f"Bearer {key}"}
        spec = {"model": "demo", "forget": {"demo": "forget"}, "algorithm": "npo"}
        # A read timeout under the 15 s keep-alive: a stream that never ends fails the test.
        with httpx.Client(base_url=base, timeout=10) as c:
            job = c.post("/v1/jobs", json=spec, headers=h).json()["id"]
            sh = h | {"Accept": "text/event-stream"}
            first = c.stream("GET", f"/v1/jobs/{job}/events", headers=sh)
            second = c.stream("GET", f"/v1/jobs/{job}/events", headers=sh)
            r1, r2 = first.__enter__(), second.__enter__()
            assert (r1.status_code, r2.status_code) == (200, 200)
            r3 = c.get(f"/v1/jobs/{job}/events", headers=sh)
            assert r3.status_code == 429 and int(r3.headers["Retry-After"]) >= 1
            # Other calls are unaffected while the streams are open.
            assert c.get("/v1/jobs", headers=h).status_code == 200
            first.__exit__(None, None, None)
            # The server notices the disconnect at its next poll and frees the slot.
            deadline = time.monotonic() + 30
            while True:
                with c.stream("GET", f"/v1/jobs/{job}/events", headers=sh) as r4:
                    if r4.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the slot was never released"
                time.sleep(0.5)
            second.__exit__(None, None, None)
