"""What a Ray Train checkpoint costs, with Ray Train's default controller poll (2 s) and
with the 0.2 s poll `run_job_distributed` sets.

    python -m bench.checkpoint_cost [--steps 20] [--every 2] [--runs 2]

A checkpoint's report() waits until the controller has taken the previous report, and
the controller takes reports when it polls the workers. Runs the GDiff + SEUF demo job
(2 DDP workers, `--steps` steps, a checkpoint every `--every` steps, no early stop) on a
private local Ray with 2 CPUs, the two poll settings interleaved, and compares the
training stage's time (rank 0's timings) and the whole run. Writes
bench/results/checkpoint_cost.json. The demo world must be built (moe-unlearn world build).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from api.demo import DEFAULT_SPEC
from bench.common import machine, median, table, write_result
from workers.runners.ray_train import CONTROLLER_POLL_ENV, CONTROLLER_POLL_S
from workers.spec import JobSpec

RAY_TRAIN_DEFAULT_POLL_S = "2.0"


def one_run(spec: JobSpec, poll_s: str, n: int) -> dict[str, float]:
    from workers.runners.ray_train import run_job_distributed

    os.environ[CONTROLLER_POLL_ENV] = poll_s  # read when the trainer starts
    work = Path(tempfile.mkdtemp(prefix="moeu-ckcost-"))
    t0 = time.perf_counter()
    res = run_job_distributed(spec, work / "out", None, None, work / "ckpt", run_name=f"r{n}")
    return {"training_s": float(res.timings_s["unlearning"]),
            "run_s": time.perf_counter() - t0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args(argv)
    data: dict[str, Any] = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["training"] |= {"max_steps": args.steps, "stop": {"forget_accuracy_target": None}}
    data["evaluation"] = {"backend": "direct"}
    data["distributed"] = {"num_workers": 2, "checkpoint_every": args.every}
    spec = JobSpec.model_validate(data)

    import ray

    before = machine()
    ray.init(address="local", num_cpus=2, _temp_dir=tempfile.mkdtemp(prefix="moeu-ck-"),
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    polls = {"ray_default": RAY_TRAIN_DEFAULT_POLL_S, "moe_unlearn": CONTROLLER_POLL_S}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in polls}
    try:
        for n in range(args.runs):
            for name, poll in polls.items():  # interleaved: same machine load for both
                runs[name].append(one_run(spec, poll, len(runs[name]) + 10 * n))
                print(f"run {n + 1}, poll {poll} s: {runs[name][-1]}", flush=True)
    finally:
        ray.shutdown()
    med = {k: {m: round(median([r[m] for r in rs]), 3) for m in ("training_s", "run_s")}
           for k, rs in runs.items()}  # fmt: skip
    checkpoints = args.steps // args.every
    rows = [{"controller poll": f"{polls[k]} s", "training s": m["training_s"],
             "whole run s": m["run_s"]} for k, m in med.items()]  # fmt: skip
    print(table(rows, ["controller poll", "training s", "whole run s"]))
    ratios = {
        "training_default_over_ours": round(
            med["ray_default"]["training_s"] / med["moe_unlearn"]["training_s"], 2
        ),
        "extra_seconds_per_checkpoint_default": round(
            (med["ray_default"]["training_s"] - med["moe_unlearn"]["training_s"]) / checkpoints, 3
        ),
    }
    path = write_result("checkpoint_cost", {
        "benchmark": "checkpoint_cost",
        "command": f"python -m bench.checkpoint_cost --steps {args.steps} --every {args.every} "
                   f"--runs {args.runs}",
        "machine_start": before,
        "machine_end": machine(),
        "checkpoints_per_run": checkpoints,
        "runs": runs,
        "median": med,
        "ratios": ratios,
    })  # fmt: skip
    print(f"ratios: {ratios}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
