"""The single-process unlearning loop: forget (and retain) batches -> objective -> AdamW
over the scope's trainable tensors only -> schedule, clipping, stop rules, callbacks.

Read top to bottom: `train` is the whole loop. Resumable: every StepInfo carries a
`state()` closure (optimizer, scheduler, step, RNG) that `train(..., resume=state)` accepts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from workers.activation_cache import ActivationCache
from workers.data import Batch
from workers.moe.base import MoEAdapter
from workers.objectives import Batches, Objective, run_forward, sequence_nll
from workers.routing import TopKSnapshot, routing_overlap
from workers.scope import TrainableScope
from workers.spec import TrainingOptions


class BatchSource(Protocol):
    """Anything with `batch(step)`, e.g. workers.data.BatchStream (pure in step, so a
    resumed run sees the same batches). A plain list is also accepted (cycled)."""

    def batch(self, step: int) -> Batch: ...


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
    stopped_by: str  # max_steps | forget_accuracy | forget_loss | callback | non_finite_loss
    history: list[StepInfo]
    metrics: dict[str, float]  # last stop_check result
    overlap: float | None
    state: dict[str, Any]


def lr_factor(step: int, options: TrainingOptions) -> float:
    """LR multiplier for 0-based `step`: linear warmup, then constant / linear / cosine to 0."""
    w = options.warmup_steps
    if w and step < w:
        return (step + 1) / w
    if options.schedule == "constant":
        return 1.0
    progress = (step - w) / max(1, options.max_steps - w)
    progress = min(max(progress, 0.0), 1.0)
    if options.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def measure_overlap(
    model: nn.Module, adapter: MoEAdapter, batches: Sequence[Batch], reference: TopKSnapshot
) -> float:
    """Top-K overlap with a workers.routing.TopKSnapshot on the same batches."""
    return routing_overlap(model, adapter, batches, reference)


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
) -> TrainResult:
    """Train `scope.trainable_parameters()` on `objective_fn` until a stop rule fires.

    stop_check(model) -> {"forget_accuracy": ..., "forget_loss": ...} runs every
    options.stop.eval_every steps; training stops when forget_accuracy <= its target or
    forget_loss >= its target. A callback returning True stops training ("callback").
    routing_reference (a TopKSnapshot from workers.routing.collect_topk on routing_batches,
    taken from the original model) makes each StepInfo carry the latest overlap, measured
    every `overlap_every` steps and at the end. activation_cache (workers.activation_cache)
    runs the forward from the cached layer up; overlap and stop checks run the whole model.
    """
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
    params = scope.trainable_parameters()
    if not params:
        raise ValueError("the scope has no trainable parameter")

    torch.manual_seed(options.seed)
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, options))
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = int(resume["step"])
        torch.set_rng_state(resume["rng"])

    done = [start]  # steps done so far; lets a stale state() closure refuse to run

    def state_at(step: int) -> Callable[[], dict[str, Any]]:
        def state() -> dict[str, Any]:
            # Lazy (a deep copy per step would be waste) but only valid at its own step.
            if done[0] != step:
                raise RuntimeError(f"state() of step {step} called at step {done[0]}")
            return {
                "step": step,
                "optimizer": copy.deepcopy(opt.state_dict()),
                "scheduler": copy.deepcopy(sched.state_dict()),
                "rng": torch.get_rng_state(),
            }

        return state

    # Overlap is measured with the layer list pinned before wiring (see TrainableScope).
    probe_adapter = scope.adapter or adapter
    uses_retain = objective_fn.definition.uses_retain and retain_batches is not None
    history: list[StepInfo] = []
    overlap: float | None = None
    metrics: dict[str, float] = {}
    stopped_by = "max_steps"
    step = start
    model.train()
    while step < options.max_steps:
        batches = Batches(
            _batch_at(forget_batches, step),
            _batch_at(retain_batches, step) if uses_retain else None,  # type: ignore[arg-type]
        )
        cached = (
            activation_cache.active(model, probe_adapter)
            if activation_cache is not None
            else nullcontext()
        )
        with cached:
            outputs = objective_fn.forward(model, batches)
        loss, parts = objective_fn(outputs, batches)
        if not torch.isfinite(loss):
            stopped_by = "non_finite_loss"  # never step on inf/nan: the weights stay valid
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = options.grad_clip if options.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        step += 1
        done[0] = step

        if routing_reference is not None and (
            step % overlap_every == 0 or step == options.max_steps
        ):
            overlap = measure_overlap(model, probe_adapter, routing_batches, routing_reference)
        checked: dict[str, float] = {}
        if stop_check is not None and step % stop.eval_every == 0:
            checked = metrics = dict(stop_check(model))
            model.train()
        info = StepInfo(
            step, float(loss.detach()), parts, lr, grad_norm, overlap, checked, state_at(step)
        )
        history.append(info)
        if checked:
            reached = _target_reached(checked, targets)
            if reached:
                stopped_by = reached
        if callback is not None and callback(info):
            stopped_by = "callback"
        if stopped_by != "max_steps":
            break
    model.eval()
    return TrainResult(step, stopped_by, history, metrics, overlap, state_at(step)())


def _target_reached(metrics: dict[str, float], targets: dict[str, float | None]) -> str | None:
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
