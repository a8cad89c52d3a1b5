"""The whole service in one process on one Ray: `moe-unlearn serve --with-dispatcher` serves
the API from a 0-CPU Ray Serve replica and runs the dispatcher beside it, whose Ray Train
job takes both CPUs of the same local Ray. SIGINT leaves no process behind."""

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

from api.client import Client
from tests.api.conftest import free_port
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, corpus_bytes

pytestmark = pytest.mark.slow

MOE_UNLEARN = str(Path(sys.executable).with_name("moe-unlearn"))


def _cli(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([MOE_UNLEARN, *args], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_serve_with_dispatcher_runs_a_ray_train_job_on_one_ray(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MOE_UNLEARN_RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="mu-sd-", dir="/tmp")  # short: Ray's unix sockets
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "MOE_UNLEARN_DATA_DIR": str(tmp_path / "data"),
        "MOE_UNLEARN_RAY_TEMP_DIR": ray_tmp,
        "MOE_UNLEARN_RAY_NUM_CPUS": "2",
        "MOE_UNLEARN_DISPATCHER_POLL_S": "0.2",
    }
    _cli(env, "db", "upgrade")
    secret = _cli(env, "keys", "create", "--role", "requester", "--tenant", "acme").strip()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [MOE_UNLEARN, "serve", "--port", str(port), "--with-dispatcher"],
        env=env,
        stdout=log,
        stderr=log,
    )
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:  # Serve's proxy answers 404/503 until the app's route is deployed
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "Ray Serve did not start"
            time.sleep(0.3)
        with Client(base, api_key=secret) as c:
            forget = c.upload_corpus(corpus_bytes(FORGET_SUBJECTS, 12))["id"]
            retain = c.upload_corpus(corpus_bytes(RETAIN_SUBJECTS, 12))["id"]
            job = c.submit(
                {
                    "model": str(tiny_model_dir),
                    "forget": {"corpus_id": forget},
                    "retain": {"corpus_id": retain},
                    "algorithm": "gdiff",
                    "training": {"max_steps": 4, "batch_size": 4, "max_length": 16},
                    "evaluation": {"batch_size": 8},
                    "distributed": {"num_workers": 2},
                }
            )
            final = c.wait(job["id"], timeout=300, interval=0.5)
            assert final["state"] == "SUCCEEDED", (final, Path(log.name).read_text()[-3000:])
            evs = c.events(job["id"])["items"]
            (att,) = [e for e in evs if e["kind"] == "attempt_started"]
            assert att["payload"]["runner"] == "ray_train"
            assert [e["step"] for e in evs if e["kind"] == "step"] == [1, 2, 3, 4]
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in started)
        assert "ServeReplica" in names and "raylet" in names, names
        # One Ray: no second raylet was started for the dispatcher.
        assert sum(p.name() == "raylet" for p in started) == 1, names

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, Path(log.name).read_text()
        _, alive = psutil.wait_procs(started, timeout=15)
        assert alive == [], [(p.pid, p.name()) for p in alive]
        text = Path(log.name).read_text()
        assert "running the dispatcher in this process" in text
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
