"""The ONE unlearning loop, for every runner: forget (and retain) batches -> objective ->
AdamW over the scope's trainable tensors only -> LR schedule (torch schedulers), clipping,
stop rules, callbacks, checkpoints.

Read top to bottom: `train` is the whole loop. What differs between one process and a Ray
Train rank (the engine that steps, this rank's share of a batch, agreeing on a stop, the
checkpoint hook) is the `runner` (workers/runners/base.py). Resumable: every StepInfo carries
a `state()` closure (optimizer, scheduler, step, RNG) that `train(..., resume=state)`
accepts; a Ray Train runner restores its last checkpoint by itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from workers.activation_cache import ActivationCache
from workers.data import Batch
from workers.devices import MasterWeights
from workers.guard import GuardedSteps
from workers.moe.base import MoEAdapter
from workers.objectives import Batches, Objective, run_forward, sequence_nll
from workers.routing import TopKSnapshot, routing_overlap
from workers.runners.base import LocalRunner, Runner, Training
from workers.scope import TrainableScope
from workers.spec import TrainingOptions

# Why a run stopped, as the int a runner agrees on (max over ranks; 0 = keep going).
STOP_CODES = ("", "forget_accuracy", "forget_loss", "callback", "utility_guard")
# Stops on which the utility guard puts back the state it kept (workers/guard.py).
RESTORING_STOPS = ("utility_guard", "max_steps")


class BatchSource(Protocol):
    """Anything with `batch(step)`, e.g. workers.data.BatchStream (pure in step, so a
    resumed run sees the same batches). A plain list is also accepted (cycled)."""

    def batch(self, step: int) -> Batch: ...


class CheckObserver(Protocol):
    """Something that acts on every forget check that did not stop training, with state a
    checkpoint carries (workers/rmu_climb.py: RMU steers a higher layer when it stalls)."""

    def observe(self, step: int, checked: dict[str, float]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _batch_at(source: BatchSource | Sequence[Batch], step: int) -> Batch:
    if hasattr(source, "batch"):
        return source.batch(step)  # type: ignore[union-attr]
    seq = list(source)  # type: ignore[arg-type]
    if not seq:
        raise ValueError("empty batch list")
    return seq[step % len(seq)]


@dataclass
class StepInfo:
    """What the per-step callback receives (after the optimizer step)."""

    step: int  # steps done so far (1-based)
    loss: float
    parts: dict[str, float]
    lr: float  # learning rate used for this step
    grad_norm: float  # before clipping
    overlap: float | None = None  # latest routing overlap vs the reference (None if unknown)
    metrics: dict[str, float] = field(default_factory=dict)  # stop_check result, if run
    # Resumable training state (optimizer, scheduler, step, RNG); call it inside the
    # callback: after the next step it raises instead of returning a mislabelled state.
    state: Callable[[], dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "parts": self.parts,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "overlap": self.overlap,
            "metrics": self.metrics,
        }


@dataclass
class TrainResult:
    steps: int
    # max_steps | forget_accuracy | forget_loss | callback | non_finite_loss | utility_guard
    stopped_by: str
    history: list[StepInfo]
    metrics: dict[str, float]  # last stop_check result (the guard's restored state's)
    overlap: float | None
    state: dict[str, Any]
    resumed_from: int = 0  # the step a restored checkpoint (or `resume`) started at
    guard: dict[str, Any] | None = None  # the utility guard's record (UtilityGuard.to_json)


def make_scheduler(opt: torch.optim.Optimizer, options: TrainingOptions) -> LRScheduler:
    """LR multiplier at 0-based step s: linear warmup (s + 1) / warmup_steps, then
    constant / linear / cosine from 1 to 0 over the remaining max_steps - warmup_steps."""
    w = options.warmup_steps
    n = max(1, options.max_steps - w)
    main: LRScheduler
    if options.schedule == "constant":
        main = ConstantLR(opt, factor=1.0, total_iters=0)
    elif options.schedule == "linear":
        main = LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=n)
    else:
        main = CosineAnnealingLR(opt, T_max=n, eta_min=0.0)
    if w == 0:
        return main
    warm = LinearLR(opt, start_factor=1.0 / w, end_factor=1.0, total_iters=max(w - 1, 0))
    return SequentialLR(opt, [warm, main], milestones=[w])


def lr_factor(step: int, options: TrainingOptions) -> float:
    """The schedule's multiplier at 0-based `step` (what make_scheduler applies)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, options)
    for _ in range(step):
        opt.step()
        sched.step()
    return float(opt.param_groups[0]["lr"])


def train(
    model: nn.Module,
    adapter: MoEAdapter,
    scope: TrainableScope,
    objective_fn: Objective,
    forget_batches: BatchSource | Sequence[Batch],
    retain_batches: BatchSource | Sequence[Batch] | None,
    options: TrainingOptions,
    callback: Callable[[StepInfo], bool | None] | None = None,
    stop_check: Callable[[nn.Module], dict[str, float]] | None = None,
    *,
    routing_reference: TopKSnapshot | None = None,
    routing_batches: Sequence[Batch] | None = None,
    overlap_every: int = 1,
    resume: dict[str, Any] | None = None,
    activation_cache: ActivationCache | None = None,
    runner: Runner | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    on_resume: Callable[[int], None] | None = None,
    after_step: Callable[[], None] | None = None,
    observer: CheckObserver | None = None,
    checkpoints: bool = True,
) -> TrainResult:
    """Train `scope.trainable_parameters()` on `objective_fn` until a stop rule fires.

    stop_check(model) -> {"forget_accuracy": ..., "forget_loss": ...} runs every
    options.stop.eval_every steps; training stops when forget_accuracy <= its target or
    forget_loss >= its target. A callback returning True stops training ("callback").
    options.stop.utility_drop_tolerance / options.lr_policy decay (workers.guard): the same
    check also runs before step 1 (the baseline) and at the last step; the guard stops
    ("utility_guard") when utility falls past the tolerance, and on that stop or the step
    budget the guard's best state is put back on every rank.
    routing_reference (a TopKSnapshot from workers.routing.collect_topk on routing_batches,
    taken from the original model) makes each StepInfo carry the latest overlap, measured
    every `overlap_every` steps and at the end. activation_cache (workers.activation_cache)
    runs the forward from the cached layer up; overlap and stop checks run the whole model.

    runner (default: one process): a Ray Train rank steps its share of every batch through
    DDP or DeepSpeed; stop rules and the callback are rank 0's and every rank stops after
    the same step; every `runner.checkpoint_every` steps a checkpoint (with
    `checkpoint_meta`) is saved, and a run that has one restores it (then `on_resume`).
    observer (one process only) sees every forget check that did not stop training,
    before the last step; its state travels in the checkpoints. checkpoints=False: the run
    neither restores nor writes one (the job's second attempt, workers/attempt.py: the
    checkpoints stay its first attempt's, which a resumed job runs again).
    """
    run = runner or LocalRunner()
    stop = options.stop
    targets = {
        "forget_accuracy": stop.forget_accuracy_target,
        "forget_loss": stop.forget_loss_target,
    }
    if any(v is not None for v in targets.values()) and stop_check is None:
        raise ValueError("a forget target is set (training.stop) but no stop_check was given")
    if objective_fn.definition.needs_retain and retain_batches is None:
        raise ValueError(f"algorithm '{objective_fn.name}' needs retain batches")
    if (routing_reference is None) != (routing_batches is None):
        raise ValueError("routing_reference and routing_batches go together")
    # A tensor the scope wired but someone froze since (the projected fallback's held ones:
    # embeddings, LM head, o_proj, down projections) cannot change: no optimizer state and
    # no float32 master for it (under bfloat16 that master was 4 bytes a held parameter).
    named = [(n, p) for n, p in scope.named_trainable() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the scope has no trainable parameter")
    if observer is not None and run.world != 1:
        raise ValueError("a check observer runs in one process only")

    torch.manual_seed(options.seed)
    # bfloat16 trainables: AdamW steps float32 masters (small updates are not rounded away).
    master = None if run.own_master_weights else MasterWeights(params)
    master = master if master is not None and master.copies else None
    stepped = master.parameters() if master is not None else params
    opt = torch.optim.AdamW(stepped, lr=options.lr, weight_decay=options.weight_decay)
    sched = make_scheduler(opt, options)
    engine = run.engine(Training(model, scope, named, opt, options, master))
    restored = resume
    if restored is not None:
        opt.load_state_dict(restored["optimizer"])
    elif checkpoints:
        restored = run.restore(engine)
        if restored is not None and restored.get("meta") != (checkpoint_meta or {}):
            raise RuntimeError(
                f"the checkpoint was written for {restored.get('meta')}, "
                f"this attempt is {checkpoint_meta}"
            )
    start = 0
    if restored is not None and master is not None:
        if "master" in restored:  # the float32 values the checkpoint held
            master.load_state_dict(restored["master"])
        else:
            master.sync_from_model()
    if restored is not None and observer is not None and "observer" in restored:
        observer.load_state_dict(restored["observer"])
    if restored is not None:
        start = int(restored["step"])
        if "scheduler" in restored:
            sched.load_state_dict(restored["scheduler"])
        if "rng" in restored:
            torch.set_rng_state(restored["rng"])
        if start and on_resume is not None:
            on_resume(start)
    guarded = _guarded_steps(options, stop_check, model, params, master, restored, start)

    done = [start]  # steps done so far; lets a stale state() closure refuse to run

    def state_at(step: int) -> Callable[[], dict[str, Any]]:
        def state() -> dict[str, Any]:
            # Lazy (a deep copy per step would be waste) but only valid at its own step.
            if done[0] != step:
                raise RuntimeError(f"state() of step {step} called at step {done[0]}")
            return {
                "step": step,
                "optimizer": engine.optimizer_state(),
                "scheduler": copy.deepcopy(sched.state_dict()),
                "rng": torch.get_rng_state(),
                **({"master": master.state_dict()} if master is not None else {}),
                **({"guard": guarded.state_dict()} if guarded is not None else {}),
                **({"observer": observer.state_dict()} if observer is not None else {}),
            }

        return state

    # Overlap is measured with the layer list pinned before wiring (see TrainableScope).
    probe_adapter = scope.adapter or adapter
    uses_retain = objective_fn.uses_retain and retain_batches is not None
    forget_src = run.shard(forget_batches)  # type: ignore[arg-type]
    retain_src = run.shard(retain_batches) if uses_retain else None  # type: ignore[arg-type]
    history: list[StepInfo] = []
    overlap: float | None = None
    metrics: dict[str, float] = {}
    stopped_by = "max_steps"
    step = start
    while step < options.max_steps:
        batches = Batches(
            _batch_at(forget_src, step),
            _batch_at(retain_src, step) if retain_src is not None else None,
        )
        cached = (
            activation_cache.active(model, probe_adapter)
            if activation_cache is not None
            else nullcontext()
        )
        engine.module.train()
        with cached:
            outputs = objective_fn.forward(engine.module, batches)
        loss, parts = objective_fn(outputs, batches)
        # Never step on inf/nan (the weights stay valid); every rank agrees before the
        # (collective) backward.
        if run.agree([0 if torch.isfinite(loss) else 1])[0]:
            stopped_by = "non_finite_loss"
            break
        with guarded.scaled(opt) if guarded is not None else nullcontext():
            lr = opt.param_groups[0]["lr"]
            grad_norm = engine.step(loss)
        if after_step is not None:  # e.g. the router projection: before any check
            after_step()
            if master is not None:  # the projection changed the model's tensors: a float32
                master.sync_from_model()  # master kept apart would carry what it removed
        sched.step()
        step += 1
        done[0] = step

        # Measured on the plain model (no DDP buffer sync); ZeRO-3 hooks still gather.
        if routing_reference is not None and (
            step % overlap_every == 0 or step == options.max_steps
        ):
            overlap = routing_overlap(model, probe_adapter, routing_batches, routing_reference)
        checked: dict[str, float] = {}
        last = guarded is not None and step == options.max_steps  # the guard judges it
        if stop_check is not None and (step % stop.eval_every == 0 or last):
            checked = metrics = dict(stop_check(model))
        info = StepInfo(
            step, float(loss.detach()), parts, lr, grad_norm, overlap, checked, state_at(step)
        )
        history.append(info)
        code, proposal = 0, [0, 0, 0, 0] if guarded is not None else []
        if run.is_main:  # rank 0 decides for everyone
            reached = target_reached(checked, targets) if checked else None
            code = STOP_CODES.index(reached) if reached else 0
            if guarded is not None:
                worse, proposal = guarded.propose(step, checked)
                code = STOP_CODES.index("utility_guard") if worse else code
            if callback is not None and callback(info):
                code = STOP_CODES.index("callback")
        code, *agreed = run.agree([code, *proposal])
        if guarded is not None:
            guarded.apply(step, agreed)
        if code:
            stopped_by = STOP_CODES[code]
            break
        if observer is not None and checked and step < options.max_steps:
            observer.observe(step, checked)  # not at the last step: nothing would follow
        every = run.checkpoint_every if checkpoints else 0
        if every and step % every == 0 and step < options.max_steps:
            run.save(engine, {**state_at(step)(), "meta": checkpoint_meta or {}})
    if guarded is not None and stopped_by in RESTORING_STOPS:
        (code,) = run.agree([guarded.restore_code() if run.is_main else 0])
        metrics = guarded.restore(code) or metrics
    model.eval()
    return TrainResult(
        step,
        stopped_by,
        history,
        metrics,
        overlap,
        state_at(step)(),
        start,
        guarded.to_json() if guarded is not None else None,
    )


def _guarded_steps(
    options: TrainingOptions,
    stop_check: Callable[[nn.Module], dict[str, float]] | None,
    model: nn.Module,
    params: list[nn.Parameter],
    master: MasterWeights | None,
    restored: dict[str, Any] | None,
    start: int,
) -> GuardedSteps | None:
    """The utility guard / lr_policy decay of this run (None: neither is asked for): a
    fresh baseline (the stop check before step 1, on every rank), or the one a resumed
    run's checkpoint carries (never a baseline measured on already-trained weights)."""
    if options.stop.utility_drop_tolerance is None and options.lr_policy != "decay":
        return None
    if stop_check is None:
        raise ValueError("the utility guard and lr_policy decay need a stop_check")
    if start:
        if restored is None or "guard" not in restored:
            raise RuntimeError(
                f"resuming at step {start} without the guard's state (its baseline): the "
                "checkpoint was written by a run without the guard"
            )
        return GuardedSteps(options, params, master, {}, resumed=restored["guard"])
    return GuardedSteps(options, params, master, stop_check(model))


def target_reached(metrics: dict[str, float], targets: dict[str, float | None]) -> str | None:
    """The stop rule a forget check meets ("forget_accuracy" / "forget_loss"), else None;
    `targets` maps each to its target (None: not set)."""
    acc_t, loss_t = targets["forget_accuracy"], targets["forget_loss"]
    if acc_t is not None:
        if "forget_accuracy" not in metrics:
            raise ValueError("stop_check returned no 'forget_accuracy' but a target is set")
        if metrics["forget_accuracy"] <= acc_t:
            return "forget_accuracy"
    if loss_t is not None:
        if "forget_loss" not in metrics:
            raise ValueError("stop_check returned no 'forget_loss' but a target is set")
        if metrics["forget_loss"] >= loss_t:
            return "forget_loss"
    return None


def forget_loss_check(batches: Sequence[Batch]) -> Callable[[nn.Module], dict[str, float]]:
    """A stop_check measuring the per-token forget NLL on fixed batches (no grad)."""

    def check(model: nn.Module) -> dict[str, float]:
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for b in batches:
                nll, n = sequence_nll(run_forward(model, b).logits, b)
                total += float(nll.sum())
                count += float(n.sum())
        return {"forget_loss": total / max(count, 1.0)}

    return check
