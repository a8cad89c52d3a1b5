"""The whole flow from a shell, against real processes: `moe-unlearn serve` (SQLite) and
`moe-unlearn dispatcher` (a private local Ray), on the smallest demo world. A submit with
local corpora and --wait runs to SUCCEEDED (exit 0, the before/after table); its results,
certificate and audit come back through the commands and the SDK; a job cancelled while
`submit --wait` follows it exits 1."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.client import Client, verify_certificate
from tests.client.kit import CLI, ROOT, Service, run_cli, service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service(tmp_path_factory.mktemp("svc"), dispatcher=True) as s:
        yield s


def test_submit_wait_results_certificate_and_audit(svc: Service, job_files: Path, tmp_path):
    env = svc.env | {"MOE_UNLEARN_URL": svc.url, "MOE_UNLEARN_KEY": svc.requester}
    r = run_cli(
        "jobs", "submit", str(job_files / "spec.yaml"), "--wait",
        "--corpus", f"forget={job_files / 'forget.jsonl'}",
        "--corpus", f"retain={job_files / 'retain.jsonl'}",
        env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + (svc.log.read_text())
    assert "gdiff / seuf: before -> after" in r.stdout and "forget accuracy" in r.stdout
    assert "SUCCEEDED" in r.stdout
    assert "forget corpus" in r.stderr and "uploaded" in r.stderr
    job_id = r.stdout.strip().splitlines()[-1].split()[1].rstrip(":")

    r = run_cli("jobs", "show", job_id, "--json", env=env)
    job = json.loads(r.stdout)
    assert (job["state"], job["spec"]["training"]["max_steps"]) == ("SUCCEEDED", 4)

    out = tmp_path / "results"
    r = run_cli("jobs", "results", job_id, "--out", str(out), "--json", env=env)
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    patch = out / "artifacts" / "expert_patch.safetensors"
    assert (
        files["artifacts/expert_patch.safetensors"]
        == hashlib.sha256(patch.read_bytes()).hexdigest()
    )
    assert "artifacts/expert_map.json" in files and "expert_map.json" in files
    assert not any(n.endswith(".tar") for n in files)  # the model only with --model
    emap = json.loads((out / "expert_map.json").read_text())["items"]
    assert sum(x["selected"] for x in emap) == 1
    phases = {e["phase"] for e in json.loads((out / "evaluations.json").read_text())["items"]}
    assert phases == {"before", "after", "robustness"}  # the checks run by default

    r = run_cli("jobs", "certificate", job_id, "--out", str(tmp_path / "cert.json"), env=env)
    assert r.returncode == 0, r.stderr
    cert = json.loads((tmp_path / "cert.json").read_text())
    assert cert["job_id"] == job_id and cert["deletion_performed"] is True
    assert verify_certificate(cert, patch=patch) == []
    cert["scores"]["after"] = {}  # one fact changed: the check says so
    assert verify_certificate(cert, patch=patch) != []
    r = run_cli("jobs", "certificate", job_id, "--html", env=env)
    assert r.returncode == 0 and "<html" in r.stdout.lower()

    r = run_cli("jobs", "events", job_id, "--json", env=env)
    polled = json.loads(r.stdout)["items"]
    assert [e["kind"] for e in polled].count("step") == 4
    r = run_cli("jobs", "events", job_id, "--follow", "--json", env=env)  # the SSE stream
    assert json.loads(r.stdout)["items"] == polled
    r = run_cli("jobs", "watch", job_id, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["result"]["steps"] == 4
    audit_env = env | {"MOE_UNLEARN_KEY": svc.auditor}
    r = run_cli("audit", "verify", env=audit_env)
    assert r.returncode == 0 and r.stdout.startswith("audit chain: intact"), r.stderr
    r = run_cli("audit", "events", "--job", job_id, "--json", env=audit_env)
    actions = [e["action"] for e in json.loads(r.stdout)["items"]]
    assert actions[0] == "job_submitted" and actions[-1] == "job_succeeded"

    # The SDK over the same server: the patch downloads and checks against the certificate.
    with Client(svc.url, svc.requester) as c:
        got = c.download_kind(job_id, "expert_patch", tmp_path / "sdk" / "patch.safetensors")
        assert got.read_bytes() == patch.read_bytes()
        assert verify_certificate(c.certificate(job_id), patch=got) == []


def test_a_job_cancelled_while_submit_waits_exits_1(svc: Service, job_files: Path):
    env = svc.env | {"MOE_UNLEARN_URL": svc.url, "MOE_UNLEARN_KEY": svc.requester}
    proc = subprocess.Popen(
        [*CLI, "jobs", "submit", str(job_files / "spec-long.yaml"), "--wait", "--json",
         "--corpus", f"forget={job_files / 'forget.jsonl'}",
         "--corpus", f"retain={job_files / 'retain.jsonl'}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        job_id = None
        for line in proc.stderr:
            if line.startswith("submitted job "):  # "submitted job ID (STATE)"
                job_id = line.split()[2]
                break
        assert job_id, "submit printed no job id"
        with Client(svc.url, svc.requester) as c:  # cancel once it is running
            for ev in c.stream_events(job_id):
                if ev.get("kind") == "step" or ev.get("kind") == "end":
                    break
        r = run_cli("jobs", "cancel", job_id, env=env)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    doc = json.loads(out)
    assert doc["job"]["state"] == "CANCELLED" and doc["result"] is None
    forget = (job_files / "forget.jsonl").read_bytes()
    assert doc["job"]["spec"]["forget"]["corpus_id"] == hashlib.sha256(forget).hexdigest()
    r = run_cli("jobs", "watch", job_id, env=env)
    assert r.returncode == 1 and "CANCELLED" in r.stdout
