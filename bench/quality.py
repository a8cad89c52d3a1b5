"""The quality table: every algorithm x {full, seuf, seuf_no_anchor, random, top3} on the
demo world, plus the attribution ablation (paper affinity vs contrastive) for GDiff + SEUF,
and the seed check of the shipped SEUF examples.

    python -m bench.quality [--seeds 0] [--algorithms gdiff npo ...] [--variants seuf full ...]

Every run starts from the shipped example spec (examples/demo-<algorithm>-seuf.yaml, or
-full.yaml for the full variant), so the bench measures exactly what a user runs; the
variants change only the field they are named after. All runs use the same stop rule as the
examples (forget accuracy <= 0.30 = chance + 0.05, or the step budget) and the direct
evaluation backend (the same numbers as lm-eval, tested equal, much faster).

Writes bench/results/quality.json (runs + `ratios`), quality.md (a table like the paper's
Table 3) and quality.png (utility vs forget). Results are saved after every run and merged
with earlier ones by key (algorithm/variant/seed), so a partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALGORITHMS = ("gdiff", "npo", "simnpo", "ga", "rmu")
VARIANTS = ("seuf", "full", "seuf_no_anchor", "random", "top3", "affinity")
# The seed check: the shipped SEUF example on other worlds, same topic. Targets from issue 3.
KEPT_TARGET = {0: 0.95}
KEPT_TARGET_OTHER = 0.90
FORGET_TARGET = 0.30  # chance 0.25 + 0.05


def base_spec(algorithm: str, variant: str) -> dict[str, Any]:
    """The shipped example the variant starts from, as plain data."""
    import yaml

    scope = "full" if variant == "full" else "seuf"
    path = EXAMPLES / f"demo-{algorithm}-{scope}.yaml"
    if not path.is_file():
        raise ValueError(f"example spec missing: {path}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def variant_spec(algorithm: str, variant: str, seed: int, topic: int = 0) -> dict[str, Any]:
    """The example spec with the variant's one change, the world seed and forget topic, and
    direct scoring."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")
    d = copy.deepcopy(base_spec(algorithm, variant))
    d.setdefault("world", {})["seed"] = seed
    d["world"]["forget_topic"] = topic
    d.setdefault("evaluation", {})["backend"] = "direct"
    seuf = d.setdefault("seuf", {})
    if variant == "seuf_no_anchor":
        seuf["anchor_weight"] = 0.0
    elif variant == "random":
        seuf["selection"] = "random"
        seuf["seed"] = 0
    elif variant == "top3":
        seuf["num_experts"] = 3
    elif variant == "affinity":
        seuf["attribution"] = "affinity"  # the paper's mean gate score, every token
        seuf["attribution_positions"] = "all"
    return d


def run_one(algorithm: str, variant: str, seed: int, topic: int = 0) -> dict[str, Any]:
    """One job through workers.run.run_job (the code path of `moe-unlearn run`)."""
    from workers.run import run_job
    from workers.spec import JobSpec

    spec_data = variant_spec(algorithm, variant, seed, topic)
    spec = JobSpec.model_validate(spec_data)
    out = Path(tempfile.mkdtemp(prefix=f"quality-{algorithm}-{variant}-"))
    t0 = time.perf_counter()
    try:
        res = run_job(spec, out).to_json()
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the model copy is not needed: numbers are
    wall = time.perf_counter() - t0
    b, a = res["before"], res["after"]
    return {
        "algorithm": algorithm,
        "variant": variant,
        "seed": seed,
        "topic": topic,
        "spec": spec.resolved(),
        "selected": res["selected"],
        "attribution": res["attribution"],
        "before": {k: b.get(k) for k in _METRICS},
        "after": {k: a.get(k) for k in _METRICS},
        "routing_overlap_forget": res["routing_overlap_forget"],
        "routing_overlap_retain": res["routing_overlap_retain"],
        "tunable_ratio": res["tunable_ratio"],
        "steps": res["steps"],
        "stopped_by": res["stopped_by"],
        "wall_s": round(wall, 2),
        "timings_s": res["timings_s"],
    }


_METRICS = ("forget_accuracy", "utility_accuracy", "utility_accuracy_unseen")


def _kept(r: dict[str, Any], key: str) -> float | None:
    b, a = r["before"].get(key), r["after"].get(key)
    return a / b if b else None


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per run: utility kept (after / before, unseen and retain pool), forget reached, and
    whether the issue's goal (forget <= chance + 0.05 with >= 95% unseen kept) is met."""
    out: dict[str, Any] = {}
    for key, r in runs.items():
        ku = _kept(r, "utility_accuracy_unseen")
        need = KEPT_TARGET.get(r["seed"], KEPT_TARGET_OTHER)
        out[key] = {
            "utility_kept_unseen": ku,
            "utility_kept_retain_pool": _kept(r, "utility_accuracy"),
            "forget_after": r["after"]["forget_accuracy"],
            "forget_gap_to_target": max(0.0, r["after"]["forget_accuracy"] - FORGET_TARGET),
            "kept_gap_to_95": max(0.0, 0.95 - ku) if ku is not None else None,
            "meets_goal_95": bool(
                ku is not None and ku >= 0.95 and r["after"]["forget_accuracy"] <= FORGET_TARGET
            ),
            "meets_seed_target": bool(
                ku is not None and ku >= need and r["after"]["forget_accuracy"] <= FORGET_TARGET
            ),
            "seed_target_kept": need,
        }
    return out


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(runs: dict[str, dict[str, Any]], rat: dict[str, Any]) -> str:
    cols = [
        "run",
        "forget before->after",
        "utility unseen before->after (kept)",
        "utility retain pool after",
        "overlap forget",
        "tunable",
        "steps",
        "stop",
        "wall s",
        "selected (layer:expert)",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = {a: i for i, a in enumerate(ALGORITHMS)}
    vorder = {v: i for i, v in enumerate(VARIANTS)}
    for key in sorted(
        runs,
        key=lambda k: (
            runs[k].get("topic", 0),
            runs[k]["seed"],
            order.get(runs[k]["algorithm"], 99),
            vorder.get(runs[k]["variant"], 99),
        ),
    ):
        r, q = runs[key], rat[key]
        b, a = r["before"], r["after"]
        sel = ", ".join(f"{s['layer']}:{s['expert']}" for s in r["selected"]) or "all"
        lines.append(
            "| "
            + " | ".join(
                [
                    key,
                    f"{_f(b['forget_accuracy'], 2)} -> {_f(a['forget_accuracy'], 2)}",
                    f"{_f(b['utility_accuracy_unseen'])} -> "
                    f"{_f(a['utility_accuracy_unseen'])} ({_f(q['utility_kept_unseen'])})",
                    _f(r["after"]["utility_accuracy"]),
                    _f(r["routing_overlap_forget"], 2),
                    f"{100 * r['tunable_ratio']:.2f}%",
                    str(r["steps"]),
                    r["stopped_by"],
                    _f(r["wall_s"], 0),
                    sel,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"gdiff": "o", "npo": "s", "simnpo": "D", "ga": "^", "rmu": "v"}
    colors = {
        "seuf": "tab:green",
        "full": "tab:red",
        "seuf_no_anchor": "tab:orange",
        "random": "tab:gray",
        "top3": "tab:blue",
        "affinity": "tab:purple",
    }
    fig, ax = plt.subplots(figsize=(7, 5))
    seen: set[str] = set()
    for r in runs.values():
        x, y = r["after"]["forget_accuracy"], r["after"]["utility_accuracy_unseen"]
        if x is None or y is None:
            continue
        label = r["variant"] if r["variant"] not in seen else None
        seen.add(r["variant"])
        ax.scatter(
            x,
            y,
            marker=markers.get(r["algorithm"], "x"),
            color=colors.get(r["variant"], "black"),
            label=label,
            alpha=0.85 if r["seed"] == 0 else 0.45,
        )
        ax.annotate(
            f"{r['algorithm']}{'' if r['seed'] == 0 else ' s' + str(r['seed'])}",
            (x, y),
            fontsize=6,
            xytext=(3, 2),
            textcoords="offset points",
        )
    ax.axvline(FORGET_TARGET, ls="--", color="k", lw=0.8)
    ax.axvline(0.25, ls=":", color="k", lw=0.8)
    ax.set_xlabel("forget accuracy after (lower is better; chance 0.25, target 0.30)")
    ax.set_ylabel("utility after, unseen retain facts (higher is better)")
    ax.set_title("Demo world: utility vs forget (marker = algorithm, colour = variant)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(runs: dict[str, dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rat = ratios(runs)
    payload = {
        "benchmark": "quality",
        "machine": machine(),
        "forget_target": FORGET_TARGET,
        "runs": runs,
        "ratios": rat,
    }
    (RESULTS / "quality.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (RESULTS / "quality.md").write_text(markdown(runs, rat))
    if runs:
        plot(runs, RESULTS / "quality.png")


def load_runs() -> dict[str, dict[str, Any]]:
    p = RESULTS / "quality.json"
    if not p.is_file():
        return {}
    try:
        return dict(json.loads(p.read_text()).get("runs", {}))
    except (ValueError, AttributeError):
        return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help="default: every variant (affinity for gdiff only)",
    )
    ap.add_argument("--topics", type=int, nargs="+", default=[0], help="forget topics")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results first")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # shared machine: one thread, one job at a time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = {} if args.fresh else load_runs()
    plan = []
    for topic in args.topics:
        for seed in args.seeds:
            for alg in args.algorithms:
                for v in args.variants or VARIANTS:
                    if v == "affinity" and alg != "gdiff" and args.variants is None:
                        continue
                    plan.append((alg, v, seed, topic))
    for alg, v, seed, topic in plan:
        key = f"{alg}/{v}/seed{seed}" + (f"/topic{topic}" if topic else "")
        print(f"== {key}", flush=True)
        r = run_one(alg, v, seed, topic)
        runs[key] = r
        save(runs)  # after every run: a partial bench keeps what it measured
        b, a = r["before"], r["after"]
        print(
            f"   forget {b['forget_accuracy']:.2f} -> {a['forget_accuracy']:.2f}"
            f"  unseen {b['utility_accuracy_unseen']:.3f} -> "
            f"{a['utility_accuracy_unseen']:.3f}  steps {r['steps']} "
            f"({r['stopped_by']})  {r['wall_s']:.0f}s  selected {r['selected']}",
            flush=True,
        )
    print(markdown(runs, ratios(runs)))


if __name__ == "__main__":
    main()
