"""Training step time and peak memory: full-parameter GA vs SEUF without / with activation
caching, same model, same batch, two model sizes, target layer low / middle / high.

    python -m bench.train_step [--sizes demo,large] [--rounds 3] [--reps 2] [--threads 1]

Time: one process, configurations interleaved in rounds (see bench/common.py); a step is
what workers/train.py does per step: objective forward (GA, + SEUF's router anchor with
alpha = 1 for SEUF), loss, zero_grad, backward, grad clipping, AdamW step over the scope's
trainable tensors only. The cache build (one no-grad pass stopped at the target layer)
is a one-off cost, reported apart.

Memory: every configuration runs in a FRESH child process (same imports, model, batch):
after building everything the kernel's RSS high-water mark is reset (/proc/self/clear_refs),
two steps run (the first allocates the optimizer state), then VmHWM is read. `peak` =
VmHWM - RSS right after the imports, i.e. weights + cache + activations + gradients +
optimizer state, without the interpreter and libraries (identical in every child).
tracemalloc is not used: it does not see torch's allocations.

Writes bench/results/train_step.json with a `ratios` object:
    full_over_seuf_cached[size][depth], seuf_uncached_over_cached[size][depth],
    peak_memory_train_over_inference[size][variant@depth].
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.common import (
    build_model,
    interleaved,
    machine,
    median,
    n_params,
    peak_rss_bytes,
    ratio_basis,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
    size_corpus,
    table,
    write_result,
)
from workers.activation_cache import ActivationCache
from workers.attribution import attribute
from workers.data import TokenizedCorpus
from workers.moe import get_adapter
from workers.moe.base import MoEAdapter
from workers.objectives import Batches, make_objective
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions

LR = 1e-5  # tiny: the weights barely move between timed steps
VARIANTS = ("full", "seuf_uncached", "seuf_cached")


def depths(n_layers: int) -> dict[str, int]:
    """low / middle / high target layers (layer 0 would leave nothing to cache)."""
    return {"low": 1, "middle": n_layers // 2, "high": n_layers - 1}


def top_experts(model: nn.Module, adapter: MoEAdapter, corpus: TokenizedCorpus) -> dict[int, int]:
    """Per MoE layer, the expert with the highest affinity on the batch (a realistic
    target: it receives a full share of the tokens)."""
    emap = attribute(model, adapter, [corpus.collate(range(len(corpus)))], method="affinity")
    return {
        layer: max(range(emap.num_experts), key=lambda e, r=r: emap.scores[r][e])
        for r, layer in enumerate(emap.layers)
    }


def make_step(
    model: nn.Module,
    adapter: MoEAdapter,
    variant: str,
    target: int | None,
    expert: int | None,
    corpus: TokenizedCorpus,
) -> tuple[Callable[[], None], Callable[[], None], float]:
    """(run one training step, teardown, cache build seconds) for one configuration."""
    batch = corpus.collate(range(len(corpus)))
    batches = Batches(batch)
    opts = ObjectiveOptions()
    build_s = 0.0
    cache: ActivationCache | None = None
    if variant == "inference":

        def infer() -> None:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        return infer, lambda: None, 0.0
    if variant == "full":
        scope = apply_scope(model, adapter, "full")
        obj = make_objective("ga", opts, adapter)
    else:
        assert target is not None and expert is not None
        scope = apply_scope(model, adapter, "seuf", [(target, expert)])
        obj = make_objective(
            "ga", opts, scope.adapter, [(target, expert)], anchor_weight=1.0, layers=scope.layers
        )
        if variant == "seuf_cached":
            t0 = time.perf_counter()
            cache = ActivationCache.build(model, scope.adapter, target, corpus, len(corpus))
            build_s = time.perf_counter() - t0
    params = scope.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=LR)
    model.train()

    def run() -> None:
        if cache is not None:
            with cache.active(model, scope.adapter, strict=True):
                out = obj.forward(model, batches)
        else:
            out = obj.forward(model, batches)
        loss, _ = obj(out, batches)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def teardown() -> None:
        scope.discard()  # SEUF: bitwise restore; full: weights reloaded by the caller
        if cache is not None:
            cache.close()
        model.eval()

    return run, teardown, build_s


# --- timing (in process) ----------------------------------------------------------------
def time_size(size: str, rounds: int, reps: int) -> dict[str, Any]:
    model = build_model(size)
    adapter = get_adapter(model)
    corpus = size_corpus(size, model)
    tokens = sum(len(s.input_ids) for s in corpus.samples)
    n_layers = len(adapter.decoder_layers())
    d = depths(n_layers)
    experts = top_experts(model, adapter, corpus)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    builds: dict[str, list[float]] = {}

    def setup(variant: str, target: int | None) -> Callable[[], Any]:
        def go() -> tuple[Callable[[], None], Callable[[], None]]:
            expert = experts.get(target) if target is not None else None
            run, teardown, build_s = make_step(model, adapter, variant, target, expert, corpus)
            if variant == "seuf_cached":
                builds.setdefault(f"{variant}@{target}", []).append(build_s)

            def td() -> None:
                teardown()
                if variant == "full":  # full trains in place: put the original weights back
                    model.load_state_dict(original)

            return run, td

        return go

    setups: dict[str, Callable[[], Any]] = {
        "inference": setup("inference", None),
        "full": setup("full", None),
    }
    for name, layer in d.items():
        setups[f"seuf_uncached@{name}"] = setup("seuf_uncached", layer)
        setups[f"seuf_cached@{name}"] = setup("seuf_cached", layer)
    wall, cpu = interleaved(setups, rounds=rounds, reps=reps, warmup=1)
    basis = ratio_basis()
    samples = cpu if basis == "cpu" else wall
    med = {k: median(v) for k, v in samples.items()}
    rows = []
    for k, v in samples.items():
        variant, _, depth = k.partition("@")
        layer = d.get(depth)
        row = {
            "size": size,
            "config": variant,
            "depth": depth or "-",
            "layer": layer,
            "step_ms": 1000 * med[k],
            "wall_ms": 1000 * median(wall[k]),
            "min_ms": 1000 * min(v),
            "max_ms": 1000 * max(v),
            "n": len(v),
            "vs_full": med["full"] / med[k],
        }
        if variant == "seuf_cached":
            row["cache_build_ms"] = 1000 * median(builds[f"seuf_cached@{layer}"])
        rows.append(row)
    ratios = {
        "full_over_seuf_cached": {n: med["full"] / med[f"seuf_cached@{n}"] for n in d},
        "seuf_uncached_over_cached": {
            n: med[f"seuf_uncached@{n}"] / med[f"seuf_cached@{n}"] for n in d
        },
        "full_over_seuf_uncached": {n: med["full"] / med[f"seuf_uncached@{n}"] for n in d},
    }
    return {
        "size": size,
        "params": n_params(model),
        "layers": n_layers,
        "batch": [len(corpus), max(len(s.input_ids) for s in corpus.samples)],
        "tokens": tokens,
        "depths": d,
        "experts": {str(d[n]): experts[d[n]] for n in d},
        "rows": rows,
        "ratios": ratios,
        "ratio_basis": basis,
        "samples_s": {"wall": wall, "cpu": cpu},
    }


# --- memory (one fresh child process per configuration) -----------------------------------
def child_memory(size: str, variant: str, target: int | None, threads: int) -> dict[str, Any]:
    """Runs in the child: build, reset VmHWM, two steps, report."""
    torch.set_num_threads(threads)
    rss_imports = rss_bytes()
    model = build_model(size)
    adapter = get_adapter(model)
    corpus = size_corpus(size, model)
    # Every child runs the same preparation (attribution pass included), so they all reach
    # the measured phase with the same allocator history.
    experts = top_experts(model, adapter, corpus)
    expert = experts.get(target) if target is not None else None
    run, _, _ = make_step(model, adapter, variant, target, expert, corpus)
    release_free_memory()  # freed heap from the preparation must not pad the baseline
    rss_ready = rss_bytes()
    reset_peak_rss()
    for _ in range(2):
        run()
    peak = peak_rss_bytes()
    return {
        "rss_imports": rss_imports,
        "rss_ready": rss_ready,
        "peak_rss": peak,
        "peak": peak - rss_imports,
        "over_ready": peak - rss_ready,
    }


def measure_memory(size: str, n_layers: int, threads: int) -> dict[str, dict[str, Any]]:
    configs: list[tuple[str, int | None, str]] = [("inference", None, "inference"),
                                                  ("full", None, "full")]  # fmt: skip
    for name, layer in depths(n_layers).items():
        configs += [
            ("seuf_uncached", layer, f"seuf_uncached@{name}"),
            ("seuf_cached", layer, f"seuf_cached@{name}"),
        ]
    out: dict[str, dict[str, Any]] = {}
    for variant, layer, key in configs:
        arg = json.dumps({"size": size, "variant": variant, "target": layer, "threads": threads})
        proc = subprocess.run(
            [sys.executable, "-m", "bench.train_step", "--child", arg],
            capture_output=True,
            text=True,
            check=True,
        )
        out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="demo,large")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory children")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        c = json.loads(args.child)
        print(json.dumps(child_memory(c["size"], c["variant"], c["target"], c["threads"])))
        return 0

    torch.set_num_threads(args.threads)
    start = machine()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    ratios: dict[str, dict[str, Any]] = {
        "full_over_seuf_cached": {},
        "seuf_uncached_over_cached": {},
        "full_over_seuf_uncached": {},
        "peak_memory_train_over_inference": {},
    }
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        r = time_size(size, args.rounds, args.reps)
        for k in ("full_over_seuf_cached", "seuf_uncached_over_cached", "full_over_seuf_uncached"):
            ratios[k][size] = r["ratios"][k]
        if not args.no_memory:
            mem = measure_memory(size, r["layers"], args.threads)
            r["memory"] = mem
            inf = mem["inference"]["peak"]
            ratios["peak_memory_train_over_inference"][size] = {
                k: v["peak"] / inf for k, v in mem.items() if k != "inference"
            }
            for row in r["rows"]:
                key = row["config"] + ("" if row["depth"] == "-" else f"@{row['depth']}")
                m = mem.get(key)
                if m is not None:
                    row["peak_mib"] = m["peak"] / 2**20
                    row["mem_vs_inference"] = m["peak"] / inf
        results[size] = r
        b, s = r["batch"]
        print(f"\n## {size}: {r['params'] / 1e6:.1f}M parameters, {r['layers']} layers, "
              f"batch {b} x <= {s} tokens ({r['tokens']} real)")  # fmt: skip
        cols = ["config", "depth", "layer", "step_ms", "wall_ms", "min_ms", "max_ms", "n",
                "vs_full", "cache_build_ms", "peak_mib", "mem_vs_inference"]  # fmt: skip
        print(table(r["rows"], cols))
    payload = {
        "benchmark": "train_step",
        "command": "python -m bench.train_step " + " ".join(argv or sys.argv[1:]),
        "method": {
            "time": "median of interleaved rounds in one process (bench/common.py); step_ms "
            "and ratios are process CPU time with 1 torch thread (wall_ms alongside)",
            "memory": "fresh child per config; VmHWM after clear_refs reset minus RSS after "
            "imports (weights + cache + activations + grads + optimizer state)",
            "step": "GA objective (+ router anchor alpha=1 for SEUF), backward, clip, AdamW",
        },
        "machine_start": start,
        "machine_end": machine(),
        "wall_s": time.perf_counter() - t0,
        "ratios": ratios,
        "results": results,
    }
    path = write_result("train_step", payload)
    print("\nratios:", json.dumps(ratios, indent=1))
    print(f"load {start['loadavg']} -> {payload['machine_end']['loadavg']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
