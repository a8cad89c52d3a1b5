"""`moe-unlearn jobs|audit` against a real API process (uvicorn, SQLite; no dispatcher, so
jobs stay QUEUED): user errors exit 2 with one line, an unreachable or failing server
exits 3, a submit retried after a dropped connection makes one job, --json parses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api.client import Client, RetryPolicy, ServerUnreachable
from tests.client.kit import DroppingProxy, Service, free_port, run_cli, service


def cli(svc: Service, *args: str, key: str | None = None, server: str | None = None) -> Any:
    return run_cli(*args, "--server", server or svc.url, "--key", key or svc.requester)


def one_line_error(r: Any) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moe-unlearn: error: ") and "Traceback" not in r.stderr
    return lines[0]


def job_count(svc: Service) -> int:
    r = cli(svc, "jobs", "list", "--all", "--json")
    assert r.returncode == 0, r.stderr
    return len(json.loads(r.stdout)["items"])


def test_bad_spec_and_missing_file_exit_2_with_one_line(bare: Service, spec_files: Path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((spec_files / "spec.yaml").read_text().replace("gdiff", "gx"))
    r = cli(bare, "jobs", "submit", str(bad), "--corpus", f"forget={spec_files / 'forget.jsonl'}")
    assert r.returncode == 2 and r.stdout == ""
    assert "algorithm" in one_line_error(r)

    r = cli(bare, "jobs", "submit", str(spec_files / "spec.yaml"), "--corpus", "forget=nope.jsonl")
    assert r.returncode == 2 and "not found" in one_line_error(r)
    r = cli(bare, "jobs", "submit", str(spec_files / "spec.yaml"), "--corpus", "keep=x")
    assert r.returncode == 2 and "forget=FILE" in one_line_error(r)
    r = cli(bare, "jobs", "submit", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "spec file not found" in one_line_error(r)
    r = run_cli("jobs", "list", "--server", "localhost:8000", "--key", "k")  # no scheme
    assert r.returncode == 2 and "http://" in one_line_error(r)
    assert job_count(bare) == 0  # nothing was submitted


def test_server_4xx_exits_2_with_field_and_reason_and_never_echoes_the_key(bare: Service):
    r = cli(bare, "jobs", "show", "no-such-job")
    assert r.returncode == 2 and "HTTP 404" in one_line_error(r) and "job" in r.stderr
    r = cli(bare, "jobs", "list", key="mu_not_a_real_key_123")
    assert r.returncode == 2 and "HTTP 401" in one_line_error(r)
    assert "mu_not_a_real_key_123" not in r.stderr + r.stdout
    # A requester may not read the audit log: 403, with the field the server named.
    r = cli(bare, "audit", "verify")
    assert r.returncode == 2 and "HTTP 403" in one_line_error(r)
    assert bare.requester not in r.stderr + r.stdout


def test_json_output_parses(bare: Service, spec_files: Path):
    r = cli(bare, "jobs", "submit", str(spec_files / "spec-paths.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    job_id = doc["job"]["id"]
    assert doc["job"]["state"] == "QUEUED"
    assert {n: c["uploaded"] for n, c in doc["corpora"].items()} == {
        "forget": True, "retain": True,
    }  # fmt: skip
    # The same corpora again: the server has them, nothing is sent twice.
    r = cli(bare, "jobs", "submit", str(spec_files / "spec.yaml"), "--json",
            "--corpus", f"forget={spec_files / 'forget.jsonl'}",
            "--corpus", f"retain={spec_files / 'retain.jsonl'}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert {n: c["uploaded"] for n, c in again["corpora"].items()} == {
        "forget": False, "retain": False,
    }  # fmt: skip
    assert again["corpora"]["forget"]["id"] == doc["corpora"]["forget"]["id"]
    assert again["job"]["spec"]["forget"]["corpus_id"] == doc["corpora"]["forget"]["id"]

    for args, check in [
        (("jobs", "show", job_id), lambda d: d["id"] == job_id),
        (("jobs", "list"), lambda d: job_id in [j["id"] for j in d["items"]]),
        (("jobs", "events", job_id), lambda d: d["job_state"] == "QUEUED"),
        (("jobs", "cancel", job_id), lambda d: d["state"] == "CANCELLED"),
    ]:
        r = cli(bare, *args, "--json")
        assert r.returncode == 0, r.stderr
        assert check(json.loads(r.stdout)), r.stdout
    r = cli(bare, "audit", "events", "--job", job_id, "--json", key=bare.auditor)
    assert r.returncode == 0, r.stderr
    assert [e["action"] for e in json.loads(r.stdout)["items"]][:1] == ["job_submitted"]
    r = cli(bare, "audit", "verify", "--json", key=bare.auditor)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_audit_verify_against_a_checkpoint_on_the_server(bare: Service, tmp_path):
    """The server checks that its chain still extends a checkpoint the client kept; a
    checkpoint whose head it does not hold (here: one entry edited) is refused, exit 1."""
    with Client(bare.url, bare.auditor) as c:
        current = c.audit_checkpoints()["current"]
    kept = tmp_path / "ckpt.json"
    kept.write_text(json.dumps(current))
    r = cli(bare, "audit", "verify", "--against", str(kept), "--json", key=bare.auditor)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    forged = dict(current, entry_hash="0" * 64)  # the signature no longer covers it
    bad = tmp_path / "forged.json"
    bad.write_text(json.dumps(forged))
    r = cli(bare, "audit", "verify", "--against", str(bad), key=bare.auditor)
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("audit chain: NOT VERIFIED") and "signature" in r.stdout


def test_a_submit_retried_after_a_dropped_connection_makes_one_job(bare: Service, spec_files: Path):
    port = int(bare.url.rsplit(":", 1)[1])
    proxy = DroppingProxy(port, drops=1)
    spec = str(spec_files / "spec-paths.yaml")
    try:
        before = job_count(bare)
        # No retries: the server made the job, the client never heard; exit 3.
        r = cli(bare, "jobs", "submit", spec, "--idempotency-key", "nightly-7",
                "--retries", "0", server=proxy.url)  # fmt: skip
        assert (r.returncode, proxy.dropped) == (3, 1), r.stderr
        assert job_count(bare) == before + 1
        # The pipeline reruns the same command: the same job comes back.
        r = cli(bare, "jobs", "submit", spec, "--idempotency-key", "nightly-7", server=proxy.url)
        assert r.returncode == 0, r.stderr
        first = r.stdout.strip()
        assert job_count(bare) == before + 1
        # A drop inside one command: its own retry reuses its key; one more job, not two.
        proxy.drops = 2
        r = cli(bare, "jobs", "submit", spec, "--json", server=proxy.url)
        assert (r.returncode, proxy.dropped) == (0, 2), r.stderr
        assert json.loads(r.stdout)["job"]["id"] != first
        assert job_count(bare) == before + 2
    finally:
        proxy.close()


class _Always503(BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).calls += 1
        self.send_response(503)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"code": "unavailable", "message": "database: down"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def always_503() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_5xx_is_retried_then_exits_3(always_503: str):
    _Always503.calls = 0
    r = run_cli("jobs", "list", "--server", always_503, "--key", "k", "--retries", "2")
    assert r.returncode == 3 and "HTTP 503" in one_line_error(r)
    assert _Always503.calls == 3  # the first try and 2 retries


@pytest.mark.slow
def test_a_stopped_server_exits_3(tmp_path: Path):
    with service(tmp_path, dispatcher=False) as svc:
        r = cli(svc, "jobs", "list", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["items"] == []
        svc.stop_server()
        r = cli(svc, "jobs", "list", "--retries", "1")
        assert r.returncode == 3 and "no answer" in one_line_error(r)
        assert svc.requester not in r.stderr
    with pytest.raises(ServerUnreachable):  # the SDK says the same
        Client(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=1)).get("x")
