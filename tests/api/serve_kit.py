"""`moe-unlearn serve` on Ray Serve as a real child process, for the tests that drive it:
a fresh SQLite database and data dir, a private local Ray (2 CPUs, short temp folder), a
requester key; `stop()` sends SIGINT and checks that nothing it started is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.api.conftest import free_port

MOE_UNLEARN = str(Path(sys.executable).with_name("moe-unlearn"))


def cli(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([MOE_UNLEARN, *args], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    base: str
    key: str  # a requester key of tenant acme
    log: Path
    started: list[psutil.Process] = field(default_factory=list)

    def record_children(self) -> str:
        """Remember everything the server started (checked after it exits); their names."""
        self.started = psutil.Process(self.proc.pid).children(recursive=True)
        return " ".join(p.name() for p in self.started)

    def stop(self) -> str:
        """SIGINT; the server exits 0 and every process it started is gone. Its log."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0, self.log.read_text()
        # Ray's processes get a moment to notice their raylet is gone.
        _, alive = psutil.wait_procs(self.started, timeout=15)
        assert alive == [], [(p.pid, p.name()) for p in alive]
        text = self.log.read_text()
        assert "Traceback" not in text
        return text


@contextmanager
def ray_serve_process(tmp_path: Path, *args: str, **env_extra: str) -> Iterator[ServeProcess]:
    """Start `moe-unlearn serve --port P *args` and wait until the app answers /healthz."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MOE_UNLEARN_RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="mu-rs-", dir="/tmp")  # short: Ray's unix sockets
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "MOE_UNLEARN_DATA_DIR": str(tmp_path / "data"),
        "MOE_UNLEARN_RAY_TEMP_DIR": ray_tmp,
        "MOE_UNLEARN_RAY_NUM_CPUS": "2",
        **env_extra,
    }
    cli(env, "db", "upgrade")
    key = cli(env, "keys", "create", "--role", "requester", "--tenant", "acme").strip()
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [MOE_UNLEARN, "serve", "--port", str(port), *args], env=env, stdout=log, stderr=log
        )
    served = ServeProcess(proc, f"http://127.0.0.1:{port}", key, log_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:  # Serve's proxy answers 404/503 until the app's route is deployed
                r = httpx.get(f"{served.base}/healthz", timeout=2)
                if r.status_code not in (404, 503):
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "Ray Serve did not start"
            time.sleep(0.3)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        yield served
    finally:
        # Only if an assertion failed mid-way: kill what this test started, by PID.
        server = [psutil.Process(proc.pid)] if proc.poll() is None else []
        for p in [*served.started, *server]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
