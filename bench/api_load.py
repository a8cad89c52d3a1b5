"""API load on loopback: p50/p99 latency and throughput of GET job, list jobs and POST job
at a fixed offered rate for a fixed duration.

    python -m bench.api_load                          # SQLite; + PostgreSQL if DATABASE_URL
    python -m bench.api_load --rate 100 --duration 20 --profile
    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python -m bench.api_load

Set-up per backend: a fresh database (a SQLite file in a temp dir; for PostgreSQL a new
database `mu_bench_*` created on the server DATABASE_URL names and dropped afterwards, so
the named database is never written), migrated, one requester key, one corpus and SEED_JOBS
jobs. The server is the real command, `moe-unlearn serve --no-ray-serve` (uvicorn, one
process; `--ray-serve` benchmarks the Ray Serve mode instead) in a subprocess; this
process is the load generator.

Load: an open-loop scheduler. Request i is *due* at t0 + i/rate whether or not earlier
requests have answered (a closed loop would slow down with the server and hide queueing),
and its latency is measured from its due time, so queueing in the server counts. Each
phase sends exactly rate x duration requests after a 1 s warm-up, then waits at most
REQUEST_TIMEOUT_S for the stragglers: the loop ends by itself. Achieved throughput =
successful answers / (last answer - t0). Latency percentiles cover EVERY request sent: a
failed request counts with its elapsed time and a timed-out one with exactly the timeout
(a censored value), so failures cannot make the percentiles look better.

The client's own limits are kept out of the server's figures, and measured: the
connection pool is sized for rate x timeout (it never queues a request; `peak_in_flight`
shows how close it came), and every request records how late the scheduler started it
(`client_lag_*`: the load generator's own CPU starvation). `p99_from_send_ms` is the
latency without that lag; a phase whose client lag p99 exceeds CLIENT_LAG_LIMIT_MS, or
that filled the pool, is flagged `client_limited` (its figures are not the server's).
Each phase uses a fresh client, and the next phase starts only once the server has
drained (a sync route, /healthz, answers promptly again; `drain_s`), so one phase's
backlog is never billed to the next.

After the three steady phases come two bursts: BURST requests due at the same instant
(list, then POST), the stall a busy machine produces (a paused process, a GC or CPU-steal
hiccup, a retry storm); they show whether the server recovers or wedges.

With `--profile`, py-spy samples the server during every phase (`--gil`: only the thread
holding the GIL, i.e. Python CPU time; raw collapsed stacks in
bench/results/api_load_profile_<backend>_<phase>.txt), the run prints where the server's
time goes by package, and the figures go to api_load_profiled.json instead (sampling
perturbs them). The server's CPU time per request is always recorded (psutil), and so
is the time its threads were runnable but waiting for a CPU (Linux schedstat): on the
shared 2-core box that separates "the server was slow" from "the machine did not run it".

Writes bench/results/api_load.json: per backend and endpoint the figures, `targets`
(GET job p99 < 50 ms at 100 req/s) with met/missed and the margin, and `ratios`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

RESULTS = Path(__file__).resolve().parent / "results"
MOE_UNLEARN = str(Path(sys.executable).with_name("moe-unlearn"))
SEED_JOBS = 60  # > the default page size (50): list jobs returns a full page
REQUEST_TIMEOUT_S = 10.0
WARMUP_S = 1.0
BURST = 200  # requests due at the same instant in the burst phases
CLIENT_LAG_LIMIT_MS = 10.0  # scheduler lateness (p99) above which a phase is client-limited
DRAIN_LIMIT_S = 60.0  # bounded wait for the server to empty its queue between phases
TRANSPORT_ERROR = -1  # status code recorded for a connection error
TIMED_OUT = -2  # status code recorded for a request that exceeded REQUEST_TIMEOUT_S
TARGET_GET_P99_MS = 50.0
TARGET_RATE = 100.0
CORPUS = b'{"text": "The capital of Zorbia is Quellton."}\n{"prompt": "Q?", "answer": "A."}\n'


@dataclass
class PhaseResult:
    endpoint: str
    offered_rps: float
    duration_s: float
    sent: int
    ok: int
    errors: int
    status: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    p99_from_send_ms: float  # latency from the moment the client started the request
    ok_p99_ms: float  # successful requests only
    client_lag_p50_ms: float  # how late the scheduler started requests (client-side)
    client_lag_p99_ms: float
    peak_in_flight: int
    client_limited: bool  # the figures include the load generator's own limits
    client_cpu_utilisation: float  # this process's CPU seconds / wall (1.0 = a full core)
    # Seconds the server's threads were runnable but not running (waiting for a CPU the
    # other work on the machine held), per wall second of the phase; a lower bound.
    server_runqueue_wait_per_s: float
    drain_s: float  # how long the server needed to empty its queue after the phase
    achieved_rps: float
    server_cpu_ms_per_request: float
    server_cpu_utilisation: float  # server CPU seconds / wall seconds (1.0 = one core)
    profile: dict[str, Any] = field(default_factory=dict)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- database


@contextmanager
def fresh_database(kind: str, workdir: Path, pg_url: str | None) -> Iterator[str]:
    """A new, migrated, empty database URL; removed afterwards (PostgreSQL)."""
    from service import db

    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
        db.upgrade(url)
        yield url
        return
    import psycopg
    from sqlalchemy.engine import make_url

    if not pg_url:
        raise ValueError("PostgreSQL run needs DATABASE_URL (or --pg-url)")
    base = make_url(db.normalize_url(pg_url))
    name = f"mu_bench_{uuid.uuid4().hex[:10]}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_key(url: str) -> str:
    from service import db, keys

    engine = db.make_engine(url)
    with db.session_scope(db.make_session_factory(engine)) as s:
        _, secret = keys.create_key(s, "requester", "bench", actor="bench")
    engine.dispose()
    return secret


# ----------------------------------------------------------------------------- server


@contextmanager
def server(url: str, data_dir: Path, ray_serve: bool, log_path: Path) -> Iterator[tuple[str, int]]:
    """`moe-unlearn serve` on a free loopback port; yields (base URL, server PID)."""
    port = free_port()
    env = dict(os.environ)
    env.update(DATABASE_URL=url, MOE_UNLEARN_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1")
    # The bench measures the server's capacity from one key: the per-tenant admission limits
    # (queued jobs, request rate) would answer 429 by design long before that.
    env.update(
        MOE_UNLEARN_MAX_QUEUED_JOBS="1000000",
        MOE_UNLEARN_RATE_PER_KEY="100000",
        MOE_UNLEARN_RATE_BURST="100000",
    )
    if ray_serve:
        ray_tmp = tempfile.mkdtemp(prefix="mu-bl-", dir="/tmp")  # short: unix socket paths
        env["MOE_UNLEARN_RAY_TEMP_DIR"] = ray_tmp
    mode = "--ray-serve" if ray_serve else "--no-ray-serve"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [MOE_UNLEARN, "serve", mode, "--port", str(port)], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + (120 if ray_serve else 30)
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; log: {log_path}")
            time.sleep(0.2)
        # uvicorn: the console script is the server. Ray Serve: the replica answers.
        pid = proc.pid
        if ray_serve:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "ServeReplica" in child.name():
                    pid = child.pid
        yield base, pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # both modes shut down cleanly on SIGINT
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        if ray_serve:
            shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- load

Sender = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class LoadRun:
    """What one open-loop run observed, per request (index = request number)."""

    latency: list[float]  # seconds from the due time to the answer (or the timeout)
    start_lag: list[float]  # seconds from the due time to the client starting the request
    status: list[int]  # HTTP status, TRANSPORT_ERROR or TIMED_OUT
    wall: float  # seconds from t0 to the last answer
    peak_in_flight: int
    pool_limit: int


def pool_size_for(rate: float, n: int) -> int:
    """Client connections needed so the client's pool never holds back a request: every
    request may be in flight for up to the timeout."""
    return int(min(n, math.ceil(rate * REQUEST_TIMEOUT_S))) + 10


def new_client(base: str, headers: dict[str, str], pool: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    return httpx.AsyncClient(
        base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    )


async def open_loop(
    client: httpx.AsyncClient, send: Sender, n: int, rate: float | None, pool_limit: int
) -> LoadRun:
    """Send n requests, request i due at t0 + i/rate (rate None: all due at t0, a burst),
    whatever happened to the earlier ones. Bounded: returns at most REQUEST_TIMEOUT_S + 5 s
    after the last request was due."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    latency = [float("nan")] * n
    start_lag = [float("nan")] * n
    status = [TRANSPORT_ERROR] * n
    done_at = [t0] * n
    in_flight = 0
    peak = 0

    async def one(i: int, due: float) -> None:
        nonlocal in_flight, peak
        start = loop.time()
        start_lag[i] = start - due
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                r = await send(client, i)
            status[i] = r.status_code
            done_at[i] = loop.time()
        except TimeoutError:
            status[i] = TIMED_OUT
            # Censored at the timeout: the cancellation's own clean-up is not server time.
            done_at[i] = start + REQUEST_TIMEOUT_S
        except httpx.HTTPError:
            status[i] = TRANSPORT_ERROR
            done_at[i] = loop.time()
        finally:
            in_flight -= 1
        latency[i] = done_at[i] - due

    tasks = []
    for i in range(n):
        due = t0 + (i / rate if rate else 0.0)
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    _, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)  # never hangs
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    return LoadRun(latency, start_lag, status, max(done_at) - t0, peak, pool_limit)


async def wait_until_drained(base: str) -> float:
    """Seconds until the server answers /healthz (a sync route: it needs a free worker
    thread, so it waits behind any backlog) within 0.5 s; at most DRAIN_LIMIT_S."""
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as c:
        while time.monotonic() - t0 < DRAIN_LIMIT_S:
            t = time.monotonic()
            try:
                r = await c.get("/healthz")
                if r.status_code == 200 and time.monotonic() - t < 0.5:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return round(time.monotonic() - t0, 2)


def summarise(
    endpoint: str,
    rate: float,
    duration: float,
    run: LoadRun,
    cpu_s: float,
    ok_codes: frozenset[int],
    drain_s: float,
    client_cpu_s: float,
    server_wait_s: float,
) -> PhaseResult:
    """The figures of one phase. A burst starts all its requests at once, so its client lag
    is inherent (one event loop starting n requests) and only a full client pool flags it."""
    ms = [x * 1000 for x in run.latency]
    lag = [x * 1000 for x in run.start_lag if x == x] or [0.0]
    from_send = [a * 1000 - b * 1000 for a, b in zip(run.latency, run.start_lag, strict=True)]
    ok_ms = [x for x, s in zip(ms, run.status, strict=True) if s in ok_codes] or [float("nan")]
    ok = sum(1 for s in run.status if s in ok_codes)
    labels = {TRANSPORT_ERROR: "transport_error", TIMED_OUT: "timeout"}
    lag_p99 = percentile(lag, 99)
    wall = run.wall
    return PhaseResult(
        endpoint=endpoint,
        offered_rps=rate,
        duration_s=duration,
        sent=len(run.status),
        ok=ok,
        errors=len(run.status) - ok,
        status={labels.get(k, str(k)): v for k, v in sorted(Counter(run.status).items())},
        p50_ms=round(percentile(ms, 50), 2),
        p90_ms=round(percentile(ms, 90), 2),
        p99_ms=round(percentile(ms, 99), 2),
        max_ms=round(max(ms), 2),
        mean_ms=round(statistics.fmean(ms), 2),
        p99_from_send_ms=round(percentile(from_send, 99), 2),
        ok_p99_ms=round(percentile(ok_ms, 99), 2),
        client_lag_p50_ms=round(percentile(lag, 50), 2),
        client_lag_p99_ms=round(lag_p99, 2),
        peak_in_flight=run.peak_in_flight,
        client_limited=bool(
            (rate > 0 and lag_p99 > CLIENT_LAG_LIMIT_MS) or run.peak_in_flight >= run.pool_limit
        ),
        client_cpu_utilisation=round(client_cpu_s / wall, 3) if wall > 0 else 0.0,
        server_runqueue_wait_per_s=round(server_wait_s / wall, 3) if wall > 0 else 0.0,
        drain_s=drain_s,
        achieved_rps=round(ok / wall, 1) if wall > 0 else 0.0,
        server_cpu_ms_per_request=round(cpu_s * 1000 / max(1, len(run.status)), 3),
        server_cpu_utilisation=round(cpu_s / wall, 3) if wall > 0 else 0.0,
    )


def _runqueue_wait_ns(pid: int) -> dict[str, int]:
    """Per thread: nanoseconds it spent runnable but waiting for a CPU (Linux schedstat):
    how much the shared machine, not the process's own work or locks, delayed it. Empty
    where schedstat is unavailable."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just exited, or no schedstat
    return out


def _runqueue_wait_delta_s(before: dict[str, int], after: dict[str, int]) -> float:
    """Seconds of run-queue wait between two samples, over the threads alive at the end (a
    lower bound: a thread that exited in between takes its count with it)."""
    return sum(v - before.get(tid, 0) for tid, v in after.items()) / 1e9


def _cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


# ----------------------------------------------------------------------------- profile


@contextmanager
def py_spy(pid: int, out: Path, seconds: float, enabled: bool) -> Iterator[None]:
    """Sample `pid` with py-spy (raw collapsed stacks) while the block runs."""
    if not enabled:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "-p",
            str(pid),
            "-f",
            "raw",
            "-o",
            str(out),
            "-r",
            "200",
            "-d",
            str(int(seconds) + 1),
            "--gil",  # only the thread holding the GIL: Python CPU time, not lock waits
            "--nonblocking",  # never pause the server
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Frames are "function (file:line)". A sample's self time goes to the group of its leaf
# frame (where the interpreter was); "inclusive" counts a sample once for every group it
# passes through (app code and the database layer include what they call).
_GROUPS = {
    "sqlalchemy": ("sqlalchemy/",),
    "db driver": ("sqlite3/", "psycopg/", "psycopg_pool/"),
    "pydantic": ("pydantic/", "pydantic_core/"),
    "fastapi+starlette": ("fastapi/", "starlette/"),
    "uvicorn+h11/httptools": ("uvicorn/", "h11/", "httptools/"),
    "asyncio": ("asyncio/",),
    "anyio (thread hand-off)": ("anyio/",),
    "app (api/, service/)": ("(api/", "(service/", "(workers/"),
    "json": ("json/",),
    "logging": ("logging/",),
    "threading": ("threading.py", "concurrent/"),
}


def _group(frame: str) -> str:
    for g, needles in _GROUPS.items():
        if any(n in frame for n in needles):
            return g
    return "other"


def summarise_profile(path: Path) -> dict[str, Any]:
    """Self and inclusive share of the server's active samples per group, and the top
    self-time functions (py-spy records active threads only)."""
    if not path.exists():
        return {"error": f"no profile written at {path}"}
    total = 0
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        leaves[frames[-1]] += count
        self_t[_group(frames[-1])] += count
        for g in {_group(f) for f in frames}:
            incl[g] += count
    if total == 0:
        return {"samples": 0}
    return {
        "samples": total,
        "self_share": {g: round(c / total, 3) for g, c in self_t.most_common()},
        "inclusive_share": {g: round(c / total, 3) for g, c in incl.most_common()},
        "top_self": [[f, round(c / total, 3)] for f, c in leaves.most_common(10)],
    }


# ----------------------------------------------------------------------------- run


def run_backend(
    kind: str, rate: float, duration: float, pg_url: str | None, ray_serve: bool, profile: bool
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mu-api-load-"))
    try:
        with fresh_database(kind, work, pg_url) as url:
            secret = create_key(url)
            with server(url, work / "data", ray_serve, work / "server.log") as (base, pid):
                return asyncio.run(_phases(kind, base, pid, secret, rate, duration, profile))
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _phases(
    kind: str, base: str, pid: int, secret: str, rate: float, duration: float, profile: bool
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"}
    async with new_client(base, headers, 10) as client:
        r = await client.post("/v1/corpora", content=CORPUS)
        r.raise_for_status()
        body = {"forget": {"corpus_id": r.json()["id"]}, "algorithm": "npo"}
        ids = []
        for _ in range(SEED_JOBS):
            r = await client.post("/v1/jobs", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])

    async def get_job(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.get(f"/v1/jobs/{ids[i % len(ids)]}")

    async def list_jobs(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.get("/v1/jobs")

    async def post_job(c: httpx.AsyncClient, i: int) -> httpx.Response:
        return await c.post("/v1/jobs", json=body)

    n = int(rate * duration)
    # (name, file slug, sender, OK codes, requests, rate; None = all at once)
    phases: list[tuple[str, str, Sender, frozenset[int], int, float | None]] = [
        ("GET /v1/jobs/{id}", "get_job", get_job, frozenset({200}), n, rate),
        ("GET /v1/jobs (list, 50/page)", "list_jobs", list_jobs, frozenset({200}), n, rate),
        ("POST /v1/jobs", "post_job", post_job, frozenset({202}), n, rate),
        (
            f"burst: {BURST} x GET /v1/jobs at once",
            "burst_list",
            list_jobs,
            frozenset({200}),
            BURST,
            None,
        ),
        (
            f"burst: {BURST} x POST /v1/jobs at once",
            "burst_post",
            post_job,
            frozenset({202}),
            BURST,
            None,
        ),
    ]
    out = []
    for name, slug, send, ok_codes, count, phase_rate in phases:
        pool = pool_size_for(phase_rate or float(count), count)
        async with new_client(base, headers, pool) as client:
            warm = max(1, int((phase_rate or rate) * WARMUP_S))
            await open_loop(client, send, warm, phase_rate or rate, pool)  # warm connections
            await wait_until_drained(base)
            prof = RESULTS / f"api_load_profile_{kind}_{slug}.txt"
            cpu0 = _cpu_seconds(pid)
            client_cpu0 = time.process_time()
            wait0 = _runqueue_wait_ns(pid)
            span = count / phase_rate if phase_rate else 5.0
            with py_spy(pid, prof, span, profile):
                run = await open_loop(client, send, count, phase_rate, pool)
            cpu = _cpu_seconds(pid) - cpu0
            client_cpu = time.process_time() - client_cpu0
            server_wait = _runqueue_wait_delta_s(wait0, _runqueue_wait_ns(pid))
        drain = await wait_until_drained(base)  # the next phase starts on an idle server
        res = summarise(
            name, phase_rate or 0.0, span, run, cpu, ok_codes, drain, client_cpu, server_wait
        )
        if profile:
            res.profile = summarise_profile(prof)
        out.append(res)
        flag = " CLIENT-LIMITED" if res.client_limited else ""
        print(
            f"  [{kind}] {name}: p50 {res.p50_ms} ms, p99 {res.p99_ms} ms, "
            f"{res.achieved_rps} req/s, {res.errors} errors, drained in {drain} s{flag}",
            file=sys.stderr,
            flush=True,
        )
    return {"backend": kind, "endpoints": [asdict(r) for r in out]}


def table(backends: list[dict[str, Any]]) -> str:
    cols = [
        "backend",
        "endpoint",
        "offered/s",
        "achieved/s",
        "ok",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p99 from send ms",
        "client lag p99 ms",
        "drain s",
        "server CPU ms/req",
        "server CPU util",
        "client CPU util",
        "server runq wait s/s",
    ]
    rows = [cols, ["---"] * len(cols)]
    for b in backends:
        for e in b["endpoints"]:
            flag = " (client-limited)" if e["client_limited"] else ""
            rows.append(
                [
                    b["backend"],
                    e["endpoint"] + flag,
                    f"{e['offered_rps']:g}" if e["offered_rps"] else "burst",
                    f"{e['achieved_rps']:g}",
                    str(e["ok"]),
                    str(e["errors"]),
                    f"{e['p50_ms']:.1f}",
                    f"{e['p90_ms']:.1f}",
                    f"{e['p99_ms']:.1f}",
                    f"{e['max_ms']:.1f}",
                    f"{e['p99_from_send_ms']:.1f}",
                    f"{e['client_lag_p99_ms']:.1f}",
                    f"{e['drain_s']:g}",
                    f"{e['server_cpu_ms_per_request']:.2f}",
                    f"{e['server_cpu_utilisation']:.2f}",
                    f"{e['client_cpu_utilisation']:.2f}",
                    f"{e['server_runqueue_wait_per_s']:.2f}",
                ]
            )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _keeps_up(e: dict[str, Any]) -> bool:
    """Served the offered rate (within 5%) with no error."""
    return bool(e["errors"] == 0 and e["achieved_rps"] >= 0.95 * e["offered_rps"])


def targets_and_ratios(backends: list[dict[str, Any]], rate: float) -> tuple[dict, dict]:
    targets: dict[str, Any] = {
        "get_job_p99_ms_below": TARGET_GET_P99_MS,
        "at_rate_rps": TARGET_RATE,
        "measured_rate_rps": rate,
        "keeps_up": "achieved >= 95% of offered and zero errors (list and POST)",
    }
    ratios: dict[str, Any] = {}
    by = {b["backend"]: {e["endpoint"]: e for e in b["endpoints"]} for b in backends}
    for kind, eps in by.items():
        get = eps["GET /v1/jobs/{id}"]
        lst = eps["GET /v1/jobs (list, 50/page)"]
        post = eps["POST /v1/jobs"]
        targets[kind] = {
            "get_job_p99_ms": get["p99_ms"],
            "met": bool(
                rate >= TARGET_RATE
                and get["p99_ms"] < TARGET_GET_P99_MS
                and get["errors"] == 0
                and not get["client_limited"]
            ),
            "p99_over_target": round(get["p99_ms"] / TARGET_GET_P99_MS, 3),
            "list_keeps_up": _keeps_up(lst),
            "post_keeps_up": _keeps_up(post),
            "bursts_without_errors": all(
                e["errors"] == 0 for name, e in eps.items() if name.startswith("burst")
            ),
        }
        ratios[kind] = {
            "get_p99_over_target": round(get["p99_ms"] / TARGET_GET_P99_MS, 3),
            "list_p50_over_get_p50": round(lst["p50_ms"] / get["p50_ms"], 2),
            "post_p50_over_get_p50": round(post["p50_ms"] / get["p50_ms"], 2),
            "achieved_over_offered": {
                name: round(e["achieved_rps"] / e["offered_rps"], 3)
                for name, e in eps.items()
                if e["offered_rps"]
            },
        }
    if "sqlite" in by and "postgresql" in by:
        ratios["postgresql_over_sqlite_p99"] = {
            ep: round(by["postgresql"][ep]["p99_ms"] / by["sqlite"][ep]["p99_ms"], 2)
            for ep in by["sqlite"]
        }
    return targets, ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=TARGET_RATE, help="offered requests/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per endpoint")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL server to also run on [default: DATABASE_URL]",
    )
    p.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    p.add_argument("--ray-serve", action="store_true", help="serve through Ray Serve")
    p.add_argument("--profile", action="store_true", help="py-spy the server in each phase")
    a = p.parse_args(argv)
    if a.rate <= 0 or a.duration <= 0:
        raise SystemExit("--rate and --duration must be > 0")
    kinds = ([] if a.no_sqlite else ["sqlite"]) + (
        ["postgresql"] if a.pg_url and a.pg_url.startswith("postgresql") else []
    )
    if not kinds:
        raise SystemExit("nothing to run: --no-sqlite without a PostgreSQL DATABASE_URL")
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = list(os.getloadavg())
    backends = []
    for kind in kinds:
        print(f"{kind}: {a.rate:g} req/s x {a.duration:g} s per endpoint ...", file=sys.stderr)
        backends.append(run_backend(kind, a.rate, a.duration, a.pg_url, a.ray_serve, a.profile))
    targets, ratios = targets_and_ratios(backends, a.rate)
    cmd = "python -m bench.api_load " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "benchmark": "api_load",
        "command": cmd.strip(),
        "server": "moe-unlearn serve " + ("--ray-serve" if a.ray_serve else "--no-ray-serve"),
        "scheduler": "open loop; latency from each request's due time, over every request "
        "sent (errors at their elapsed time, timeouts censored at request_timeout_s)",
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "burst_requests": BURST,
        "client_lag_limit_ms": CLIENT_LAG_LIMIT_MS,
        "server_pythonpath": os.environ.get("PYTHONPATH"),
        "rate_rps": a.rate,
        "profiled": a.profile,
        "duration_s": a.duration,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "backends": backends,
        "targets": targets,
        "ratios": ratios,
    }
    # A profiled run perturbs the figures (py-spy's sampling costs CPU): its own file.
    name = "api_load" + ("_ray_serve" if a.ray_serve else "") + ("_profiled" if a.profile else "")
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(backends))
    for kind in kinds:
        t = targets[kind]
        verdict = "met" if t["met"] else f"MISSED ({t['p99_over_target']}x the target)"
        print(
            f"target GET job p99 < {TARGET_GET_P99_MS:g} ms at {TARGET_RATE:g} req/s "
            f"[{kind}]: {t['get_job_p99_ms']} ms -> {verdict}; list keeps up: "
            f"{t['list_keeps_up']}, POST keeps up: {t['post_keeps_up']}, bursts without "
            f"errors: {t['bursts_without_errors']}"
        )
    for b in backends:
        for e in b["endpoints"]:
            prof = e.get("profile") or {}
            if prof.get("inclusive_share"):
                shares = list(prof["inclusive_share"].items())[:6]
                top = ", ".join(f"{g} {s:.0%}" for g, s in shares)
                print(f"profile [{b['backend']}] {e['endpoint']}: {top}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
