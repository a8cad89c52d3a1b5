"""Robustness checks (workers/robustness.py) on the default demo world: the same GDiff
deletion of topic 0 (40 steps, lr 1e-2, batch 16 + 16) with scope `router` (a deliberately
superficial deletion: only the target router trains), `experts` and `seuf`, then all four
checks with their default budgets. Prints a table and writes bench/results/robustness.json.

    .venv/bin/python -m bench.robustness [--steps 40] [--lr 1e-2]

Figures are forget/utility question accuracy (direct scorer) and the checks' metrics
(next-token accuracy on the forget answers; see workers/robustness.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import machine, table, write_result
from workers import robustness as R
from workers.attribution import attribute
from workers.data import BatchStream, read_corpus, tokenize
from workers.evaluate import accuracy
from workers.moe import get_adapter
from workers.objectives import objective_from_spec
from workers.reference import prepare_reference
from workers.scope import apply_scope
from workers.selection import select_experts
from workers.spec import JobSpec, WorldOptions
from workers.train import train
from workers.world import build_world


def run(scope: str, steps: int, lr: float) -> dict[str, Any]:
    torch.manual_seed(0)
    world = build_world(WorldOptions())
    model, tok = world.load_model(), world.load_tokenizer()
    adapter = get_adapter(model)
    spec = JobSpec.model_validate({
        "forget": {"demo": "forget"}, "retain": {"demo": "retain"}, "scope": scope,
        "algorithm": "gdiff", "training": {"max_steps": steps, "batch_size": 16, "lr": lr},
    })
    forget = read_corpus(world.corpus_path("forget"), "auto", "text", None)
    retain = read_corpus(world.corpus_path("retain"), "auto", "text", None)
    f_ans = tokenize(forget, tok, 128, "answer")
    f_all, r_all = tokenize(forget, tok, 128, "all"), tokenize(retain, tok, 128, "all")
    emap = attribute(model, adapter, f_ans.in_order(16)[:8],
                     retain_batches=tokenize(retain[:200], tok, 128, "answer").in_order(16),
                     method="auto", at_loss_positions=True)
    pairs = [(s.layer, s.expert) for s in select_experts(emap, spec.seuf)]
    q_forget, q_unseen = world.question_set("forget"), world.question_set("retain_unseen")
    acc_before = (accuracy(model, tok, q_forget), accuracy(model, tok, q_unseen))
    ts = apply_scope(model, adapter, scope, pairs)
    names = {r.name for r in ts.regions}
    original = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    objective = objective_from_spec(spec, adapter, pairs, layers=adapter.moe_layers())
    prepare_reference(objective, model, f_all, r_all)
    train(model, adapter, ts, objective, BatchStream(f_all, 16, 0), BatchStream(r_all, 16, 1),
          spec.training)
    ts.bake()
    acc_after = (accuracy(model, tok, q_forget), accuracy(model, tok, q_unseen))
    t0 = time.perf_counter()
    checks = R.run_robustness_checks(
        model, adapter, spec.evaluation.robustness, original=original, scope=scope,
        selected=pairs, forget_batches=f_ans.in_order(16)[:8],
    )
    return {
        "scope": scope, "selected": pairs,
        "forget_qa_before": acc_before[0], "forget_qa_after": acc_after[0],
        "utility_qa_before": acc_before[1], "utility_qa_after": acc_after[1],
        "checks_seconds": round(time.perf_counter() - t0, 1),
        "checks": [c.to_json() for c in checks],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [run(scope, args.steps, args.lr) for scope in ("router", "experts", "seuf")]
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "scope": r["scope"],
            "forget QA": f"{r['forget_qa_before']:.2f} -> {r['forget_qa_after']:.2f}",
            "utility QA": f"{r['utility_qa_before']:.2f} -> {r['utility_qa_after']:.2f}",
        }
        for c in r["checks"]:
            m = c["metrics"]
            recs = [f"{k.removeprefix('recovery_')} {v:.2f}" for k, v in m.items()
                    if k.startswith("recovery_")]
            row[c["check"]] = f"{c['verdict']} ({', '.join(recs)})" if recs else c["verdict"]
        rows.append(row)
    print(table(rows, list(rows[0])))
    path = write_result("robustness", {"steps": args.steps, "lr": args.lr, "runs": runs,
                                       "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
