"""The browser tests' world: ONE API server and ONE dispatcher (with its local Ray) as real
child processes for the whole session, a finished job on the tiny MoE model, and headless
Chromium (Debian's `chromium`, driven by Playwright for Python; nothing is downloaded).

Chromium is found at $CHROMIUM_PATH or as `chromium` on the PATH (`.ci/run` installs
it); a missing one fails the tests with the command to run. Screenshots go to
$CONSOLE_SCREENSHOTS_DIR (default: a folder of the test session, printed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.client import Client
from api.demo import wait_healthy
from tests.api.conftest import free_port
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, corpus_bytes
from tests.dispatch.kit import TINY_MODEL, http_spec

CLI = [sys.executable, "-m", "api.cli"]
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
WIDTHS = {"desktop": 1280, "phone": 390}


@dataclass
class Service:
    base: str
    db_path: Path
    requester: str
    auditor: str
    other: str  # requester key of another tenant
    finished_job: str
    model_dir: Path
    forget_id: str
    retain_id: str
    log: Path


def _cli(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("console-service")
    ray_tmp = tempfile.mkdtemp(prefix="mu-con-", dir="/tmp")  # short: Ray's unix sockets
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "MOE_UNLEARN_RAY_ADDRESS"):
        env.pop(k, None)
    env |= {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "DATABASE_URL": f"sqlite:///{work / 'console.db'}",
        "MOE_UNLEARN_DATA_DIR": str(work / "data"),
        "MOE_UNLEARN_RAY_TEMP_DIR": ray_tmp,
        "MOE_UNLEARN_RAY_NUM_CPUS": "2",
        "MOE_UNLEARN_DISPATCHER_POLL_S": "0.2",
        "MOE_UNLEARN_HEARTBEAT_S": "0.5",
        "MOE_UNLEARN_CANCEL_GRACE_S": "5",
        "MOE_UNLEARN_MODEL_DIR": str(tiny_model_dir.parent),  # the model root
    }
    _cli(env, "db", "upgrade")
    # A remote client names a registered model, never a path (issue 14).
    _cli(env, "models", "add", TINY_MODEL, "--path", str(tiny_model_dir))
    requester = _cli(env, "keys", "create", "--role", "requester", "--tenant", "acme")
    auditor = _cli(env, "keys", "create", "--role", "auditor", "--tenant", "acme")
    other = _cli(env, "keys", "create", "--role", "requester", "--tenant", "globex")
    port = free_port()
    log = work / "processes.log"
    out = log.open("w")
    server = subprocess.Popen(
        [*CLI, "serve", "--no-ray-serve", "--port", str(port)], env=env, stdout=out, stderr=out
    )
    dispatcher = subprocess.Popen([*CLI, "dispatcher"], env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server, 90, log)
        with Client(base, requester) as c:
            # Kept after the first job ends: later tests submit more jobs on them.
            forget = c.upload_corpus(corpus_bytes(FORGET_SUBJECTS, 12), retention_days=1)["id"]
            retain = c.upload_corpus(corpus_bytes(RETAIN_SUBJECTS, 12), retention_days=1)["id"]
            job = c.submit(http_spec(tiny_model_dir, forget, retain, 4))
            final = c.wait(job["id"], timeout=400, interval=0.5)
            assert final["state"] == "SUCCEEDED", (final, log.read_text()[-3000:])
        yield Service(base, work / "console.db", requester, auditor, other, job["id"],
                      tiny_model_dir, forget, retain, log)
    finally:
        _stop(dispatcher)
        _stop(server)
        out.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    if not exe:
        pytest.fail("no chromium: `apt-get install -y chromium` (Debian), or set "
                    "CHROMIUM_PATH to a Chromium executable", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("CONSOLE_SCREENSHOTS_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {path}")
    return path


def sign_in(page: Any, base: str, key: str) -> None:
    """Through the form, as a person would."""
    page.goto(f"{base}/console/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/console/jobs")


def overflow_px(page: Any) -> int:
    """How far the page scrolls sideways (0 = it fits the viewport)."""
    return int(page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"))


def serious_violations(page: Any) -> list[str]:
    """axe-core's serious and critical violations of the page (rule id and first target)."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes'][0]['target']}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
