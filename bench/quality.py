"""The quality table: every algorithm x {full, seuf, seuf_no_anchor, random, top3} on the
demo world, plus the attribution ablation (paper affinity vs contrastive) for GDiff + SEUF,
and the seed check of the shipped SEUF examples.

    python -m bench.quality [--seeds 0] [--algorithms gdiff npo ...] [--variants seuf full ...]

Every run starts from the shipped example spec (examples/demo-<algorithm>-seuf.yaml, or
-full.yaml for the full variant), so the bench measures exactly what a user runs; the
variants change only the field they are named after. All runs use the same stop rule as the
examples (forget accuracy <= 0.30 = chance + 0.05, or the step budget) and the direct
evaluation backend (the same numbers as lm-eval, tested equal, much faster), with the
robustness checks turned off (`evaluation.robustness: []`; bench.robustness measures them).

Writes bench/results/quality.json (runs + `ratios`), quality.md (a table like the paper's
Table 3) and quality.png (utility vs forget). Results are saved after every run and merged
with earlier ones by key (algorithm/variant/seed), so a partial run keeps what it measured.

The sweep (issue 13: defaults must hold on worlds nobody tuned them on):

    python -m bench.quality --sweep --list-worlds
    python -m bench.quality --sweep [--worlds 0 3 | olmoe-s1234-t8-f3] [--algorithms ...]
        [--variants full seuf ...] [--facts 40] [--retain-topics half]
        [--size small] [--world-topics 6] [--topic-router-margin 24]

draws its own worlds (3 MoE families x 2 seeds from a seed range no example uses, 6-12
topics, forget topic varied; `draw_worlds`), runs every algorithm x SWEEP_VARIANTS on each,
and adds `sweep` to quality.json: per world and per (algorithm, variant) the forget reached,
unseen utility kept, retain routing overlap, and min / mean over worlds, with the issue's
acceptance checks (with `--retain-topics half`, worlds keyed <world>-r<k> whose retain
corpus covers half the topics, and `kept_uncovered_minus_full`; with
`--topic-router-margin 24`, worlds keyed m24-<world> whose experts are seeded per topic
hard enough that knowledge is localised on most draws). Shards (`--worlds`, in
separate processes or at separate times) merge by key under a file lock:
sweep/<world>/<algorithm>/<variant>.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ALGORITHMS = ("gdiff", "npo", "simnpo", "ga", "rmu")
VARIANTS = ("seuf", "full", "seuf_no_anchor", "random", "top3", "affinity")
# The sweep's variants: the shipped examples (full, seuf: the spec's defaults), the paper's
# one expert (seuf1), the router left untrained (experts), GRIP's projection on one expert
# (nullspace), adaptive selection without and with it (auto, auto_nullspace), and the step
# size of METHOD.md's held-out runs (lr1e3).
SWEEP_VARIANTS = (
    "full",
    "seuf",
    "seuf1",
    "experts",
    "nullspace",
    "auto",
    "auto_nullspace",
    "lr1e3",
)
# The retain routing loss's weights tried on the sweep (rr<w>; _noproj: without the router
# projection); "defaults" is the shipped example untouched.
RR_VARIANTS = (
    "rr0",
    "rr1",
    "rr3",
    "rr10",
    "rr30",
    "rr100",
    "rr300",
    "rr1000",
    "rr3000",
    "rr10_noproj",
)
# auto with the full fallback's step size named (flr<m>e<x> = m*10^-x, [_rr<w>]): RMU.
FLR_VARIANTS = (
    "flr1e3",
    "flr1e3_rr0",
    "flr1e3_rr100",
    "flr1e3_rr1000",
    "flr3e4",
    "flr3e4_rr10",
    "flr3e4_rr0",
    "flr3e4_rr1000",
    "flr1e4_rr1000",
)
# RMU's full fallback steering layer k instead of its default (flr..._rr<w>_l<k>):
# the middle layer before the projected fallback, a quarter of the way up with it
# (flr1e3_l2: the projected fallback at the middle layer, what it steered first).
RMU_LAYER_VARIANTS = ("flr1e4_rr1000_l1", "flr3e4_rr1000_l1", "flr1e3_l2")
# One expert pinned (num_experts 1, the rest of the example untouched) with the retain
# routing loss at weight w: the weight for jobs that train selected experts.
ONE_VARIANTS = ("one_rr100", "one_rr1000")
# The top two experts pinned (num_experts 2), weight 1000, for the projected fallback's
# 1000 steps: what RMU could try after the top expert and the fallback both stalled.
TWO_VARIANTS = ("two_rr1000",)
# The step-size policy and the utility guard on the defaults ([flr1e3_]decay|guard): at the
# shipped step size and at 10x it (GDiff's fallback lr 1e-3), whether decay or the guard
# keeps utility where a constant step does not. GUARD_TOLERANCE is the guard's drop.
POLICY_VARIANTS = ("decay", "guard", "flr1e3_decay", "flr1e3_guard")
GUARD_TOLERANCE = 0.02
# RMU's steering target per forget sample (objective.rmu_directions per_sample) on the RMU
# example with one expert pinned (as it shipped when these ran) [with the retain routing
# loss at weight w on that expert].
PER_SAMPLE_VARIANTS = ("per_sample", "per_sample_rr100", "per_sample_rr1000")
# What auto's full fallback projects (seuf.fallback_projection): fp_routers = the routers
# only (RMU's default before this round), fp_all = every reader of the residual stream
# (workers/projected_fallback.py; RMU's default now).
PROJECTION_VARIANTS = ("fp_routers", "fp_all", "fp_all_e999")  # e999: energy 0.999
# RMU's projected fallback climbing a layer after this many steps without a new low of
# forget accuracy (seuf.fallback_rmu_patience; workers/rmu_climb.py): p0 never climbs.
CLIMB_VARIANTS = ("climb_p0", "climb_p30", "climb_p100")
ALL_VARIANTS = tuple(
    dict.fromkeys(
        VARIANTS
        + PROJECTION_VARIANTS
        + SWEEP_VARIANTS
        + RR_VARIANTS
        + FLR_VARIANTS
        + ONE_VARIANTS
        + TWO_VARIANTS
        + POLICY_VARIANTS
        + PER_SAMPLE_VARIANTS
        + RMU_LAYER_VARIANTS
        + CLIMB_VARIANTS
        + ("defaults",)
    )
)
SWEEP_FAMILIES = ("qwen2_moe", "olmoe", "mixtral")
SWEEP_SEEDS = (1000, 10_000)  # the bench's own range: no example or test uses these seeds
SWEEP_TOPICS = (6, 12)
SWEEP_DRAW = 13  # seed of the draw itself (the worlds are fixed by it)
SWEEP_FACTS = 40  # facts per topic: a full sweep fits about two hours on 2 cores
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


def _flr(name: str) -> float:
    """The fallback step size a variant names: flr<m>e<x> = m * 10^-x (flr3e4: 3e-4)."""
    return float(name.removeprefix("flr").replace("e", "e-"))


def _set_rr(seuf: dict[str, Any], name: str) -> None:
    """The retain routing loss's weight a variant names with its _rr<w> suffix, if any."""
    _, _, rr = name.partition("_rr")
    if rr:
        seuf["retain_routing_weight"] = float(rr)


def variant_spec(
    algorithm: str,
    variant: str,
    seed: int,
    topic: int = 0,
    world: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The example spec with the variant's one change, the world seed and forget topic (or
    a whole `world` block, for the sweep), and direct scoring."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose from {', '.join(ALL_VARIANTS)}")
    if algorithm != "rmu" and variant in PER_SAMPLE_VARIANTS + RMU_LAYER_VARIANTS + CLIMB_VARIANTS:
        raise ValueError(f"variant {variant!r} changes RMU settings: algorithm rmu only")
    d = copy.deepcopy(base_spec(algorithm, variant))
    if world is not None:
        d["world"] = dict(world)
    else:
        d.setdefault("world", {})["seed"] = seed
        d["world"]["forget_topic"] = topic
    d.setdefault("evaluation", {})["backend"] = "direct"
    d["evaluation"]["robustness"] = []  # the quality table measures scores, not the checks
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
    elif variant == "experts":
        d["scope"] = "experts"  # the selected experts only: no router trains
    elif variant == "seuf1":  # the paper's SEUF: one expert, the router's update as it is
        seuf["num_experts"] = 1
        seuf["router_projection"] = "none"
    elif variant == "nullspace":
        seuf["num_experts"] = 1
        seuf["router_projection"] = "nullspace"
    elif variant == "auto":
        seuf["num_experts"] = "auto"
        seuf["router_projection"] = "none"
    elif variant == "auto_nullspace":  # both: experts by the diagnostics, retain-safe router
        seuf["num_experts"] = "auto"
        seuf["router_projection"] = "nullspace"
        seuf["retain_routing_weight"] = 0.0  # the previous defaults (before the loss)
    elif variant in ONE_VARIANTS:
        seuf["num_experts"] = 1
        _set_rr(seuf, variant)
    elif variant in TWO_VARIANTS:
        from workers.seuf_plan import FULL_FALLBACK_STEPS

        seuf["num_experts"] = 2
        _set_rr(seuf, variant)
        d.setdefault("training", {})["max_steps"] = FULL_FALLBACK_STEPS
    elif variant in RR_VARIANTS:  # the example with the retain routing loss at weight w
        w, _, rest = variant.removeprefix("rr").partition("_")
        seuf["retain_routing_weight"] = float(w)
        seuf["router_projection"] = "none" if rest == "noproj" else "nullspace"
    elif variant in FLR_VARIANTS or variant in RMU_LAYER_VARIANTS:
        # auto whose full fallback steps at lr [with weight w] [steering layer k]
        name, _, layer = variant.partition("_l")
        if layer:
            obj = d.setdefault("objective", {})
            obj["rmu_layer"], obj["rmu_layer_offset"] = int(layer), 0
        seuf["num_experts"] = "auto"
        seuf["fallback_lr"] = _flr(name.partition("_rr")[0])
        _set_rr(seuf, name)
    elif variant in POLICY_VARIANTS:
        lr, _, policy = variant.rpartition("_")
        if lr:
            seuf["fallback_lr"] = _flr(lr)
        tr = d.setdefault("training", {})
        if policy == "decay":
            tr["lr_policy"] = "decay"
        else:
            tr.setdefault("stop", {})["utility_drop_tolerance"] = GUARD_TOLERANCE
    elif variant in PER_SAMPLE_VARIANTS:
        seuf["num_experts"] = 1
        d.setdefault("objective", {})["rmu_directions"] = "per_sample"
        _set_rr(seuf, variant)
    elif variant in PROJECTION_VARIANTS:
        mode, _, energy = variant.removeprefix("fp_").partition("_e")
        seuf["fallback_projection"] = mode
        if energy:
            seuf["router_projection_energy"] = float(f"0.{energy}")
    elif variant in CLIMB_VARIANTS:
        seuf["fallback_rmu_patience"] = int(variant.removeprefix("climb_p"))
    elif variant == "lr1e3":
        d.setdefault("training", {})["lr"] = 1e-3
    if variant == "full":
        d.pop("seuf", None)
    return d


def run_one(
    algorithm: str,
    variant: str,
    seed: int,
    topic: int = 0,
    world: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One job through the engine's run_job (the code path of `moe-unlearn run`)."""
    from workers.run import run_job
    from workers.spec import JobSpec

    spec_data = variant_spec(algorithm, variant, seed, topic, world)
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
        "seed": spec.world.seed,
        "topic": spec.world.forget_topic,
        "spec": spec.resolved(),
        "selected": res["selected"],
        "attribution": res["attribution"],
        "diagnostics": res.get("diagnostics"),
        "before": {k: b.get(k) for k in _METRICS},
        "after": {k: a.get(k) for k in _METRICS},
        "routing_overlap_forget": res["routing_overlap_forget"],
        "routing_overlap_retain": res["routing_overlap_retain"],
        # Per layer (str(layer) -> overlap) where the engine reports it (issue 13).
        "routing_overlap_retain_per_layer": res.get("routing_overlap_retain_per_layer"),
        "routing_overlap_retain_from_target": res.get("routing_overlap_retain_from_target"),
        "selection": res.get("selection"),
        "selection_warning": (res.get("selection") or {}).get("selection_warning"),
        "outcome": res.get("outcome"),
        "scope_run": res.get("scope"),
        "tunable_ratio": res["tunable_ratio"],
        "steps": res["steps"],
        "stopped_by": res["stopped_by"],
        # Which build of the world ran: the same world key builds to other weights on
        # another CPU (floating-point order), and only runs of one build compare.
        "base_model_sha256": res.get("base_model_sha256"),
        "wall_s": round(wall, 2),
        "timings_s": res["timings_s"],
    }


_METRICS = (
    "forget_accuracy",
    "utility_accuracy",
    "utility_accuracy_unseen",
    "utility_accuracy_uncovered_topics",
)


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
        "sweep": sweep_summary(runs),
    }
    tmp = RESULTS / f".quality.json.{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(RESULTS / "quality.json")  # atomic: a reader never sees half a file
    (RESULTS / "quality.md").write_text(markdown(runs, rat) + sweep_markdown(payload["sweep"]))
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


def merge_save(new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge `new` runs into quality.json by key, under a file lock (shards running at the
    same time each keep the others' runs). Returns every run now stored."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The lock lives outside the repository (one per results folder): nothing to commit.
    tag = hashlib.sha256(str(RESULTS.resolve()).encode()).hexdigest()[:12]
    with (Path(tempfile.gettempdir()) / f"moe-unlearn-quality-{tag}.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            runs = load_runs()
            runs.update(new)
            save(runs)
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return runs


# --- the sweep ------------------------------------------------------------------------


def draw_worlds(
    families: tuple[str, ...] = SWEEP_FAMILIES,
    per_family: int = 2,
    draw: int = SWEEP_DRAW,
    facts: int = SWEEP_FACTS,
) -> list[dict[str, Any]]:
    """The sweep's worlds, drawn from the bench's own ranges (seed, topic count, forget
    topic), the same list every time for the same arguments. Each is a spec `world:` block
    plus its `key`."""
    rng = random.Random(draw)
    n = len(families) * per_family
    # Forget topics without repeats while they last (every world has >= SWEEP_TOPICS[0]).
    forgets = rng.sample(range(SWEEP_TOPICS[0]), min(n, SWEEP_TOPICS[0]))
    out: list[dict[str, Any]] = []
    for arch in families:
        for _ in range(per_family):
            seed = rng.randrange(*SWEEP_SEEDS)
            topics = rng.randint(*SWEEP_TOPICS)
            forget = forgets[len(out)] if len(out) < len(forgets) else rng.randrange(topics)
            out.append(
                {
                    "key": f"{arch}-s{seed}-t{topics}-f{forget}",
                    "arch": arch,
                    "seed": seed,
                    "topics": topics,
                    "forget_topic": forget,
                    "facts_per_topic": facts,
                }
            )
    return out


def pick_worlds(worlds: list[dict[str, Any]], wanted: list[str] | None) -> list[dict[str, Any]]:
    """A shard: worlds by index in the draw or by key; ValueError naming the valid ones."""
    if not wanted:
        return worlds
    keys = [w["key"] for w in worlds]
    out = []
    for w in wanted:
        if w.isdigit() and int(w) < len(worlds):
            out.append(worlds[int(w)])
        elif w in keys:
            out.append(worlds[keys.index(w)])
        else:
            raise ValueError(f"unknown world {w!r}: use 0..{len(worlds) - 1} or one of {keys}")
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def retain_overlap_from_target(r: dict[str, Any]) -> float | None:
    """Retain routing overlap averaged over the MoE layers from the target layer up (the
    frozen layers below score 1.0 for free): the engine's `routing_overlap_retain_from_
    target`; for runs stored before it had one, the same rule on their per-layer figures
    (workers.results), or the overall figure when they have none."""
    if r.get("routing_overlap_retain_from_target") is not None:
        return r["routing_overlap_retain_from_target"]
    per = r.get("routing_overlap_retain_per_layer")
    if not per:
        return r.get("routing_overlap_retain")
    from workers.results import overlap_from_target, target_layer

    return overlap_from_target(per, target_layer(r.get("scope_run") or "", r.get("selected") or []))


def _build(r: dict[str, Any]) -> str | None:
    """The first 12 hex digits of the world build's weights (None: a run from before the
    bench recorded them)."""
    sha = r.get("base_model_sha256")
    return sha[:12] if sha else None


def _same_build(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


def world_set(world: str) -> str:
    """The cell suffix of a sweep world's kind, so that one summary cell holds one kind of
    world and its acceptance counts mean what they say: '' for the drawn worlds as drawn,
    '@retain_topics' (key -r<k>), '@small' (key small-...), '@m<margin>' (key m<margin>-...,
    with_margin), joined by '+' when a world is of several (e.g. '@m24+retain_topics')."""
    parts = []
    if world.startswith("small-"):
        parts.append("small")
    margin = re.match(r"(?:small-)?m(\d+)-", world)
    if margin:
        parts.append(f"m{margin.group(1)}")
    if re.search(r"-r\d+$", world):
        parts.append("retain_topics")
    return "@" + "+".join(parts) if parts else ""


def sweep_summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per world kind (world_set), world and (algorithm, variant): forget after, unseen
    utility kept, retain overlap from the target layer; min / mean over worlds; the issue's
    acceptance checks (forget <= 0.30 with >= 95% kept and retain overlap >= 0.95 on >= 5 of
    6 worlds; SEUF keeps >= full - 0.01 on every world; against the full run of the same
    kind of world). A world whose full-parameter run was made on another build of it
    (another machine) is left out of the comparison and listed in `full_on_another_build`."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for key, r in runs.items():
        if not key.startswith("sweep/"):
            continue
        world = key.split("/")[1]
        ku = _kept(r, "utility_accuracy_unseen")
        kc = _kept(r, "utility_accuracy_uncovered_topics")
        fa = r["after"]["forget_accuracy"]
        ov = retain_overlap_from_target(r)
        cell = f"{r['algorithm']}/{r['variant']}{world_set(world)}"
        cells.setdefault(cell, {})[world] = {
            "forget_after": fa,
            "kept_unseen": ku,
            "kept_uncovered": kc,
            "retain_overlap": ov,
            "steps": r["steps"],
            "stopped_by": r["stopped_by"],
            "build": _build(r),
            "selection_warning": r.get("selection_warning"),
            "meets": bool(ku is not None and fa is not None and fa <= FORGET_TARGET and ku >= 0.95),
            "meets_with_overlap": bool(
                ku is not None
                and fa is not None
                and fa <= FORGET_TARGET
                and ku >= 0.95
                and ov is not None
                and ov >= 0.95
            ),
        }
    summary: dict[str, Any] = {}
    for cell, per_world in sorted(cells.items()):
        base, at, label = cell.partition("@")
        alg, variant = base.split("/")
        kept = [w["kept_unseen"] for w in per_world.values() if w["kept_unseen"] is not None]
        ovs = [w["retain_overlap"] for w in per_world.values() if w["retain_overlap"] is not None]
        entry: dict[str, Any] = {
            "worlds": per_world,
            "n_worlds": len(per_world),
            "kept_unseen_min": min(kept, default=None),
            "kept_unseen_mean": _mean(kept),
            "retain_overlap_min": min(ovs, default=None),
            "retain_overlap_mean": _mean(ovs),
            "forget_after_max": max((w["forget_after"] for w in per_world.values()), default=None),
            "worlds_meeting": sum(w["meets"] for w in per_world.values()),
            "worlds_meeting_with_overlap": sum(w["meets_with_overlap"] for w in per_world.values()),
        }
        full = cells.get(f"{alg}/full{at}{label}")
        if variant != "full" and full:
            differ = sorted(
                world for world, w in per_world.items()
                if world in full and not _same_build(w["build"], full[world]["build"])
            )  # fmt: skip
            if differ:  # not compared: another build of the world ran full
                entry["full_on_another_build"] = differ
            full = {world: w for world, w in full.items() if world not in differ}
            covered = {  # retain_topics worlds: uncovered utility kept, minus full's
                world: w["kept_uncovered"] - full[world]["kept_uncovered"]
                for world, w in per_world.items()
                if world in full
                and w["kept_uncovered"] is not None
                and full[world]["kept_uncovered"] is not None
            }
            if covered:
                entry["kept_uncovered_minus_full"] = covered
            diffs = {
                world: w["kept_unseen"] - full[world]["kept_unseen"]
                for world, w in per_world.items()
                if world in full
                and w["kept_unseen"] is not None
                and full[world]["kept_unseen"] is not None
            }
            entry["kept_minus_full"] = diffs
            entry["at_least_full_every_world"] = bool(diffs) and all(
                d >= -0.01 for d in diffs.values()
            )
        summary[cell] = entry
    return summary


def sweep_markdown(summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    lines = [
        "",
        "Sweep (bench draws its worlds; kept = unseen utility after / before; overlap = "
        "retain routing overlap from the target layer up):",
        "",
        "| algorithm/variant | worlds | meets (forget <= 0.30, kept >= 0.95) | kept min / mean "
        "| overlap min / mean | max forget | kept - full >= -0.01 everywhere |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell, e in summary.items():
        lines.append(
            f"| {cell} | {e['n_worlds']} | {e['worlds_meeting']} | "
            f"{_f(e['kept_unseen_min'])} / {_f(e['kept_unseen_mean'])} | "
            f"{_f(e['retain_overlap_min'], 2)} / {_f(e['retain_overlap_mean'], 2)} | "
            f"{_f(e['forget_after_max'], 2)} | {e.get('at_least_full_every_world', '-')} |"
        )
    return "\n".join(lines) + "\n"


def with_size(world: dict[str, Any], size: str) -> dict[str, Any]:
    """The world at `size` (the spec's world.size). A small world (workers/world/pretrain.py
    SMALL_SETTINGS: 2 layers, 8 experts, one per topic of a 6-topic world) was meant as the
    localised case; on the sweep's draws its best expert still fell short of auto's bar
    (README "Small worlds"). Its key says so (small-<key>); the full size keeps its key."""
    if size == "full":
        return world
    return {**world, "size": size, "key": f"{size}-{world['key']}"}


def with_margin(world: dict[str, Any], margin: int | None) -> dict[str, Any]:
    """The world pretrained with `topic_router_margin` (the spec's world option: how strongly
    one expert per topic is seeded; 24 builds worlds whose knowledge is localised, the case
    SEUF is for). Its key says so (m<margin>-<key>); without one the key is the drawn one."""
    if margin is None:
        return world
    return {**world, "topic_router_margin": margin, "key": f"m{margin}-{world['key']}"}


def with_topics(world: dict[str, Any], topics: int | None) -> dict[str, Any]:
    """The world with `topics` topics (its forget topic taken modulo), keyed by them: a small
    world has an expert per topic only up to 8 topics, which the draw's 6-12 mostly exceed."""
    if topics is None:
        return world
    forget = world["forget_topic"] % topics
    key = world["key"].rsplit("-t", 1)[0] + f"-t{topics}-f{forget}"
    return {**world, "topics": topics, "forget_topic": forget, "key": key}


def with_retain_topics(world: dict[str, Any], value: str | None) -> dict[str, Any]:
    """The world with `retain_topics` set (the spec's world.retain_topics: the retain corpus
    covers the first k non-forget topics); 'half' = topics // 2. Its key says so (-r<k>), so
    its runs are stored beside the full-retain ones."""
    if value is None:
        return world
    k = world["topics"] // 2 if value == "half" else int(value)
    return {**world, "retain_topics": k, "key": f"{world['key']}-r{k}"}


def sweep_plan(
    worlds: list[dict[str, Any]], algorithms: list[str], variants: list[str]
) -> list[tuple[str, dict[str, Any], str, str]]:
    """(key, world, algorithm, variant) for every run of a shard, world by world (a world is
    built once, then every run on it reuses the cache)."""
    return [
        (f"sweep/{w['key']}/{alg}/{v}", w, alg, v)
        for w in worlds
        for alg in algorithms
        for v in variants
    ]


def _print_run(r: dict[str, Any]) -> None:
    b, a = r["before"], r["after"]
    print(
        f"   forget {b['forget_accuracy']:.2f} -> {a['forget_accuracy']:.2f}"
        f"  unseen {b['utility_accuracy_unseen']:.3f} -> "
        f"{a['utility_accuracy_unseen']:.3f}  steps {r['steps']} "
        f"({r['stopped_by']})  retain overlap {_f(r['routing_overlap_retain'], 2)}  "
        f"{r['wall_s']:.0f}s  selected {r['selected']}",
        flush=True,
    )


def _margin(text: str) -> int:
    """--topic-router-margin: the spec's bound (0-64), said in one line."""
    value = int(text)
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not in 0-64 (world.topic_router_margin)")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=ALL_VARIANTS,
        help="default: every variant (affinity for gdiff only); with --sweep: SWEEP_VARIANTS",
    )
    ap.add_argument("--topics", type=int, nargs="+", default=[0], help="forget topics")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results first")
    ap.add_argument("--sweep", action="store_true", help="the drawn worlds (see above)")
    ap.add_argument("--worlds", nargs="+", default=None, help="sweep shard: indices or keys")
    ap.add_argument("--facts", type=int, default=SWEEP_FACTS, help="sweep facts per topic")
    ap.add_argument("--list-worlds", action="store_true", help="print the sweep's worlds")
    ap.add_argument(
        "--size",
        default="full",
        choices=("full", "small"),
        help="sweep: world.size of every world (small: 2 layers, 8 experts)",
    )
    ap.add_argument("--skip-done", action="store_true", help="sweep: keep runs already stored")
    ap.add_argument(
        "--world-topics", type=int, default=None, help="sweep: every world with this many topics"
    )
    ap.add_argument(
        "--topic-router-margin",
        type=_margin,
        default=None,
        help="sweep: world.topic_router_margin of every world (24: localised worlds)",
    )
    ap.add_argument(
        "--retain-topics",
        default=None,
        help="sweep: world.retain_topics of every world ('half' = topics // 2, or a number)",
    )
    args = ap.parse_args(argv)

    if args.sweep:
        drawn = [
            with_retain_topics(
                with_size(
                    with_margin(with_topics(w, args.world_topics), args.topic_router_margin),
                    args.size,
                ),
                args.retain_topics,
            )
            for w in draw_worlds(facts=args.facts)
        ]
        if args.list_worlds:
            for i, w in enumerate(drawn):
                print(i, w["key"], json.dumps({k: v for k, v in w.items() if k != "key"}))
            return
        worlds = pick_worlds(drawn, args.worlds)
    import torch

    torch.set_num_threads(1)  # shared machine: one thread, one job at a time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.fresh:
        save({})
    if args.sweep:
        variants = args.variants or list(SWEEP_VARIANTS)
        done = load_runs() if args.skip_done else {}
        for key, w, alg, v in sweep_plan(worlds, args.algorithms, variants):
            if key in done:
                continue
            print(f"== {key}", flush=True)
            world = {k: val for k, val in w.items() if k != "key"}
            r = run_one(alg, v, w["seed"], w["forget_topic"], world)
            r["world"] = w["key"]
            merge_save({key: r})
            _print_run(r)
        print(sweep_markdown(sweep_summary(load_runs())))
        return
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
        merge_save({key: r})  # after every run: a partial bench keeps what it measured
        _print_run(r)
    runs = load_runs()
    print(markdown(runs, ratios(runs)))


if __name__ == "__main__":
    main()
