"""The ONE job pipeline, run by the one-process runner and by every Ray Train rank:

    load -> evaluate before -> attribute -> select -> scope -> unlearn -> evaluate after
    -> robustness checks (workers/robustness_stage.py; rank 0)
    -> package (unlearned model, or with output.model patch the base model's reference;
       expert patch, expert map, spec.json, result.json)

What differs per runner is the `Runner` strategy (workers/runners/base.py): rank 0 loads
first (a demo world is built once), evaluates, reports and packages; attribution's sums
go through `runner.reduce_sum`; the training loop (workers/train.py) steps through the
runner's engine and checkpoint hook. Every rank reports `rank_started` {rank, pid} once it
runs and, when cancelled, `rank_stopped` {rank, step}. A stop request is honoured at every
stage boundary and every training step (JobCancelled; nothing is written).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.attempt import AttemptContext, run_attempt, with_second_attempt
from workers.attribution import attribute
from workers.devices import dtype_name
from workers.events import RANK_STARTED, RANK_STOPPED
from workers.job import (
    CorpusResolver,
    JobCancelled,
    LoadedJob,
    Reporter,
    SilentReporter,
    attribution_batches,
    evaluate,
    load_job,
    overlap_probe,
    scalars,
    snapshot_regions,
    stop_check_for,
)
from workers.model_source import write_base_ref
from workers.objectives import Objective
from workers.partitioned import model_sha256, take_part
from workers.patch import items_sha256, state_sha256, write_region_patch
from workers.results import JobResult, overlap_from_target, target_layer
from workers.retain_routing import held_out
from workers.rmu_climb import kept_climbs
from workers.robustness_stage import PARTITIONED_REASON, not_run_rows, robustness_stage
from workers.routing import collect_topk, routing_overlap, routing_shift
from workers.runners.base import Runner
from workers.selection import SelectionCost
from workers.seuf_plan import (
    full_fallback_refusal,
    plan_selection,
    training_for,
)
from workers.spec import JobSpec

STAGES = (
    "loading",
    "evaluating_before",
    "attribution",
    "unlearning",
    "evaluating_after",
    "robustness",
    "packaging",
)


class _Progress:
    """Stages and events from rank 0 (per-rank events from every rank), stage timings, and
    the stop check at stage boundaries (agreed by every rank)."""

    def __init__(
        self, runner: Runner, reporter: Reporter, should_stop: Callable[[], bool] | None
    ) -> None:
        self.runner, self.reporter, self.should_stop = runner, reporter, should_stop
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()
        self.solo = False  # after training rank 0 works alone: nobody to agree with

    def stop_requested(self) -> bool:
        asked = self.runner.is_main and self.should_stop is not None and self.should_stop()
        return bool(asked if self.solo else self.runner.agree([int(asked)])[0])

    def stage(self, name: str) -> None:
        if name != "done" and self.stop_requested():
            self.rank_event(RANK_STOPPED, 0)
            raise JobCancelled(0)
        now = time.perf_counter()
        if self.timings:
            self.timings[list(self.timings)[-1]] = round(now - self._clock, 3)
        self._clock = now
        self.timings[name] = 0.0
        if name != "done" and self.runner.is_main:  # "done" only closes the last timing
            self.reporter.stage(name)

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if self.runner.is_main:
            self.reporter.event(kind, step, payload)

    def rank_event(self, kind: str, step: int) -> None:
        payload: dict[str, Any] = {"rank": self.runner.rank, "step": step}
        if kind == RANK_STARTED:
            payload = {"rank": self.runner.rank, "pid": os.getpid()}
        self.reporter.event(kind, step, payload)

    def close(self) -> dict[str, float]:
        self.stage("done")
        self.timings.pop("done")
        return self.timings


def run_pipeline(
    spec: JobSpec,
    output_dir: str | Path,
    runner: Runner,
    reporter: Reporter | None = None,
    corpus_resolver: CorpusResolver | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> JobResult | None:
    """Run one job on this rank; returns the result on rank 0 (None on the others).
    Raises ValueError for user errors, JobCancelled when `should_stop()` (read on rank 0)
    asked for a stop."""
    tr = spec.training
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = runner.is_main
    prog = _Progress(runner, reporter or SilentReporter(), should_stop)
    prog.rank_event(RANK_STARTED, 0)

    prog.stage("loading")
    # Under ZeRO-3 (runner.lockstep) the model is partitioned over the ranks: the load is a
    # collective, and every stage before training runs on every rank in the same order
    # (each read of a weight gathers it), rank 0 alone keeping what it reads.
    lock = runner.lockstep
    reads = main or lock  # the ranks that run rank 0's evaluation and reads of weights
    job: LoadedJob | None = None
    if main and not lock:  # rank 0 first: a demo world is built (and cached) once
        job = load_job(spec, corpus_resolver)
    if lock and spec.model == "demo":
        from workers.world import build_world

        # Before the sharded load, never under zero.Init (its pretraining model would be
        # partitioned by one rank alone): rank 0 first, the others then find it cached.
        if main:
            build_world(spec.world)
        runner.barrier()
        if not main:
            build_world(spec.world)
    runner.barrier()
    if job is None:
        with runner.loading(spec):
            job = load_job(spec, corpus_resolver)
        runner.loaded(job.model)
    model, adapter = job.model, job.adapter
    forget_train, retain_train = job.training_corpora()
    # The base model's identity in its own dtype (the dtype the outputs are written in).
    base_sha = model_sha256(model, job.base_dtype, here=main) if reads else ""

    prog.stage("evaluating_before")
    before: dict[str, Any] = {}
    if reads:
        before = evaluate(job, forget_train, retain_train)
        prog.event("evaluation", 0, {"phase": "before", **scalars(before)})
    probe_forget = overlap_probe(forget_train, tr.batch_size)
    probe_retain = overlap_probe(retain_train, tr.batch_size) if retain_train else None
    topk_forget = collect_topk(model, adapter, probe_forget)  # every rank measures overlap
    topk_retain = collect_topk(model, adapter, probe_retain) if reads and probe_retain else None
    runner.barrier()

    prog.stage("attribution")
    f_batches, r_batches = attribution_batches(job)
    with torch.no_grad():
        emap = attribute(
            model,
            adapter,
            f_batches,
            retain_batches=r_batches,
            method=spec.seuf.attribution,
            token_budget=spec.seuf.token_budget,
            at_loss_positions=True,
            shard=(runner.rank, runner.world),
            reduce=runner.reduce_sum,
            lockstep=lock,  # the same number of forwards on every rank
        )
    cost = SelectionCost.of(model, adapter) if spec.seuf.num_experts == "auto" else None

    def full_refusal() -> str | None:
        return full_fallback_refusal(spec, model.config.to_dict(), job.device.type, runner.world)

    sel_plan = plan_selection(emap, spec, cost, full_refusal)  # issue 13: auto, fallback
    selected, pairs, tr = sel_plan.selected, sel_plan.pairs, training_for(sel_plan, spec)
    prog.event(
        "experts_selected", 0, {"method": emap.method, "selected": [s._asdict() for s in selected]}
    )
    if sel_plan.warning:  # with the step size and budget that will run (a fallback's own)
        prog.event(
            "selection_warning", 0,
            {**sel_plan.to_json(), "training": {"lr": tr.lr, "max_steps": tr.max_steps}},
        )  # fmt: skip

    prog.stage("unlearning")
    probe_ids = [int(i) for b in probe_retain or [] for i in b["index"]]
    ctx = AttemptContext(
        spec, job, runner, forget_train, retain_train, probe_forget, topk_forget,
        held_out(len(retain_train), probe_ids) if retain_train is not None else set(),
        stop_check_for(job, forget_train, retain_train), out_dir, full_refusal,
        prog.event, prog.rank_event, should_stop,
    )  # fmt: skip
    # RMU whose first attempt missed its target tries the other kind of plan.
    attempt, second = with_second_attempt(ctx, run_attempt(ctx, sel_plan, tr), emap)
    sel_plan, tr, scope, result = attempt.plan, attempt.training, attempt.scope, attempt.result
    selected, pairs, holdout = sel_plan.selected, sel_plan.pairs, ctx.holdout

    # ZeRO-3 with output.model patch: the trained model is never gathered on one rank; the
    # ranks evaluate and read the trained regions in lockstep, rank 0 keeps what it reads.
    partitioned = lock and spec.output.model == "patch"
    if partitioned:
        final_scope = scope
    else:
        final_scope = runner.finish_training(job, scope, pairs)  # ZeRO-3: gathered, whole
        if final_scope is None:
            return None  # not rank 0: its part is done
        prog.solo = True
        final_scope.bake()
    model, adapter = job.model, job.adapter
    model.eval()

    prog.stage("evaluating_after")
    after = evaluate(job, forget_train, retain_train)
    prog.event("evaluation", result.steps, {"phase": "after", **scalars(after)})
    overlap_forget = routing_overlap(model, adapter, probe_forget, topk_forget)
    shift_retain = (
        routing_shift(model, adapter, probe_retain, topk_retain)
        if probe_retain and topk_retain is not None
        else None
    )
    overlap_retain = shift_retain.overall if shift_retain is not None else None
    retain_per_layer = (
        {str(k): v for k, v in shift_retain.per_layer.items()} if shift_retain else None
    )

    prog.stage("robustness")  # after the scores: every check leaves the model as it was
    # recorded with the result (service.proof), not as a progress event
    if partitioned:  # the checks train and perturb a whole copy: none exists here
        robustness = not_run_rows(spec, PARTITIONED_REASON)
    else:
        robustness = robustness_stage(
            job, attempt.before_state, sel_plan.scope, pairs, corpus_resolver
        )

    prog.stage("packaging")
    trained_dtype = next(model.parameters()).dtype
    if partitioned:
        # the trained state as bake() would leave it, one tensor at a time (collective)
        after_state = snapshot_regions(
            model, final_scope.regions, keep=main, read=final_scope.baked_tensors
        )
        after_state = {k: v.to(job.base_dtype) for k, v in after_state.items()}
        baked = final_scope.baked_tensors()
        patched_sha = items_sha256(baked, job.base_dtype) if main else take_part(baked)
        if not main:
            return None  # its part is done
    else:
        model.to(job.base_dtype)  # written in the base's dtype (a no-op when trained in it)
        after_state = snapshot_regions(model, final_scope.regions)
        patched_sha = state_sha256(model.state_dict())
    patch = write_region_patch(
        out_dir / "expert_patch.safetensors",
        attempt.before_state,
        after_state,
        base_sha256=base_sha,
        patched_sha256=patched_sha,
        dtype=job.base_dtype,
    )
    if spec.output.model == "full":
        _write_model_files(job, out_dir)
    else:  # patch: the base's reference instead of the model (applied at load: open_model)
        write_base_ref(out_dir, job.model_ref, job.model_commit, base_sha, patched_sha)
    (out_dir / "expert_map.json").write_text(json.dumps(emap.to_json(), indent=1))
    (out_dir / "spec.json").write_text(json.dumps(spec.resolved(), indent=1))
    trainable, total, ratio = attempt.counts
    res = JobResult(
        model=job.model_ref,
        model_revision=job.model_commit,
        output_model=spec.output.model,
        training_used={"lr": tr.lr, "max_steps": tr.max_steps, "schedule": tr.schedule},
        base_model_sha256=base_sha,
        unlearned_model_sha256=patched_sha,
        algorithm=spec.algorithm,
        scope=sel_plan.scope,
        attribution=emap.method,
        selected=[s._asdict() for s in selected],
        diagnostics=[d.__dict__ for d in emap.diagnostics],
        before=before,
        after=after,
        routing_overlap_forget=overlap_forget,
        routing_overlap_retain=overlap_retain,
        routing_overlap_retain_per_layer=retain_per_layer,
        routing_overlap_retain_from_target=overlap_from_target(
            retain_per_layer, target_layer(sel_plan.scope, [s._asdict() for s in selected])
        ),
        selection={
            **sel_plan.to_json(),
            "router_projection_mode": attempt.projection,
            "router_projection": [r.projector.to_json() for r in attempt.routers],
            "fallback_projection": attempt.fallback_mode,
            "fallback_rmu_layer": attempt.rmu_layer,  # where RMU started steering
            # [{step, from_layer, to_layer, forget_accuracy, best_forget_accuracy}]
            "fallback_rmu_climbs": kept_climbs(attempt.climb, result.stopped_by, result.guard),
            "fallback_projected": (
                # probe_held_out: 0 where the retain corpus is under twice the overlap probe
                # (workers/retain_routing.held_out): the probe's samples built the projector
                {**attempt.fallback_projection.to_json(), "probe_held_out": len(holdout)}
                if attempt.fallback_projection is not None
                else None
            ),
            # RMU's first attempt missed its target and the other kind of plan trained
            # after it (workers/attempt.py): what each trained, which one the job kept
            "second_attempt": second,
            "retain_routing": {
                "weight": attempt.retain_routing_weight,
                "layers": [m.layer for m in attempt.objective.retain_routing_layers],
                **_retain_routing_reference(attempt.objective),
                # the overlap probe's samples, left out of the loss (workers/retain_routing)
                "probe_held_out": len(holdout) if attempt.retain_routing_weight > 0 else 0,
            },
        },
        trainable_parameters=trainable,
        total_parameters=total,
        tunable_ratio=ratio,
        steps=result.steps,
        stopped_by=result.stopped_by,
        target_met=target_met(spec, result.stopped_by, result.guard, after),
        guard=result.guard,
        changed=patch.to_json()["regions"],
        activation_cache=attempt.cache_info,
        timings_s=prog.close(),
        output_dir=str(out_dir.resolve()),
        distributed=runner.info(result.resumed_from),
        robustness=robustness,
        precision={
            "device": str(job.device),
            "dtype": dtype_name(trained_dtype),
            "written_dtype": dtype_name(job.base_dtype),
            "master_weights": trained_dtype != torch.float32,
        },
    )
    res.write(out_dir)
    return res


def _retain_routing_reference(objective: Objective) -> dict[str, int]:
    """How much of the retain corpus the retain routing loss has a reference for."""
    ref = objective.reference.retain_routing if objective.reference is not None else None
    if ref is None:
        return {"reference_bytes": 0, "reference_samples": 0}
    return {"reference_bytes": ref.nbytes, "reference_samples": ref.samples}


def target_met(
    spec: JobSpec, stopped_by: str, guard: dict[str, Any] | None, after: dict[str, Any]
) -> bool | None:
    """Whether the job met its forget target (None: it set none): stopped on it, else (the
    guard's restored state, or the step budget) what the guard recorded, else the final
    evaluation's forget accuracy / forget NLL against the target."""
    stop = spec.training.stop
    acc_t, loss_t = stop.forget_accuracy_target, stop.forget_loss_target
    if acc_t is None and loss_t is None:
        return None
    if stopped_by in ("forget_accuracy", "forget_loss"):
        return True
    if guard is not None:
        return bool(guard["outcome"] == "target_met")
    acc, nll = after.get("forget_accuracy"), after.get("forget_nll")
    return bool(
        (acc_t is not None and acc is not None and acc <= acc_t)
        or (loss_t is not None and nll is not None and nll >= loss_t)
    )


def _write_model_files(job: LoadedJob, out_dir: Path) -> None:
    # Shards of at most 500 MB: writing one holds a copy of its bytes, not of the model's.
    # The tensors as they are (fused experts, the names the patch uses): reverting to the
    # hub's per-expert layout would copy every expert tensor at once.
    job.model.save_pretrained(out_dir / "model", max_shard_size="500MB", save_original_format=False)
    job.tokenizer.save_pretrained(out_dir / "model")


__all__ = ["STAGES", "run_pipeline"]
