"""One unlearning attempt of a job, and the second one RMU may need.

An attempt takes a selection plan (workers/seuf_plan.py) to a trained model: the plan's
scope wired, its router projections (or the fallback's projection of every matrix), the
objective and its references prepared, the activation cache, then workers/train.py. The
pipeline (workers/pipeline.py) runs one, and packages what the attempt it keeps says.

Why a second (seuf.rmu_second_attempt): for RMU, neither kind of plan forgets on every
world, and nothing tells the worlds apart beforehand (the top expert's share of the forget
gate mass and its forget/retain ratio did not). The projected full fallback stalled where
the top expert alone forgot (the RMU example's own world on one build: 0.38 after 1000
steps against 0.30 in 72; a small world on this one: 0.35 after 1000, then the expert
0.30 in 120), and a qualified expert stalled where the projected fallback forgot (another
small world: 0.35 after 150, then 0.30 in 408). So the plan auto chose runs first, and
only one that ends without meeting the target is followed by the other kind, from the
original weights: the job keeps the one that met the target, else the one closer to it
(README "RMU's second attempt").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.activation_cache import build_for_training
from workers.attribution import ExpertMap
from workers.data import BatchStream, TokenizedCorpus
from workers.events import RANK_STOPPED, RESUMED
from workers.job import JobCancelled, LoadedJob, snapshot_regions
from workers.objectives import Objective, objective_from_spec
from workers.projected_fallback import FallbackProjection, attach_fallback_projection
from workers.reference import prepare_reference
from workers.rmu_climb import RmuClimb
from workers.router_projection import ProjectedRouter
from workers.routing import Batch, TopKSnapshot
from workers.runners.base import Runner
from workers.scope import TrainableScope, apply_scope
from workers.selection import ranked
from workers.seuf_plan import (
    SelectionPlan,
    attach_projection,
    close_all,
    fallback_projection_mode,
    fallback_rmu_layer,
    projection_mode,
    training_for,
)
from workers.spec import JobSpec, StopRule, TrainingOptions
from workers.train import StepInfo, TrainResult, target_reached, train

SECOND_ATTEMPT = "second_attempt"  # event: RMU's first attempt missed its target

Event = Callable[[str, int, dict[str, Any]], None]
RankEvent = Callable[[str, int], None]


@dataclass
class AttemptContext:
    """What every attempt of one job shares (the pipeline's state before unlearning)."""

    spec: JobSpec
    job: LoadedJob
    runner: Runner
    forget_train: TokenizedCorpus
    retain_train: TokenizedCorpus | None
    probe_forget: list[Batch]  # the routing overlap probe and its reference
    topk_forget: TopKSnapshot
    holdout: set[int]  # retain samples the probe holds out of the loss and projector
    stop_check: Callable[[nn.Module], dict[str, float]] | None
    out_dir: Path
    full_refusal: Callable[[], str | None] | None  # why a full fallback would not fit
    event: Event  # rank 0's progress events
    rank_event: RankEvent  # every rank's
    should_stop: Callable[[], bool] | None


@dataclass
class Attempt:
    """One trained attempt and what the result records about it."""

    plan: SelectionPlan
    training: TrainingOptions
    scope: TrainableScope
    projection: str  # the router projection that ran (projection_mode)
    routers: list[ProjectedRouter]
    fallback_mode: str | None  # fallback_projection_mode (None: no fallback ran)
    fallback_projection: FallbackProjection | None
    rmu_layer: int | None  # where the fallback's RMU started steering
    climb: RmuClimb | None
    objective: Objective
    retain_routing_weight: float
    counts: tuple[int, int, float]  # trainable, total, ratio (before any sharding)
    before_state: dict[tuple[str, int | None], torch.Tensor]
    result: TrainResult
    cache_info: dict[str, Any] | None


def run_attempt(
    ctx: AttemptContext,
    plan: SelectionPlan,
    tr: TrainingOptions,
    *,
    checkpoints: bool = True,
    first_step: int = 0,
) -> Attempt:
    """Wire `plan`, train it with `tr` and return what ran. Raises JobCancelled when the
    stop request ended training. checkpoints=False: neither restores nor writes one (a
    second attempt). first_step: the steps before this attempt, added to its `step`
    events' numbers (the service keeps one event per step and kind: a second attempt's
    must not reuse the first's numbers)."""
    spec, runner, model, adapter = ctx.spec, ctx.runner, ctx.job.model, ctx.job.adapter
    retain_train = ctx.retain_train
    main, reads = runner.is_main, runner.is_main or runner.lockstep
    projection = projection_mode(
        spec, plan.scope, runner.projects_routers, retain_train is not None
    )
    if projection == "nullspace" and not runner.projects_routers:
        raise ValueError("seuf.router_projection 'nullspace' runs on one worker for now")
    fallback_mode = fallback_projection_mode(
        spec, plan.scope, runner.projects_routers, retain_train is not None
    )
    pairs, holdout = plan.pairs, ctx.holdout
    fallback_projection: FallbackProjection | None = None
    if fallback_mode == "all":
        if retain_train is None or not runner.projects_routers:
            raise ValueError("seuf.fallback_projection 'all' needs retain data and one worker")
        projection = "nullspace"  # the routers are projected with every other matrix
        fallback_projection = attach_fallback_projection(
            model, adapter, retain_train.in_order(tr.batch_size, skip=holdout),
            energy=spec.seuf.router_projection_energy,
        )  # fmt: skip
        routers = fallback_projection.routers
    else:
        routers = attach_projection(
            model, adapter, spec, pairs,
            retain_train.in_order(tr.batch_size) if retain_train else None,
            scope=plan.scope, mode=projection,
        )  # fmt: skip
    # What to step after every optimizer step and close at the end.
    steppers: list[Any] = [fallback_projection] if fallback_projection is not None else routers
    scope = apply_scope(model, adapter, plan.scope, pairs)
    if fallback_projection is not None:
        fallback_projection.hold()
    before_state = snapshot_regions(model, scope.regions, keep=main) if reads else {}
    # Before any sharding. The projected fallback's held tensors cannot change: they are
    # not tunable, and the ratio says what can move (the readers it projects).
    trainable = scope.trainable_params - (fallback_projection.held if fallback_projection else 0)
    counts = (trainable, scope.total_params, trainable / scope.total_params)
    rr_weight = (
        spec.retain_routing_weight(plan.scope, fallback_mode) if retain_train is not None else 0.0
    )
    rmu_layer = fallback_rmu_layer(spec, fallback_mode, len(adapter.decoder_layers()))
    objective = objective_from_spec(
        spec, adapter, pairs, layers=adapter.moe_layers(), retain_routing_weight=rr_weight,
        rmu_layer=rmu_layer,
    )  # fmt: skip
    prepare_reference(
        objective, model, ctx.forget_train, retain_train, seed=tr.seed, routing_holdout=holdout
    )
    climb: RmuClimb | None = None  # the fallback's layer moves up when forgetting stalls
    if rmu_layer is not None and retain_train is not None and spec.seuf.fallback_rmu_patience:
        climb = RmuClimb(
            objective, model, adapter, retain_train, spec.seuf.fallback_rmu_patience,
            rmu_layer, seed=tr.seed,
            # the event's number goes on from a first attempt's; the record keeps its own
            notify=lambda c: ctx.event("rmu_layer_climbed", first_step + int(c["step"]), c),
        )  # fmt: skip

    cache, cache_info = None, None
    if tr.activation_cache and runner.supports_activation_cache:
        corpora = [c for c in (ctx.forget_train, retain_train) if c is not None]
        cache, cache_plan = build_for_training(
            model,
            scope.adapter or adapter,
            objective,
            corpora,
            batch_size=tr.batch_size,
            max_bytes=tr.activation_cache_max_mb * 2**20,
            spill_dir=ctx.out_dir if runner.world == 1 else None,  # ranks: a temp folder each
        )
        if cache is not None:
            cache_info = {
                "layer": cache_plan.layer,
                "samples": cache_plan.cached_samples,
                "memory_bytes": cache_plan.memory_bytes,
                "disk_bytes": cache_plan.disk_bytes,
                "device": str(cache.device),  # where memory_bytes live
            }

    def on_step(info: StepInfo) -> bool:
        step = first_step + info.step
        ctx.event("step", step, {**info.to_json(), "step": step})
        return bool(ctx.should_stop and ctx.should_stop())

    checkpoint_meta: dict[str, Any] = {"selected": [list(p) for p in pairs]}
    if fallback_mode == "all":  # a checkpoint of another fallback never resumes into this one
        checkpoint_meta |= {
            "fallback_projection": fallback_mode,
            "rmu_layer": rmu_layer,
            "rmu_patience": spec.seuf.fallback_rmu_patience,
        }
    if tr.gradient_checkpointing:  # recompute activations in the backward (not reentrant:
        # the frozen layers below give inputs that need no gradient)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        result = train(
            model,
            adapter,
            scope,
            objective,
            BatchStream(ctx.forget_train, tr.batch_size, tr.seed),
            BatchStream(retain_train, tr.batch_size, tr.seed + 1) if retain_train else None,
            tr,
            callback=on_step,
            stop_check=ctx.stop_check,
            routing_reference=ctx.topk_forget,
            routing_batches=ctx.probe_forget,
            overlap_every=tr.stop.eval_every,
            activation_cache=cache,
            runner=runner,
            checkpoint_meta=checkpoint_meta,
            on_resume=lambda step: ctx.event(RESUMED, step, {"from_step": step}),
            after_step=(lambda: [r.after_step() for r in steppers]) if steppers else None,
            observer=climb,
            checkpoints=checkpoints,
        )
    finally:
        close_all(steppers)
        if cache is not None:
            cache_info = {**(cache_info or {}), "hits": cache.stats.hits,
                          "misses": cache.stats.misses}  # fmt: skip
            cache.close()
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    if result.stopped_by == "callback":
        ctx.rank_event(RANK_STOPPED, result.steps)
        raise JobCancelled(result.steps)
    return Attempt(
        plan, tr, scope, projection, routers, fallback_mode, fallback_projection, rmu_layer,
        climb, objective, rr_weight, counts, before_state, result, cache_info,
    )  # fmt: skip


def second_attempt_plan(
    ctx: AttemptContext, first: Attempt, emap: ExpertMap
) -> tuple[str, SelectionPlan, TrainingOptions] | None:
    """What RMU's second attempt trains (seuf.rmu_second_attempt), None where none applies:
    after the projected fallback, the top expert of the expert map as num_experts 1 would
    (the spec's scope and training); after experts auto qualified, the projected fallback
    (its step size and budget), where the spec allows a full fallback that fits and can
    run. Needs a forget target; not under DeepSpeed (its engine keeps the weights' masters:
    a state cannot be put back under it)."""
    spec = ctx.spec
    stop = spec.training.stop
    if not (
        spec.seuf.rmu_second_attempt
        and spec.rmu_projected_fallback_runs()  # the spec's rule: rmu, auto, fallback full...
        and (stop.forget_accuracy_target is not None or stop.forget_loss_target is not None)
        and spec.distributed.backend != "deepspeed"
    ):
        return None
    if first.fallback_mode == "all" and first.rmu_layer is not None:
        top = ranked(emap)[:1]
        if not top:
            return None
        return "top_expert", SelectionPlan(top, spec.scope, first.plan.auto), spec.training
    auto = first.plan.auto
    if (
        auto is None
        or auto.outcome != "qualified"
        # the projected fallback only, where it runs here (one plain worker, retain data)
        or fallback_projection_mode(
            spec, "full", ctx.runner.projects_routers, ctx.retain_train is not None
        )
        != "all"
        or (ctx.full_refusal is not None and ctx.full_refusal() is not None)
    ):
        return None
    plan = SelectionPlan([], "full", auto)
    return "fallback", plan, training_for(plan, spec)


def final_forget(ctx: AttemptContext, attempt: Attempt) -> tuple[bool, dict[str, float]]:
    """Whether the trained model meets the forget target, and the forget check it was
    judged on: the check that stopped training on the target, the utility guard's restored
    state's, else the forget check on the final state (the last step is not always a check
    step)."""
    result, stop = attempt.result, ctx.spec.training.stop
    if result.stopped_by in ("forget_accuracy", "forget_loss"):
        return True, dict(result.metrics)
    if result.guard is not None:
        return bool(result.guard["outcome"] == "target_met"), dict(result.metrics)
    if ctx.stop_check is None:
        return False, {}
    m = dict(ctx.stop_check(ctx.job.model))
    targets = {
        "forget_accuracy": stop.forget_accuracy_target,
        "forget_loss": stop.forget_loss_target,
    }
    return target_reached(m, targets) is not None, m


def _release_training_state(attempt: Attempt, model: nn.Module) -> None:
    """Free what the finished attempt still holds of its training before another trains:
    the optimizer's copy in its last state, the engine the step records reach, gradients
    (nothing after training reads them), so the next attempt's peak is its own."""
    attempt.result.state = {}
    attempt.result.history.clear()
    for p in model.parameters():
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_regions(model: nn.Module, state: dict[tuple[str, int | None], torch.Tensor]) -> None:
    """Put regions (whole tensors, or one expert's slice of a fused tensor) back into the
    model, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (name, expert), value in state.items():
            target = params.get(name)
            if target is None:
                raise RuntimeError(f"cannot put back region {name}[{expert}]")
            (target if expert is None else target[expert]).copy_(value.to(target.dtype))


def _closer(a: dict[str, float], b: dict[str, float], stop: StopRule) -> bool:
    """Whether forget check `a` is closer to the target than `b`: lower forget accuracy
    where that is the target (it moves in coarse steps: ties go on to the loss), else a
    higher forget loss; a check against none (an attempt that never checked) is closer;
    ties: False."""
    acc, loss = "forget_accuracy", "forget_loss"
    if a and not b:
        return True
    if stop.forget_accuracy_target is not None and acc in a and acc in b and a[acc] != b[acc]:
        return a[acc] < b[acc]
    if loss in a and loss in b:
        return a[loss] > b[loss]
    return False


def _host_copy(attempt: Attempt, model: nn.Module) -> dict[tuple[str, int | None], torch.Tensor]:
    """The attempt's trained regions on the host, one tensor at a time (a second copy of
    the model on its device would not fit where the model barely does)."""
    if attempt.plan.scope == "full":  # trained in place; its regions are the parameters
        # less the ones the projected fallback held (frozen, never changed): putting the
        # original back restores them already
        return {
            (n, None): p.detach().to("cpu", copy=True)
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    trained = snapshot_regions(model, attempt.scope.regions, read=attempt.scope.baked_tensors)
    return {k: v.to("cpu") for k, v in trained.items()}


def _restore_original(attempt: Attempt, model: nn.Module) -> None:
    """Put the model back as it was before `attempt` (its scope unwired)."""
    if attempt.plan.scope == "full":
        attempt.scope.bake()  # plain again: requires_grad flags restored
        _write_regions(model, attempt.before_state)
    else:
        attempt.scope.discard()  # the slices dropped, the routers restored: bit for bit


def with_second_attempt(
    ctx: AttemptContext, first: Attempt, emap: ExpertMap
) -> tuple[Attempt, dict[str, Any] | None]:
    """The attempt the job keeps, and the second attempt's record (None: none ran). Call
    right after the first attempt trained, before its scope is baked. The second starts
    from the original weights; the job keeps the one that met the target, where neither
    did the one closer to it (ties: the first)."""
    spec, model = ctx.spec, ctx.job.model
    second_plan = second_attempt_plan(ctx, first, emap)
    if second_plan is None:
        return first, None
    met, first_forget = final_forget(ctx, first)
    if met:
        return first, None
    kind, plan, tr = second_plan
    record: dict[str, Any] = {
        "kind": kind,  # what the second attempt trained: top_expert or fallback
        "first": {
            "scope": first.plan.scope,
            "selected": [s._asdict() for s in first.plan.selected],
            "steps": first.result.steps,
            "forget": first_forget,
        },
        "selected": [s._asdict() for s in plan.selected],
        "training": {"lr": tr.lr, "max_steps": tr.max_steps},
    }
    ctx.event(SECOND_ATTEMPT, first.result.steps, dict(record))
    _release_training_state(first, model)
    trained = _host_copy(first, model)  # put back if the first is the one kept
    _restore_original(first, model)
    second = run_attempt(ctx, plan, tr, checkpoints=False, first_step=first.result.steps)
    met, forget = final_forget(ctx, second)
    keep_second = met or _closer(forget, first_forget, spec.training.stop)
    record |= {
        "steps": second.result.steps,
        "stopped_by": second.result.stopped_by,
        "target_met": met,
        "forget": forget,
        "kept": "second" if keep_second else "first",
    }
    note = attempt_note(record, first, second)
    if keep_second:
        emap.selected = list(plan.selected)
        second.plan = replace(second.plan, attempt_note=note)
        return second, record
    _release_training_state(second, model)
    _restore_original(second, model)
    _write_regions(model, trained)
    emap.selected = list(first.plan.selected)
    first.scope = apply_scope(model, ctx.job.adapter, first.plan.scope, first.plan.pairs)
    first.plan = replace(first.plan, attempt_note=note)
    return first, record


def _trained(plan: SelectionPlan) -> str:
    if plan.scope == "full":
        return "all parameters (the projected fallback)"
    experts = ", ".join(f"L{s.layer}E{s.expert}" for s in plan.selected)
    return f"expert {experts}" if len(plan.selected) == 1 else f"experts {experts}"


def _check(forget: dict[str, float], attempt: Attempt) -> str:
    """The forget check `final_forget` judged the attempt on, and when: the utility guard's
    put-back state is from an earlier step than the last one run."""
    steps = attempt.result.steps
    guard = attempt.result.guard or {}
    restored = guard.get("restored_step")
    when = (
        f"at step {restored} of {steps}, the state the utility guard put back"
        if restored is not None
        else f"after {steps} steps"
    )
    if "forget_accuracy" in forget:
        return f"forget accuracy {forget['forget_accuracy']:.3f} {when}"
    if "forget_loss" in forget:
        return f"forget loss {forget['forget_loss']:.3f} {when}"
    return f"no forget check {when}"


def attempt_note(record: dict[str, Any], first: Attempt, second: Attempt) -> str:
    """The sentence a second attempt adds to the job's selection warning: what each attempt
    trained, how close it came, and which one the model is."""
    head = (
        f"Second attempt: {_trained(first.plan)} missed the forget target "
        f"({_check(record['first']['forget'], first)}), then {_trained(second.plan)}"
    )
    outcome = (
        "met it" if record["target_met"] else f"missed it too ({_check(record['forget'], second)})"
    )
    kept = second if record["kept"] == "second" else first
    return f"{head} {outcome}; the model is the {record['kept']} attempt, {_trained(kept.plan)}."
