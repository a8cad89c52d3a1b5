"""Attribution throughput against a plain forward pass of the same model on the same batches.

    python -m bench.attribution [--sizes demo,large] [--rounds 3] [--reps 2] [--threads 1]

Configurations, interleaved in rounds in one process (bench/common.py), all no-grad, eval:
- forward:       model(input_ids, attention_mask) over every batch (the plain forward pass
                 of the causal LM, LM head included)
- forward_base:  the bare decoder model.model(...) (no LM head), for reference
- attribution:   workers.attribution.attribute(..., method="affinity") over the same batches
                 (one routed pass with a router tap per MoE layer + the gate-mass sums)
Tokens/s counts real (non-pad) tokens; time_ms and ratios are process CPU time with one
torch thread (wall_ms alongside; see bench/common.py why). Writes
bench/results/attribution.json with ratios.attribution_over_forward[size] (time ratio; the
target is <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import (
    BATCH,
    build_model,
    interleaved,
    machine,
    median,
    n_params,
    random_corpus,
    ratio_basis,
    table,
    write_result,
)
from workers.attribution import attribute
from workers.moe import get_adapter

N_BATCHES = {"demo": 4, "large": 2}


def bench_size(size: str, rounds: int, reps: int) -> dict[str, Any]:
    model = build_model(size)
    adapter = get_adapter(model)
    b, lo, hi = BATCH[size]
    corpus = random_corpus(b * N_BATCHES[size], lo, hi, int(model.config.vocab_size), seed=1)
    batches = corpus.in_order(b)
    tokens = int(sum(int(x["attention_mask"].sum()) for x in batches))

    def forward() -> None:
        with torch.no_grad():
            for x in batches:
                model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], use_cache=False)

    def forward_base() -> None:
        with torch.no_grad():
            for x in batches:
                model.model(
                    input_ids=x["input_ids"], attention_mask=x["attention_mask"], use_cache=False
                )

    def attribution() -> None:
        attribute(model, adapter, batches, method="affinity", token_budget=10**12)

    def fixed(fn: Callable[[], None]) -> Callable[[], tuple[Callable[[], None], Any]]:
        return lambda: (fn, lambda: None)

    wall, cpu = interleaved(
        {
            "forward": fixed(forward),
            "forward_base": fixed(forward_base),
            "attribution": fixed(attribution),
        },
        rounds=rounds,
        reps=reps,
        warmup=1,
    )
    basis = ratio_basis()
    samples = cpu if basis == "cpu" else wall
    med = {k: median(v) for k, v in samples.items()}
    rows = [
        {
            "size": size,
            "config": k,
            "time_ms": 1000 * med[k],
            "wall_ms": 1000 * median(wall[k]),
            "min_ms": 1000 * min(v),
            "max_ms": 1000 * max(v),
            "n": len(v),
            "tokens_per_s": tokens / med[k],
            "vs_forward": med[k] / med["forward"],
        }
        for k, v in samples.items()
    ]
    return {
        "size": size,
        "params": n_params(model),
        "batches": len(batches),
        "batch_size": b,
        "tokens": tokens,
        "rows": rows,
        "attribution_over_forward": med["attribution"] / med["forward"],
        "attribution_over_base_forward": med["attribution"] / med["forward_base"],
        "ratio_basis": basis,
        "samples_s": {"wall": wall, "cpu": cpu},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="demo,large")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = machine()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    ratios: dict[str, dict[str, float]] = {
        "attribution_over_forward": {},
        "attribution_over_base_forward": {},
    }
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        r = bench_size(size, args.rounds, args.reps)
        results[size] = r
        ratios["attribution_over_forward"][size] = r["attribution_over_forward"]
        ratios["attribution_over_base_forward"][size] = r["attribution_over_base_forward"]
        print(f"\n## {size}: {r['params'] / 1e6:.1f}M parameters, {r['batches']} batches of "
              f"{r['batch_size']}, {r['tokens']} real tokens")  # fmt: skip
        cols = ["config", "time_ms", "wall_ms", "min_ms", "max_ms", "n", "tokens_per_s",
                "vs_forward"]  # fmt: skip
        print(table(r["rows"], cols))
    payload = {
        "benchmark": "attribution",
        "command": "python -m bench.attribution " + " ".join(argv or sys.argv[1:]),
        "machine_start": start,
        "machine_end": machine(),
        "wall_s": time.perf_counter() - t0,
        "ratios": ratios,
        "results": results,
    }
    path = write_result("attribution", payload)
    print("\nratios:", json.dumps(ratios, indent=1))
    print(f"load {start['loadavg']} -> {payload['machine_end']['loadavg']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
