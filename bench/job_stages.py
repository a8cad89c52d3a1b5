"""End-to-end job time on the embedded default, split by stage.

    python -m bench.job_stages [--spec examples/demo-gdiff-seuf.yaml] [--runs 2] [--workers 1 2]

Starts the embedded service (SQLite, the API on loopback, the dispatcher with a local Ray
of 2 CPUs; see api/demo.py), submits the spec over HTTP `--runs` times one after the other
for each worker count (1: one process; 2: Ray Train with 2 DDP workers; interleaved),
and splits each job's wall time into: queue (submitted -> claimed), Ray start-up and model
load, evaluation before, attribution, training, evaluation after, packaging, and the
dispatcher's recording (result -> finished). Stage boundaries come from the stage events
the dispatcher records and the worker's own timings in result.json. Writes
bench/results/job_stages.json. The demo world must be built (moe-unlearn world build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from api.client import Client
from api.demo import DEFAULT_SPEC, embedded_service
from bench.common import machine

RESULTS = Path(__file__).parent / "results" / "job_stages.json"
WORKER_STAGES = (
    "loading",
    "evaluating_before",
    "attribution",
    "unlearning",
    "evaluating_after",
    "robustness",
    "packaging",
)


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def one_job(client: Client, spec: dict[str, Any], work: Path, n: str) -> dict[str, float]:
    t0 = time.time()
    job = client.submit(spec, idempotency_key=f"bench-{n}")
    job = client.wait(job["id"], timeout=1800, interval=0.2)
    wall = time.time() - t0
    if job["state"] != "SUCCEEDED":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job.get('failure_message')}")
    events = client.events(job["id"])["items"]
    arts = {a["kind"]: a for a in client.artifacts(job["id"])}
    res = json.loads(client.download(job["id"], arts["result"]["id"], work / f"r{n}.json")
                     .read_text())
    created = _ts(job["created_at"])
    started = _ts(job["started_at"])
    finished = _ts(job["finished_at"])
    first_stage = min(_ts(e["created_at"]) for e in events if e["kind"] == "stage")
    result_at = max(_ts(e["created_at"]) for e in events if e["kind"] == "result")
    timings = res["timings_s"]
    worker_total = sum(timings.get(s, 0.0) for s in WORKER_STAGES)
    # Between the claim and the first stage event: the Ray task and its process start.
    out = {
        "queue": started - created,
        "ray_task_start": max(0.0, first_stage - started),
        "model_load": timings.get("loading", 0.0),
        "evaluation_before": timings.get("evaluating_before", 0.0),
        "attribution": timings.get("attribution", 0.0),
        "training": timings.get("unlearning", 0.0),
        "evaluation_after": timings.get("evaluating_after", 0.0),
        "robustness": timings.get("robustness", 0.0),
        "packaging": timings.get("packaging", 0.0),
        "recording": max(0.0, finished - result_at),
        "worker_total": worker_total,
        "job_total": finished - created,
        "client_wall": wall,
        "steps": float(res["steps"]),
    }
    return {k: round(v, 3) for k, v in out.items()}


def _table(runs: list[dict[str, float]], median: dict[str, float]) -> None:
    print(f"{'stage':<20}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs)))
          + f"{'median':>10}")
    for k in median:
        print(f"{k:<20}" + "".join(f"{r[k]:>10.2f}" for r in runs) + f"{median[k]:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument(
        "--workers", type=int, nargs="+", choices=(1, 2), default=[1, 2],
        help="num_workers to compare: 1 = one process, 2 = Ray Train with 2 DDP workers",
    )  # fmt: skip
    args = ap.parse_args(argv)
    spec = yaml.safe_load(args.spec.read_text())
    work = Path(tempfile.mkdtemp(prefix="moe-unlearn-bench-"))
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in args.workers}
    before = machine()
    with embedded_service(work) as svc, Client(svc.base_url, svc.requester_key) as client:
        for n in range(args.runs):
            for w in args.workers:  # interleaved: both runners meet the same machine load
                job_spec = {**spec, "distributed": {**spec.get("distributed", {}),
                                                    "num_workers": w}}  # fmt: skip
                runs[w].append(one_job(client, job_spec, work, f"w{w}-{n}"))
                print(f"run {n + 1}, {w} worker(s): {runs[w][-1]['job_total']:.1f} s")
    median: dict[int, dict[str, float]] = {}
    share: dict[str, dict[str, float]] = {}
    for w, rs in runs.items():
        median[w] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        total = median[w]["job_total"]
        share[str(w)] = {k: round(v / total, 3) for k, v in median[w].items()
                         if k not in ("job_total", "client_wall", "worker_total", "steps")}
        print(f"\n{w} worker(s) ({'Ray Train, DDP' if w > 1 else 'one process'}), seconds:")
        _table(rs, median[w])
    ratios: dict[str, Any] = {
        "stage_share_of_job": share,
        "worker_over_job": {str(w): round(m["worker_total"] / m["job_total"], 3)
                            for w, m in median.items()},
    }  # fmt: skip
    if 1 in median and 2 in median:
        ratios["ray_train_2_over_process_job_total"] = round(
            median[2]["job_total"] / median[1]["job_total"], 3
        )
        ratios["ray_train_2_over_process_training"] = round(
            median[2]["training"] / median[1]["training"], 3
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "job_stages",
        "command": f"python -m bench.job_stages --spec {args.spec} --runs {args.runs} "
                   f"--workers {' '.join(map(str, args.workers))}",
        "machine_start": before,
        "machine_end": machine(),
        "spec": str(args.spec),
        "runs": {str(w): rs for w, rs in runs.items()},
        "median_s": {str(w): m for w, m in median.items()},
        "ratios": ratios,
    }, indent=1))  # fmt: skip
    print(f"\nratios: {json.dumps(ratios)}\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
