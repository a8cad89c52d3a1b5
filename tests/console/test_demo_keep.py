"""`python -m api.demo --keep` (what `make demo-console` runs): after the job the API and the
dispatcher stay up, the demo prints its job's console page and an auditor key that signs in
there, and Ctrl-C (SIGINT) stops everything it started. On a small demo world (2 topics x
4 facts, built into a private cache) so that it runs in a test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

SPEC = """\
model: demo
world: {seed: 0, topics: 2, facts_per_topic: 4, forget_topic: 0}
forget: {demo: forget}
retain: {demo: retain}
algorithm: gdiff
training: {max_steps: 2, batch_size: 4}
evaluation: {backend: direct}
"""


def test_demo_keep_serves_the_console_until_ctrl_c(tmp_path: Path) -> None:
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    env = dict(os.environ) | {
        "PYTHONUNBUFFERED": "1",
        "MOE_UNLEARN_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "COLUMNS": "200",
    }
    env.pop("RAY_ADDRESS", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "api.demo", "--spec", str(spec), "--workers", "1", "--keep",
         "--dir", str(tmp_path / "state")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out: list[str] = []
    try:
        deadline = time.monotonic() + 600
        url = key = None
        assert demo.stdout is not None
        while key is None:
            line = demo.stdout.readline()
            assert line or demo.poll() is None, "".join(out)
            assert time.monotonic() < deadline, "".join(out)
            out.append(line)
            if m := re.search(r"web console: (http://\S+/console/jobs/\S+)", line):
                url = m.group(1)
            if m := re.search(r"sign in with this auditor key: (\S+)", line):
                key = m.group(1)
        assert url is not None, "".join(out)
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 2
        with httpx.Client(follow_redirects=False, timeout=30) as http:
            login = http.get(url)
            assert login.status_code == 303 and "/console/login" in login.headers["location"]
            form = http.get(url.split("/console/")[0] + login.headers["location"])
            token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            nxt = re.search(r'name="next" value="([^"]+)"', form.text).group(1)
            signed = http.post(url.split("/console/")[0] + "/console/login",
                               data={"key": key, "csrf_token": token, "next": nxt})
            assert signed.status_code == 303 and url.endswith(signed.headers["location"])
            page = http.get(url)
            assert page.status_code == 200 and "succeeded" in page.text
            assert "<svg" in page.text and key not in page.text
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 0
        rest = demo.stdout.read()
        assert "stopping the API and dispatcher" in rest and "Traceback" not in rest
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=30)
