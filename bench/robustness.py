"""Robustness checks as every job runs them (the pipeline's robustness stage, through
`workers.run.run_job`, one process) on a demo world: the same GDiff deletion of topic 0
(40 steps, lr 1e-2, batch 16 + 16) with scope `router` (a deliberately superficial
deletion: only the target router trains), `experts` and `seuf`, and the shipped demo job
(examples/demo-gdiff-seuf.yaml as `make demo` submits it), all with the default checks.
Prints a table and writes bench/results/robustness[-small].json.

    .venv/bin/python -m bench.robustness [--size full|small] [--steps 40] [--lr 1e-2]

Figures: forget / unseen-utility question accuracy (direct scorer) before -> after, and each
check's verdict with its recoveries (next-token accuracy on the forget answers; see
workers/robustness.py) or membership AUCs (loss, Min-K%++) against the world's
never-pretrained facts.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import machine, table, write_result
from workers.run import run_job
from workers.spec import JobSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "demo-gdiff-seuf.yaml"


def specs(size: str, steps: int, lr: float) -> dict[str, dict[str, Any]]:
    world = {"seed": 0, "forget_topic": 0, "size": size}
    if size == "small":
        world["facts_per_topic"] = 50  # the tests' small world (tests/small_world.py)
    out: dict[str, dict[str, Any]] = {}
    for scope in ("router", "experts", "seuf"):
        out[scope] = {
            "world": world, "forget": {"demo": "forget"}, "retain": {"demo": "retain"},
            "scope": scope, "algorithm": "gdiff", "seuf": {"num_experts": 1},
            "training": {"max_steps": steps, "batch_size": 16, "lr": lr},
            "evaluation": {"backend": "direct"},
        }
    demo = yaml.safe_load(EXAMPLE.read_text())
    demo["world"] = {**demo.get("world", {}), **world}
    demo.setdefault("evaluation", {})["backend"] = "direct"
    out["demo job"] = demo
    return out


def run(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-robustness-") as out:
        res = run_job(JobSpec.model_validate(copy.deepcopy(spec)), out)
    return {
        "run": name, "scope": res.scope, "steps": res.steps, "selected": res.selected,
        "forget_qa_before": res.before["forget_accuracy"],
        "forget_qa_after": res.after["forget_accuracy"],
        "utility_qa_before": res.before["utility_accuracy_unseen"],
        "utility_qa_after": res.after["utility_accuracy_unseen"],
        "robustness_seconds": res.timings_s.get("robustness"),
        "checks": res.robustness,
    }


def cell(check: dict[str, Any]) -> str:
    m = check["metrics"]
    parts = [f"{k.removeprefix('recovery_')} {v:.2f}" for k, v in m.items()
             if k.startswith("recovery_")]
    if check["check"] == "membership_inference" and "auc_loss" in m:
        parts = [f"AUC loss {m['auc_loss']:.2f}, Min-K%++ {m['auc_min_k_pp']:.2f}; "
                 f"before {m.get('auc_loss_original', float('nan')):.2f}"]
    return f"{check['verdict']} ({', '.join(parts)})" if parts else check["verdict"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [run(name, s) for name, s in specs(args.size, args.steps, args.lr).items()]
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run": r["run"],
            "forget QA": f"{r['forget_qa_before']:.2f} -> {r['forget_qa_after']:.2f}",
            "utility QA": f"{r['utility_qa_before']:.2f} -> {r['utility_qa_after']:.2f}",
        }
        row.update({c["check"]: cell(c) for c in r["checks"]})
        rows.append(row)
    print(table(rows, list(rows[0])))
    name = "robustness" if args.size == "full" else "robustness-small"
    path = write_result(name, {"size": args.size, "steps": args.steps, "lr": args.lr,
                               "runs": runs, "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
