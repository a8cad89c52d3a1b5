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
and its latency is measured from its due time, so time spent waiting for a connection or
behind a late scheduler counts. Each phase sends exactly rate x duration requests after a
1 s warm-up, then waits at most REQUEST_TIMEOUT_S for the stragglers: the loop ends by
itself. Achieved throughput = successful answers / (last answer - t0).

With `--profile`, py-spy samples the server during every phase (`--gil`: only the thread
holding the GIL, i.e. Python CPU time; raw collapsed stacks in
bench/results/api_load_profile_<backend>_<phase>.txt), the run prints where the server's
time goes by package, and the figures go to api_load_profiled.json instead (sampling
perturbs them). The server's CPU time per request is always recorded (psutil).

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


async def open_loop(
    client: httpx.AsyncClient, send: Sender, rate: float, duration: float
) -> tuple[list[float], list[int], float]:
    """Send int(rate * duration) requests, request i due at t0 + i/rate. Returns the
    latencies in seconds (from the due time), the status codes (-1: transport error or
    timeout) and the wall time from t0 to the last answer."""
    n = int(rate * duration)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    latency = [float("nan")] * n
    status = [-1] * n
    done_at = [t0] * n

    async def one(i: int, due: float) -> None:
        try:
            r = await asyncio.wait_for(send(client, i), REQUEST_TIMEOUT_S)
            status[i] = r.status_code
        except (TimeoutError, httpx.HTTPError):
            status[i] = -1
        done_at[i] = loop.time()
        latency[i] = done_at[i] - due

    tasks = []
    for i in range(n):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5)  # bounded: never hangs
    for t in tasks:
        t.cancel()
    return latency, status, max(done_at) - t0


def summarise(
    endpoint: str,
    rate: float,
    duration: float,
    latency: list[float],
    status: list[int],
    wall: float,
    cpu_s: float,
    ok_codes: frozenset[int],
) -> PhaseResult:
    ok_lat = [x * 1000 for x, s in zip(latency, status, strict=True) if s in ok_codes]
    all_lat = [x * 1000 for x in latency if x == x]  # every answered request, errors too
    lat = ok_lat or all_lat or [float("nan")]
    ok = len(ok_lat)
    return PhaseResult(
        endpoint=endpoint,
        offered_rps=rate,
        duration_s=duration,
        sent=len(status),
        ok=ok,
        errors=len(status) - ok,
        status={str(k): v for k, v in sorted(Counter(status).items())},
        p50_ms=round(percentile(lat, 50), 2),
        p90_ms=round(percentile(lat, 90), 2),
        p99_ms=round(percentile(lat, 99), 2),
        max_ms=round(max(lat), 2),
        mean_ms=round(statistics.fmean(lat), 2),
        achieved_rps=round(ok / wall, 1) if wall > 0 else 0.0,
        server_cpu_ms_per_request=round(cpu_s * 1000 / max(1, len(status)), 3),
        server_cpu_utilisation=round(cpu_s / wall, 3) if wall > 0 else 0.0,
    )


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
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:
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

        phases: list[tuple[str, str, Sender, frozenset[int]]] = [
            ("GET /v1/jobs/{id}", "get_job", get_job, frozenset({200})),
            ("GET /v1/jobs (list, 50/page)", "list_jobs", list_jobs, frozenset({200})),
            ("POST /v1/jobs", "post_job", post_job, frozenset({202})),
        ]
        out = []
        for name, slug, send, ok_codes in phases:
            await open_loop(client, send, rate, WARMUP_S)  # open connections, warm caches
            prof = RESULTS / f"api_load_profile_{kind}_{slug}.txt"
            cpu0 = _cpu_seconds(pid)
            with py_spy(pid, prof, duration, profile):
                latency, status, wall = await open_loop(client, send, rate, duration)
            cpu = _cpu_seconds(pid) - cpu0
            res = summarise(name, rate, duration, latency, status, wall, cpu, ok_codes)
            if profile:
                res.profile = summarise_profile(prof)
            out.append(res)
            print(
                f"  [{kind}] {name}: p50 {res.p50_ms} ms, p99 {res.p99_ms} ms, "
                f"{res.achieved_rps} req/s",
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
        "server CPU ms/req",
        "server CPU util",
    ]
    rows = [cols, ["---"] * len(cols)]
    for b in backends:
        for e in b["endpoints"]:
            rows.append(
                [
                    b["backend"],
                    e["endpoint"],
                    f"{e['offered_rps']:g}",
                    f"{e['achieved_rps']:g}",
                    str(e["ok"]),
                    str(e["errors"]),
                    f"{e['p50_ms']:.1f}",
                    f"{e['p90_ms']:.1f}",
                    f"{e['p99_ms']:.1f}",
                    f"{e['max_ms']:.1f}",
                    f"{e['server_cpu_ms_per_request']:.2f}",
                    f"{e['server_cpu_utilisation']:.2f}",
                ]
            )
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def targets_and_ratios(backends: list[dict[str, Any]], rate: float) -> tuple[dict, dict]:
    targets: dict[str, Any] = {
        "get_job_p99_ms_below": TARGET_GET_P99_MS,
        "at_rate_rps": TARGET_RATE,
        "measured_rate_rps": rate,
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
                rate >= TARGET_RATE and get["p99_ms"] < TARGET_GET_P99_MS and get["errors"] == 0
            ),
            "p99_over_target": round(get["p99_ms"] / TARGET_GET_P99_MS, 3),
        }
        ratios[kind] = {
            "get_p99_over_target": round(get["p99_ms"] / TARGET_GET_P99_MS, 3),
            "list_p50_over_get_p50": round(lst["p50_ms"] / get["p50_ms"], 2),
            "post_p50_over_get_p50": round(post["p50_ms"] / get["p50_ms"], 2),
            "achieved_over_offered": {
                e["endpoint"]: round(e["achieved_rps"] / e["offered_rps"], 3) for e in eps.values()
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
        "scheduler": "open loop; latency from each request's due time",
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
            f"[{kind}]: {t['get_job_p99_ms']} ms -> {verdict}"
        )
    for b in backends:
        for e in b["endpoints"]:
            prof = e.get("profile") or {}
            if prof.get("share_by_group"):
                top = ", ".join(f"{g} {s:.0%}" for g, s in list(prof["share_by_group"].items())[:6])
                print(f"profile [{b['backend']}] {e['endpoint']}: {top}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
