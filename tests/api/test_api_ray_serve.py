"""`moe-unlearn serve` in its default Ray Serve mode: a real local Ray, the FastAPI app in a
Serve replica, real HTTP; SIGINT shuts Serve and Ray down and leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from api.serve import absolute_paths
from service.settings import Settings
from tests.api.conftest import FORGET, free_port, sha256, spec

MOE_UNLEARN = str(Path(sys.executable).with_name("moe-unlearn"))


def test_absolute_paths_resolves_sqlite_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's worker processes need not share the driver's cwd: relative paths must go.
    monkeypatch.chdir(tmp_path)
    s = absolute_paths(Settings(database_url="sqlite:///./var/x.db", data_dir=Path("d")))
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'x.db'}"
    assert s.data_dir == tmp_path / "d"
    pg = "postgresql+psycopg://u:secret@db:5432/mu"
    assert absolute_paths(Settings(database_url=pg)).database_url == pg  # password kept


def _cli(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([MOE_UNLEARN, *args], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow
def test_serve_on_ray_serve_then_sigint_leaves_nothing(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'serve.db'}"
    env["MOE_UNLEARN_DATA_DIR"] = str(tmp_path / "data")
    # A short private folder for Ray (its unix socket paths must stay under ~107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="mu-rs-", dir="/tmp")
    env["MOE_UNLEARN_RAY_TEMP_DIR"] = ray_tmp
    env["MOE_UNLEARN_RAY_NUM_CPUS"] = "2"
    env.pop("RAY_ADDRESS", None)
    env.pop("MOE_UNLEARN_RAY_ADDRESS", None)
    _cli(env, "db", "upgrade")
    secret = _cli(env, "keys", "create", "--role", "requester", "--tenant", "acme").strip()
    auth = {"Authorization": f"Bearer {secret}"}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [MOE_UNLEARN, "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 75
        while True:
            try:
                r = httpx.get(f"{base}/healthz", timeout=2)
                # Serve's proxy answers 404/503 until the app's route is deployed.
                if r.status_code not in (404, 503):
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "Ray Serve did not start"
            time.sleep(0.3)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        # Everything this server started, recorded while it runs (the check after exit).
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in started)
        # It really is Ray Serve: a Serve replica and Serve's HTTP proxy, under a local Ray.
        assert "ServeReplica" in names and "ProxyActor" in names and "raylet" in names, names

        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            r = c.post("/v1/corpora", content=FORGET)
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            assert cid == sha256(FORGET)
            r = c.post("/v1/jobs", json=spec(cid))
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["state"] == "QUEUED" and r.headers["location"] == f"/v1/jobs/{job['id']}"
            r = c.get(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["id"] == job["id"]
            assert r.json()["spec"]["forget"]["corpus_id"] == cid
            assert c.get("/v1/jobs").json()["items"][0]["id"] == job["id"]
            # Errors come back as the app's JSON 4xx through the Serve proxy too.
            r = httpx.get(f"{base}/v1/jobs", timeout=10)
            assert r.status_code == 401 and r.json()["errors"][0]["field"] == "Authorization"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=45) == 0, Path(log.name).read_text()
        # Ray's processes get a moment to notice their raylet is gone.
        gone, alive = psutil.wait_procs(started, timeout=15)
        assert alive == [], [(p.pid, p.name()) for p in alive]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz", timeout=2)
        text = Path(log.name).read_text()
        assert "received signal 2; shutting down" in text
        assert "Traceback" not in text
    finally:
        # Only if an assertion failed mid-way: kill what this test started, by PID.
        for p in [*started, psutil.Process(proc.pid)] if proc.poll() is None else started:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
