"""`moe-unlearn jobs ...` and `moe-unlearn audit ...`: the service from any shell, through
`api.client.Client` (the one implementation; these commands only parse and print).

    moe-unlearn jobs submit SPEC [--corpus forget=FILE] [--corpus retain=FILE]
                                 [--request-id R] [--idempotency-key K] [--wait]
    moe-unlearn jobs list [--state S] [--limit N] [--all]
    moe-unlearn jobs show|watch|cancel ID        moe-unlearn jobs events ID [--since N] [--follow]
    moe-unlearn jobs results ID --out DIR [--model]
    moe-unlearn jobs certificate ID [--html] [--out FILE]
    moe-unlearn audit events [--job ID] [--since N]      moe-unlearn audit verify

Every command takes --server / --key (else $MOE_UNLEARN_URL / $MOE_UNLEARN_KEY; the key is
never printed), --retries, and --json (one JSON document on stdout, nothing else there).
Exit codes: 0 success; 1 the job ended FAILED or CANCELLED (--wait, watch, cancel --wait),
the audit chain or a certificate does not verify; 2 a user error (bad spec, missing file,
a 4xx answer: its field and reason); 3 the server could not be reached or answered 5xx.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from api.client import (
    TERMINAL_STATES,
    ApiClientError,
    Client,
    ClientError,
    Event,
    IntegrityError,
    Job,
    RetryPolicy,
    ServerUnreachable,
    verify_certificate,
)

jobs_app = typer.Typer(help="Jobs on a moe-unlearn server (over HTTP).", no_args_is_help=True)
audit_app = typer.Typer(help="The server's audit log (auditor key).", no_args_is_help=True)

MAX_SPEC_BYTES = 1 << 20
CORPUS_NAMES = ("forget", "retain")

Server = Annotated[
    str | None,
    typer.Option(
        "--server", envvar="MOE_UNLEARN_URL", help="API base URL (default: http://127.0.0.1:8000)."
    ),
]
Key = Annotated[
    str | None,
    typer.Option("--key", envvar="MOE_UNLEARN_KEY", show_default=False, help="API key."),
]
Retries = Annotated[
    int,
    typer.Option(
        "--retries", min=0, max=20, envvar="MOE_UNLEARN_RETRIES",
        help="Retries (exponential backoff) on connection errors and 429/502/503/504.",
    ),
]  # fmt: skip
AsJson = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")
]
JobId = Annotated[str, typer.Argument(help="The job id.", show_default=False)]


def _fail(code: int, msg: str) -> NoReturn:
    typer.echo(f"moe-unlearn: error: {' '.join(msg.split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def _client(server: str | None, key: str | None, retries: int) -> Iterator[Client]:
    """A client whose failures become one line and the documented exit code."""
    c: Client | None = None
    try:
        c = Client.from_env(server, key, retry=RetryPolicy(attempts=retries + 1))
        yield c
    except ApiClientError as e:
        _fail(3 if e.server_side else 2, str(e))
    except (ServerUnreachable, IntegrityError) as e:
        _fail(3, str(e))
    except ClientError as e:
        _fail(2, str(e))
    finally:
        if c is not None:
            c.close()


def _emit(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")


def _err() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _final_code(job: Job) -> int:
    return 0 if job["state"] == "SUCCEEDED" else 1


# -- submit ---------------------------------------------------------------------------
def _read_spec(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        _fail(2, f"spec file not found: {path}")
    if path.stat().st_size > MAX_SPEC_BYTES:
        _fail(2, f"spec {path} is over {MAX_SPEC_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        _fail(2, f"spec {path} is not valid YAML/JSON: {e}")
    if not isinstance(data, dict):
        _fail(2, f"spec {path} must be a mapping at the top level")
    return data


def _local_corpora(spec: dict[str, Any], spec_path: Path, given: list[str]) -> dict[str, Path]:
    """The corpora to upload: `--corpus NAME=FILE`, else the spec's local `path` entries
    (relative to the spec's folder, as `moe-unlearn run` reads them)."""
    found: dict[str, Path] = {}
    for name in CORPUS_NAMES:
        ref = spec.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("path"), str):
            p = Path(ref["path"]).expanduser()
            found[name] = p if p.is_absolute() else spec_path.parent / p
    for item in given:
        name, sep, file = item.partition("=")
        if not sep or name not in CORPUS_NAMES or not file:
            _fail(2, f"--corpus {item!r}: expected forget=FILE or retain=FILE")
        found[name] = Path(file).expanduser()
    for name, p in found.items():
        if not p.is_file():
            _fail(2, f"{name} corpus file not found: {p}")
    return found


def _check_spec(body: dict[str, Any], path: Path) -> None:
    """Validate locally first: a bad spec is one line and exit 2 before any upload."""
    from pydantic import ValidationError

    from workers.spec import JobSpec

    try:
        JobSpec.model_validate(body)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        where = ".".join(str(x) for x in first["loc"]) or "spec"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        _fail(2, f"spec {path}: {where}: {first['msg']}{more}")


@jobs_app.command("submit")
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (as `run` takes).")],
    corpus: Annotated[
        list[str] | None,
        typer.Option(
            "--corpus",
            help="NAME=FILE: a local forget or retain corpus to upload (by hash: a corpus "
            "the server already has is not sent again). The spec's local `path` corpora "
            "are uploaded too.",
        ),
    ] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Deletion request this job serves.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Retry-safe submit: the same key and spec return the same job "
            "(default: a fresh UUID, reused by this command's own retries).",
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job to its end; print before/after.")
    ] = False,
    server: Server = None,
    key: Key = None,
    retries: Retries = 4,
    as_json: AsJson = False,
) -> None:
    """Upload local corpora, submit SPEC, print the job id (--wait: follow it to the end).

    With --wait: a progress bar on stderr fed by the job's events, then the before/after
    table; exit 0 SUCCEEDED, 1 FAILED or CANCELLED."""
    body = _read_spec(spec)
    files = _local_corpora(body, spec, corpus or [])
    probe = json.loads(json.dumps(body))
    for name in files:  # what the server will see: a corpus_id in place of the file
        keep = {k: v for k, v in (probe.get(name) or {}).items() if k not in ("path", "demo")}
        probe[name] = {**keep, "corpus_id": "0" * 64}
    _check_spec(probe, spec)
    with _client(server, key, retries) as c:
        sub = c.submit_with_corpora(
            body, files, idempotency_key=idempotency_key, request_id=request_id
        )
        job = sub.job
        for name, info in sub.corpora.items():
            how = "uploaded" if info["uploaded"] else "already on the server"
            typer.echo(f"{name} corpus {files[name].name}: {how} ({info['id'][:16]}...)", err=True)
        if request_id and job.get("request_id") != request_id:  # type: ignore[misc]
            typer.echo("warning: this server does not record deletion requests", err=True)
        doc: dict[str, Any] = {"job": job, "corpora": sub.corpora}
        typer.echo(f"submitted job {job['id']} ({job['state']})", err=True)
        if not wait:
            _emit(doc) if as_json else typer.echo(job["id"])
            return
        final = _follow(c, job)
        code = _final_code(final)
        res = _result(c, final)
        if as_json:
            _emit(doc | {"job": final, "result": res})
        else:
            _print_outcome(final, res)
    raise typer.Exit(code)


# -- following a job ------------------------------------------------------------------
def _follow(c: Client, job: Job) -> Job:
    """Progress bar (stderr) fed by the job's server-sent events; the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if job["state"] in TERMINAL_STATES:
        return job
    total = int(((job.get("spec") or {}).get("training") or {}).get("max_steps") or 100)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=_err(),
    ) as bar:  # fmt: skip
        task = bar.add_task(job["state"].lower(), total=total)

        def show(ev: Event) -> None:
            kind, payload = ev.get("kind"), ev.get("payload") or {}
            if kind == "stage":
                bar.update(task, description=str(payload.get("stage", "")).replace("_", " "))
            elif kind == "step":
                desc = f"unlearning, loss {payload.get('loss', 0.0):+.3f}"
                acc = (payload.get("metrics") or {}).get("forget_accuracy")
                if acc is not None:
                    desc += f", forget accuracy {acc:.2f}"
                bar.update(task, completed=ev.get("step", 0), description=desc)
            elif kind == "end":
                bar.update(task, description=f"job {str(ev.get('job_state')).lower()}")

        return c.follow(job["id"], show)


def _result(c: Client, job: Job) -> dict[str, Any] | None:
    """The job's result.json (what `moe-unlearn run --json` prints), if it has one."""
    if job["state"] != "SUCCEEDED":
        return None
    with tempfile.TemporaryDirectory(prefix="moeu-cli-") as tmp:
        try:
            path = c.download_kind(job["id"], "result", Path(tmp) / "result.json")
        except (ApiClientError, ClientError):
            return None
        return json.loads(path.read_text(encoding="utf-8"))


def _print_outcome(job: Job, res: dict[str, Any] | None) -> None:
    from rich.console import Console

    from api.cli_engine import before_after_table

    if res is not None:
        Console().print(before_after_table(res))
    msg = f"job {job['id']}: {job['state']}"
    if job.get("failure_message"):
        msg += f" ({job.get('failure_class')}: {job['failure_message']})"
    typer.echo(msg)


@jobs_app.command("watch")
def watch(
    job_id: JobId, server: Server = None, key: Key = None, retries: Retries = 4,
    as_json: AsJson = False,
) -> None:  # fmt: skip
    """Follow a job to its end (progress bar); exit 0 SUCCEEDED, 1 FAILED or CANCELLED."""
    with _client(server, key, retries) as c:
        final = _follow(c, c.get(job_id))
        res = _result(c, final)
        _emit({"job": final, "result": res}) if as_json else _print_outcome(final, res)
    raise typer.Exit(_final_code(final))


# -- reading and cancelling -----------------------------------------------------------
def _job_line(j: Job) -> str:
    spec = j.get("spec") or {}
    return (
        f"{j['id']}  {j['state']:<10} {str(j.get('stage') or '-'):<18} "
        f"{spec.get('algorithm', '-')}/{spec.get('scope', '-')}  {j.get('created_at', '')}"
    )


@jobs_app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Page size.")] = 50,
    all_pages: Annotated[bool, typer.Option("--all", help="Every page, not the first.")] = False,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """The tenant's jobs, newest first."""
    with _client(server, key, retries) as c:
        if all_pages:
            page = {"items": list(c.iter_jobs(state=state, page=limit)), "next_cursor": None}
        else:
            page = c.list_jobs(state=state, limit=limit)
    if as_json:
        _emit(page)
        return
    for j in page["items"]:
        typer.echo(_job_line(j))
    if page.get("next_cursor"):
        typer.echo("(more: --all)", err=True)


@jobs_app.command("show")
def show(
    job_id: JobId, server: Server = None, key: Key = None, retries: Retries = 4,
    as_json: AsJson = False,
) -> None:  # fmt: skip
    """A job's state, stage, attempt and failure."""
    with _client(server, key, retries) as c:
        job = c.get(job_id)
    if as_json:
        _emit(job)
        return
    for k in ("id", "state", "stage", "attempt", "created_at", "started_at", "finished_at",
              "failure_class", "failure_message", "spec_hash"):  # fmt: skip
        if job.get(k) is not None:  # type: ignore[misc]
            typer.echo(f"{k:<16} {job.get(k)}")  # type: ignore[misc]


@jobs_app.command("cancel")
def cancel(
    job_id: JobId,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it has stopped.")] = False,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """Cancel a job (a queued one at once, a running one at its next step)."""
    with _client(server, key, retries) as c:
        job = c.cancel(job_id)
        if wait:
            job = _follow(c, job)
    _emit(job) if as_json else typer.echo(f"job {job['id']}: {job['state']}")
    if wait:
        raise typer.Exit(_final_code(job))


def _event_line(ev: Event) -> str:
    payload = json.dumps(ev.get("payload") or {}, default=str, separators=(",", ":"))
    if len(payload) > 160:
        payload = payload[:157] + "..."
    return f"{ev.get('id', '-'):>6} {ev.get('step', 0):>5} {ev.get('kind', ''):<18} {payload}"


@jobs_app.command("events")
def events(
    job_id: JobId,
    since: Annotated[int, typer.Option(min=0, help="Only events with id > since.")] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep streaming until the job ends.")
    ] = False,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """A job's progress events (steps, losses, stages), oldest first."""
    items: list[Event] = []
    with _client(server, key, retries) as c:
        source = (
            c.stream_events(job_id, since=since) if follow else c.iter_events(job_id, since=since)
        )
        for ev in source:
            if ev.get("kind") == "end" and "id" not in ev:
                break
            items.append(ev)
            if not as_json:
                typer.echo(_event_line(ev))
        state = c.get(job_id)["state"]
    if as_json:
        _emit({"items": items, "next_since": items[-1]["id"] if items else since,
               "job_state": state})  # fmt: skip


@jobs_app.command("results")
def results(
    job_id: JobId,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the results into.")],
    model: Annotated[
        bool, typer.Option("--model", help="Also download the unlearned model (large).")
    ] = False,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """Download a finished job's expert map, evaluations and artifacts.

    The expert patch always, the model with --model; each download is checked against
    its SHA-256. A job FAILED with target_not_met has them too (its best state)."""
    with _client(server, key, retries) as c:
        job = c.get(job_id)
        state = job["state"]
        # target_not_met: it ran to the end and kept its best state (the deletion is incomplete)
        partial = state == "FAILED" and job.get("failure_class") == "target_not_met"
        if state != "SUCCEEDED" and not partial:
            _fail(2, f"job {job_id} is {state}: results exist once it has SUCCEEDED")
        written = c.results(job_id, out, model=model)
    if as_json:
        _emit({"out": str(out), "files": written})
        return
    for name in written:
        typer.echo(str(out / name))


@jobs_app.command("certificate")
def certificate(
    job_id: JobId,
    html: Annotated[bool, typer.Option("--html", help="The HTML page instead of JSON.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write it to this file.")] = None,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """A finished job's deletion certificate (JSON, or --html).

    The JSON is checked: its hash, and the audit chain's state when it was issued; exit 1
    if either is wrong."""
    if html and as_json:
        _fail(2, "--html and --json exclude each other")
    with _client(server, key, retries) as c:
        text = c.certificate_html(job_id) if html else None
        cert = None if html else c.certificate(job_id)
    problems = [] if cert is None else verify_certificate(cert)
    body = text if text is not None else json.dumps(cert, indent=None if as_json else 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(body + "\n", encoding="utf-8")
        typer.echo(f"certificate written to {out}", err=True)
    if out is None or as_json:
        sys.stdout.write(body + "\n")
    for p in problems:
        typer.echo(f"moe-unlearn: certificate check failed: {p}", err=True)
    if problems:
        raise typer.Exit(1)


# -- audit ----------------------------------------------------------------------------
@audit_app.command("events")
def audit_events(
    job: Annotated[str | None, typer.Option("--job", help="One job's entries only.")] = None,
    since: Annotated[int, typer.Option(min=0, help="Only entries with seq > since.")] = 0,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """The tenant's audit entries, oldest first."""
    with _client(server, key, retries) as c:
        items = list(c.iter_audit_events(since=since, job_id=job))
    if as_json:
        _emit({"items": items, "next_since": items[-1]["seq"] if items else since})
        return
    for e in items:
        typer.echo(
            f"{e['seq']:>6} {e['ts']} {e['action']:<20} {e.get('job_id') or '-'} "
            f"{e['actor']} {e['entry_hash'][:16]}"
        )


@audit_app.command("verify")
def audit_verify(
    against: Annotated[
        Path | None,
        typer.Option("--against", help="A signed checkpoint exported earlier (audit export, "
                     "GET /v1/audit/checkpoints): also check the chain still extends it."),
    ] = None,
    signer: Annotated[
        str | None,
        typer.Option("--signer", help="With --against: the public key or fingerprint "
                     "expected to have signed the checkpoint."),
    ] = None,
    local: Annotated[
        bool,
        typer.Option("--local", help="Check this machine's database directly (an operator "
                     "with DATABASE_URL) instead of asking the server."),
    ] = False,
    server: Server = None, key: Key = None, retries: Retries = 4, as_json: AsJson = False,
) -> None:  # fmt: skip
    """Recompute the audit hash chain (on the server, or with --local on the database);
    exit 0 intact, 1 broken or no longer extending the checkpoint."""
    if local:
        from api.cli_proof import verify_local

        verify_local(against, signer)
        return
    checkpoint = None
    if against is not None:
        try:
            checkpoint = against.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read checkpoint {against}: {e}") from None
    with _client(server, key, retries) as c:
        v = c.audit_verify(against=checkpoint)
    if as_json:
        _emit(v)
    elif v["ok"]:
        typer.echo(
            f"audit chain: intact ({v['checked']} entries checked, head {v['head_seq']} "
            f"{v['head_hash'][:16]})"
        )
    elif v["first_bad_seq"] is None:  # e.g. a checkpoint that is not validly signed
        typer.echo(f"audit chain: NOT VERIFIED: {v.get('reason')}")
    else:
        typer.echo(f"audit chain: BROKEN at entry {v['first_bad_seq']}: {v.get('reason')}")
    raise typer.Exit(0 if v["ok"] else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(audit_app, name="audit")
