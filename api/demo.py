"""`make demo`: the whole service flow on the embedded default, end to end, over HTTP.

    builds (or reuses) the demo world -> a fresh SQLite database and blob store in a temp
    folder -> `moe-unlearn serve` (API on 127.0.0.1) and `moe-unlearn dispatcher` (local Ray,
    2 CPUs) as child processes -> an API key -> POST the example job -> follow its events
    with a progress bar -> print the before/after table, the selected expert, the audit
    verification, and where the certificate and the expert-map heatmap are.

Both child processes are stopped (SIGTERM, then SIGKILL by PID) whatever happens, so the
demo leaves no processes behind. With --keep (`make demo-console`) they stay up after the
job: the demo prints the console page of its job and an auditor key to sign in with, and
stops them on Ctrl-C. Usage: python -m api.demo [--spec FILE] [--dir DIR] [--keep]
[--workers 1|2] (default 2: the job runs on Ray Train, as the service runs big jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from api.client import Client

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT / "examples" / "demo-gdiff-seuf.yaml"
CLI = [sys.executable, "-c", "from api.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base_url: str, server: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Wait until the API process answers /healthz; RuntimeError (naming `log`) when it
    exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(f"{base_url}/healthz", timeout=2)
            return
        except httpx.HTTPError:
            if server.poll() is not None:
                raise RuntimeError(f"the API exited ({server.returncode}); see {log}") from None
            if time.monotonic() > deadline:
                msg = f"the API did not start in {timeout_s:.0f} s; see {log}"
                raise RuntimeError(msg) from None
            time.sleep(0.25)


def _stop(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        print(f"demo: {name} did not stop in 60 s; killing pid {proc.pid}", file=sys.stderr)
        proc.kill()
        proc.wait(timeout=10)


def heatmap(expert_map: dict[str, Any], path: Path) -> Path:
    """The expert map as a layers x experts SVG heatmap (the console's), selected outlined."""
    from api.console.heatmap import Cell, svg

    selected = {
        (s["layer"], s["expert"]) if isinstance(s, dict) else tuple(s[:2])
        for s in expert_map.get("selected", [])
    }
    cells = [
        Cell(layer, e, float(score), (layer, e) in selected)
        for layer, row in zip(expert_map["layers"], expert_map["scores"], strict=True)
        for e, score in enumerate(row)
    ]
    path.write_text(svg(cells, expert_map.get("method")) or "")
    return path


def follow(client: Client, job_id: str, max_steps: int) -> dict[str, Any]:
    """Progress bar over the job's server-sent events; returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("queued", total=max_steps)
        for ev in client.stream_events(job_id):
            kind = ev.get("kind")
            payload = ev.get("payload") or {}
            if kind == "stage":
                bar.update(task, description=str(payload.get("stage", "")).replace("_", " "))
            elif kind == "step":
                acc = (payload.get("metrics") or {}).get("forget_accuracy")
                desc = f"unlearning, loss {payload.get('loss', 0.0):+.3f}"
                if acc is not None:
                    desc += f", forget accuracy {acc:.2f}"
                bar.update(task, completed=ev.get("step", 0), description=desc)
            elif kind == "selection_warning":  # a fallback may run a longer step budget
                steps = (payload.get("training") or {}).get("max_steps")
                if isinstance(steps, int) and steps > 0:
                    bar.update(task, total=steps)
            elif kind == "end":
                bar.update(task, description=f"job {str(ev.get('job_state')).lower()}")
    return client.get(job_id)


@dataclass
class Embedded:
    """A running embedded service: where it listens and its keys."""

    base_url: str
    requester_key: str
    auditor_key: str
    work: Path
    processes: tuple[subprocess.Popen, ...] = ()  # the API and the dispatcher


@contextmanager
def embedded_service(work: Path, ray_cpus: int = 2) -> Iterator[Embedded]:
    """A fresh SQLite database and blob store in `work`, the API (uvicorn, loopback) and the
    dispatcher (local Ray) as child processes; both are stopped on exit."""
    port = _free_port()
    env = os.environ | {
        "DATABASE_URL": f"sqlite:///{work / 'moe-unlearn.db'}",
        "MOE_UNLEARN_DATA_DIR": str(work / "data"),
        "MOE_UNLEARN_RAY_NUM_CPUS": str(ray_cpus),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    subprocess.run([*CLI, "db", "upgrade"], env=env, check=True, capture_output=True)

    def key(role: str) -> str:
        return subprocess.run(
            [*CLI, "keys", "create", "--role", role, "--tenant", "demo"],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip()

    requester, auditor = key("requester"), key("auditor")
    log = open(work / "processes.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [*CLI, "serve", "--no-ray-serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    dispatcher = subprocess.Popen([*CLI, "dispatcher"], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server, 60, Path(log.name))
        yield Embedded(base, requester, auditor, work, (server, dispatcher))
    finally:
        _stop(dispatcher, "dispatcher")
        _stop(server, "server")
        log.close()


@dataclass
class DemoResult:
    """What the demo did: the job, its result.json and expert map, the audit check, the
    certificate's signature and robustness verdicts, and the files it wrote (certificate as
    JSON and HTML, expert-map heatmap)."""

    job: dict[str, Any]
    result: dict[str, Any]
    expert_map: dict[str, Any]
    audit: dict[str, Any]
    certificate: Path
    certificate_html: Path
    heatmap: Path
    signature_valid: bool = False
    robustness: dict[str, str] | None = None  # check -> verdict
    exit_code: int = 0


def run_demo(
    spec: dict[str, Any], work: Path, console: Any, spec_name: str = "", keep: bool = False
) -> DemoResult:
    """Submit `spec` to a fresh embedded service in `work` over HTTP and follow it to the end;
    print (to `console`, a rich Console) and return what it did. The job's runner follows
    spec.distributed.num_workers (2: Ray Train). With `keep`, the API and dispatcher stay up
    for the web console until Ctrl-C."""
    workers = int(spec.get("distributed", {}).get("num_workers", 1))
    with embedded_service(work) as svc:
        base = svc.base_url
        with Client(base, svc.requester_key) as client, Client(base, svc.auditor_key) as audit:
            job = client.submit(spec, idempotency_key="demo")
            runner = f"Ray Train, {workers} CPU workers (DDP)" if workers > 1 else "one process"
            console.print(f"submitted job {job['id']} over HTTP ({spec_name}; {runner})")
            max_steps = int(spec.get("training", {}).get("max_steps", 100))
            job = follow(client, job["id"], max_steps)
            if job["state"] != "SUCCEEDED":
                console.print(f"[red]job {job['state']}: {job.get('failure_message')}[/red]")
                return DemoResult(job, {}, {}, {}, Path(), Path(), Path(), exit_code=1)
            arts = {a["kind"]: a for a in client.artifacts(job["id"])}
            res = json.loads(client.download(job["id"], arts["result"]["id"],
                                             work / "result.json").read_text())
            emap = json.loads(client.download(job["id"], arts["expert_map"]["id"],
                                              work / "expert_map.json").read_text())
            from api.cli_engine import before_after_table

            console.print(before_after_table(res))
            for s in res["selected"]:
                console.print(
                    f"selected expert: layer {s['layer']} expert {s['expert']} "
                    f"(score {s['score']:.3f}, {emap['method']} attribution)"
                )
            warning = (res.get("selection") or {}).get("selection_warning")
            if warning:  # num_experts auto found no small expert set and said what it did
                console.print(f"[yellow]selection: {warning}[/yellow]")
            verify = audit.audit_verify()
            state = "intact" if verify["ok"] else f"BROKEN at entry {verify['first_bad_seq']}"
            console.print(f"audit chain: {state} ({verify['checked']} entries checked)")
            cert_json, cert_html = save_certificate(client, job["id"], work)
            svg = heatmap(emap, work / "expert_map.svg")
            console.print(f"certificate: {cert_json} and {cert_html}")
            cert = json.loads(cert_json.read_text())
            for line in certificate_summary(cert, cert_json):
                console.print(line)
            console.print(f"expert-map heatmap: {svg}")
            from service.signing import verify_document

            verdicts = {c["check"]: c["verdict"] for c in cert.get("robustness") or []}
            valid = verify_document(cert).valid
        done = DemoResult(job, res, emap, verify, cert_json, cert_html, svg, valid, verdicts)
        if keep:
            done.exit_code = keep_serving(console, svc, job["id"])
            return done
        console.print("to browse this job in the web console: make demo-console "
                      "(python -m api.demo --keep)")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="job spec to submit")
    ap.add_argument("--dir", type=Path, default=None, help="keep the database/blobs here")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="leave the API and dispatcher running after the job (the console); Ctrl-C stops",
    )
    ap.add_argument(
        "--workers",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: the job runs on Ray Train with 2 CPU workers (DDP); 1: in one process",
    )
    args = ap.parse_args(argv)
    spec = yaml.safe_load(args.spec.read_text())
    spec.setdefault("distributed", {})["num_workers"] = args.workers

    from rich.console import Console

    console = Console()
    work = args.dir or Path(tempfile.mkdtemp(prefix="moe-unlearn-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]moe-unlearn demo[/bold] (state in {work})")
    return run_demo(spec, work, console, args.spec.name, keep=args.keep).exit_code


def keep_serving(console: Any, svc: Embedded, job_id: str) -> int:
    """Leave the API and dispatcher up for the console until Ctrl-C (the caller's `with`
    then stops them)."""
    console.print(f"\n[bold]web console[/bold]: {svc.base_url}/console/jobs/{job_id}",
                  soft_wrap=True)
    console.print(f"sign in with this auditor key: {svc.auditor_key}", soft_wrap=True)
    console.print("the API and dispatcher keep running; Ctrl-C stops them", soft_wrap=True)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    # Also when started in the background (SIGINT ignored) or stopped by SIGTERM.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while all(p.poll() is None for p in svc.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping the API and dispatcher")
        return 0
    console.print(f"[red]the API or the dispatcher stopped; see {svc.work / 'processes.log'}[/red]")
    return 1


def save_certificate(client: Client, job_id: str, work: Path) -> tuple[Path, Path]:
    """The job's signed certificate as certificate.json and certificate.html in `work`."""
    cert_json, cert_html = work / "certificate.json", work / "certificate.html"
    cert_json.write_text(json.dumps(client.certificate(job_id), indent=1))
    cert_html.write_text(client.certificate_html(job_id))
    return cert_json, cert_html


def certificate_summary(cert: dict[str, Any], path: Path) -> list[str]:
    """What the demo prints about the certificate (issue 15): its signature and every
    robustness check with its verdict (and why, when a check did not run)."""
    from service.signing import verify_document

    sig = verify_document(cert)
    lines = [f"certificate signature: {'valid' if sig.valid else 'INVALID'} ({sig.fingerprint}); "
             f"check it offline with `moe-unlearn certificate verify {path}`"]
    for c in cert["robustness"]:
        why = f" ({c['reason']})" if c["verdict"] != "pass" and c.get("reason") else ""
        lines.append(f"robustness: {c['check']} {c['verdict']}{why}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
