"""SEUF training step time against the full-parameter step on the same batch, for one
real-shape model of bench/real_shape.py, after its job ran (a separate process, so the job's
peak RSS is the job's alone).

Both steps are the engine's own: `workers.scope.apply_scope` (SEUF: the job's selected
expert slices and their routers; full: every parameter), `workers.objectives.
objective_from_spec`, the activation cache where the job builds one, and `workers.train.
train` (bfloat16 weights, float32 master weights and AdamW), on one forget batch and one
retain batch repeated every step. A few warm-up steps, then the median of `reps`. One
thread: the machine is shared, and the two steps side by side are what count.

The full-parameter step runs only where the memory planner (workers/planner.py) says the
full job fits this machine's free memory, capped at BUDGET_BYTES; `train` also returns a
copy of the optimizer's state at the end, counted on top. Otherwise the planner's figure is
recorded and `full_step_measured` is false.

    python -m bench.real_shape_steps SPEC.yaml JOB_RESULT.json OUT.json [--warmup 2 --reps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

BUDGET_BYTES = 16 * 2**30  # this process's ceiling: the 24 GiB machine is shared


def free_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def step_times(
    job: Any, spec: Any, scope_name: str, pairs: list[tuple[int, int]], warmup: int, reps: int
) -> tuple[list[float], int]:
    """(seconds of each step after the warm-up, trainable parameters) of `scope_name`'s
    training on the job's first forget and retain batches; the model is left as it was."""
    from workers.activation_cache import build_for_training
    from workers.objectives import objective_from_spec
    from workers.reference import prepare_reference
    from workers.scope import apply_scope
    from workers.train import StepInfo, train

    model, adapter, tr = job.model, job.adapter, spec.training
    forget, retain = job.training_corpora()
    assert retain is not None, "the real-shape bench's spec has retain data"
    batches = [forget.in_order(tr.batch_size)[0]], [retain.in_order(tr.batch_size)[0]]
    scope = apply_scope(model, adapter, scope_name, pairs)
    trainable = scope.trainable_params
    spec = spec.model_copy(update={"scope": scope_name})
    objective = objective_from_spec(spec, adapter, pairs, layers=adapter.moe_layers())
    prepare_reference(objective, model, forget, retain, seed=tr.seed)
    cache = None
    if tr.activation_cache:  # as the job does: None where nothing can be skipped (full)
        cache, _ = build_for_training(
            model, scope.adapter or adapter, objective, [forget, retain],
            batch_size=tr.batch_size, max_bytes=tr.activation_cache_max_mb * 2**20,
        )  # fmt: skip
    stamps = [time.perf_counter()]

    def stamp(_: StepInfo) -> None:
        stamps.append(time.perf_counter())

    options = tr.model_copy(update={"max_steps": warmup + reps, "warmup_steps": 0})
    try:
        train(model, adapter, scope, objective, *batches, options, callback=stamp,
              activation_cache=cache)  # fmt: skip
    finally:
        if cache is not None:
            cache.close()
        scope.discard()  # the weights as loaded, for the next scope
        model.eval()
        gc.collect()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return steps[warmup:], trainable


def full_plan(spec: Any, model_dir: Path) -> Any:
    """The planner's estimate of the same job with every parameter training."""
    from workers.model_shape import shape_from_config
    from workers.planner import estimate, read_config

    shape = shape_from_config(read_config(model_dir))
    return estimate(shape, spec.model_copy(update={"scope": "full"}))


def measure_steps(spec_file: Path, job_result: Path, warmup: int, reps: int) -> dict[str, Any]:
    import torch
    import yaml

    from bench.common import median
    from workers.job import load_job
    from workers.spec import JobSpec

    torch.set_num_threads(1)
    spec = JobSpec.model_validate(yaml.safe_load(spec_file.read_text()))
    result = json.loads(job_result.read_text())
    pairs = [(int(s["layer"]), int(s["expert"])) for s in result["selected"]]
    plan = full_plan(spec, Path(spec.model))
    # train() returns a copy of AdamW's state (two float32 moments) after the last step.
    need = plan.per_worker_bytes + 8 * plan.trainable_params
    have = min(BUDGET_BYTES, free_memory_bytes())
    job = load_job(spec)
    seuf, seuf_params = step_times(job, spec, result["scope"], pairs, warmup, reps)
    row: dict[str, Any] = {
        "step_batch": {"batch_size": spec.training.batch_size,
                       "max_length": spec.training.max_length, "forget_and_retain": True},
        "step_warmup": warmup,
        "step_reps": reps,
        "step_threads": torch.get_num_threads(),
        "seuf_scope": result["scope"],
        "seuf_trainable_params": seuf_params,
        "seuf_step_s": median(seuf),
        "seuf_steps_s": seuf,
        "full_plan_bytes": plan.per_worker_bytes,
        "full_plan_parts": dict(plan.parts),
        "full_step_needs_bytes": need,
        "full_step_memory_available_bytes": have,
        "full_step_measured": need <= have,
        "full_step_s": None,
        "full_over_seuf_step": None,
    }  # fmt: skip
    if need <= have:
        full, _ = step_times(job, spec, "full", [], warmup, reps)
        row["full_steps_s"] = full
        row["full_step_s"] = median(full)
        row["full_over_seuf_step"] = row["full_step_s"] / row["seuf_step_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path, help="the job's spec (YAML)")
    ap.add_argument("job_result", type=Path, help="the job's result.json (its selection)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    row = measure_steps(args.spec, args.job_result, args.warmup, args.reps)
    args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
