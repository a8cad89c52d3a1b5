"""Helpers of the client tests: the service as real child processes (`moe-unlearn serve
--no-ray-serve` on a fresh SQLite file, optionally `moe-unlearn dispatcher` on a private
local Ray), the `moe-unlearn` command run as a user runs it, and a TCP proxy that drops
the connection carrying the first 202 answer (the server acted, the client never heard)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from api.demo import wait_healthy

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "api.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "MOE_UNLEARN_RAY_ADDRESS", "MOE_UNLEARN_URL", "MOE_UNLEARN_KEY"):
        env.pop(var, None)
    return env | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "DATABASE_URL": f"sqlite:///{work / 'service.db'}",
        "MOE_UNLEARN_DATA_DIR": str(work / "data"),
        "MOE_UNLEARN_RAY_NUM_CPUS": "2",
        "MOE_UNLEARN_HEARTBEAT_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MOE_UNLEARN_DEBUG": "0",
    }


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`moe-unlearn ARGS` in a fresh process (no server or key from this environment)."""
    return subprocess.run(
        [*CLI, *args], env=env or base_env(Path("/nonexistent")), cwd=ROOT,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@dataclass
class Service:
    url: str
    requester: str  # keys of tenant acme
    auditor: str
    env: dict[str, str]
    server: subprocess.Popen[bytes]
    log: Path

    def stop_server(self) -> None:
        stop(self.server, "server")


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM, then SIGKILL by PID if it does not exit in 60 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def service(work: Path, *, dispatcher: bool) -> Iterator[Service]:
    """The API (uvicorn, loopback) and, if asked, the dispatcher, as child processes."""
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="mu-cli-", dir="/tmp")  # short: Ray's unix sockets
    env = base_env(work) | {"MOE_UNLEARN_RAY_TEMP_DIR": ray_tmp}
    subprocess.run([*CLI, "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)

    def key(role: str) -> str:
        return subprocess.run(
            [*CLI, "keys", "create", "--role", role, "--tenant", "acme"], env=env, cwd=ROOT,
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    requester, auditor = key("requester"), key("auditor")
    port = free_port()
    log_path = work / "processes.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [*CLI, "serve", "--no-ray-serve", "--port", str(port)], env=env, cwd=ROOT,
        stdout=log, stderr=log,
    )  # fmt: skip
    procs = [(server, "server")]
    if dispatcher:
        disp = subprocess.Popen([*CLI, "dispatcher"], env=env, cwd=ROOT, stdout=log, stderr=log)
        procs.append((disp, "dispatcher"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 90, log_path)
        yield Service(url, requester, auditor, env, server, log_path)
    finally:
        for p, name in reversed(procs):  # the dispatcher first: it hands its job back
            stop(p, name)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


class Proxy:
    """A loopback TCP proxy to `upstream_port`; `answer(chunk, seen)` decides what of each
    chunk from the server is forwarded (`seen`: the answer bytes of this connection so far,
    the new chunk included) and whether to close the connection after it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def answer(self, chunk: bytes, seen: bytes) -> tuple[bytes, bool]:
        return chunk, False

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        seen = b""
        try:
            while chunk := src.recv(65536):
                close = False
                if answers:
                    seen += chunk
                    chunk, close = self.answer(chunk, seen)
                dst.sendall(chunk)
                if close:
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


class DroppingProxy(Proxy):
    """Does not forward the first `drops` answers that start with `HTTP/1.1 202`: it
    closes their connection instead, after the server has done the work (a dropped
    connection as a client sees it)."""

    def __init__(self, upstream_port: int, drops: int = 1) -> None:
        super().__init__(upstream_port)
        self.drops = drops
        self.dropped = 0

    def answer(self, chunk: bytes, seen: bytes) -> tuple[bytes, bool]:
        with self.lock:
            if chunk.startswith(b"HTTP/1.1 202") and self.dropped < self.drops:
                self.dropped += 1
                return b"", True
        return chunk, False


class StreamCuttingProxy(Proxy):
    """Cuts the first event stream right after its first event of `kind` (the server's
    answer is forwarded up to that event's end, then the connection is closed)."""

    def __init__(self, upstream_port: int, kind: str) -> None:
        super().__init__(upstream_port)
        self.marker = f"event: {kind}\n".encode()
        self.cut = 0

    def answer(self, chunk: bytes, seen: bytes) -> tuple[bytes, bool]:
        with self.lock:
            if self.cut or b"text/event-stream" not in seen or self.marker not in seen:
                return chunk, False
            end = seen.find(b"\n\n", seen.index(self.marker))
            if end < 0:
                return chunk, False
            self.cut += 1
            keep = len(chunk) - (len(seen) - (end + 2))  # this chunk up to the event's end
            return chunk[: max(keep, 0)], True
