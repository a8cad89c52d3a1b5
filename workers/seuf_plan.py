"""The glue the job pipeline calls for issue 13's SEUF options, so wiring them is a few lines
there: which experts and which scope (num_experts auto and its fallback), and the router
projection handles to step after every optimizer step.

    plan = plan_selection(emap, spec, SelectionCost.of(model, adapter))
    # plan.scope replaces spec.scope ("full" when auto fell back to it); plan.selected;
    # plan.warning -> a `selection_warning` event and result field
    routers = attach_projection(model, adapter, spec, plan.pairs, retain_batches)
    ... on every step, right after the optimizer step and BEFORE the stop check and the
    overlap measure: for r in routers: r.after_step()    ... finally: close_all(routers)

(After the stop check is too late: an experiment that projected in the per-step callback
stopped on a forget accuracy of 0.30 measured before the projection and ended at 0.33.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from workers.attribution import ExpertMap, ScoredExpert
from workers.moe.base import MoEAdapter
from workers.projected_fallback import FallbackProjection
from workers.router_projection import ProjectedRouter, RouterProjector
from workers.routing import Batch
from workers.selection import (
    AutoSelection,
    SelectionCost,
    SelectionRefused,
    select_auto,
    select_experts,
)
from workers.spec import JobSpec, TrainingOptions

# A fallback to full parameters trains at the full-parameter examples' step size (METHOD.md:
# ~1e-4 for all parameters; a SEUF step size of 3e-3 would wreck them). Its budget when a
# forget target ends the job: the sweep's worlds met the target at 1e-4 in 42-213 steps, a
# small 2-layer world built on another machine needed 489 (GDiff) and 573 (GA) and was at
# 0.78 after 300: the budget is a bound on time, the target still ends the job.
FULL_FALLBACK_LR = 1e-4
FULL_FALLBACK_STEPS = 1000
# RMU's fallback steers activations, not the NLL: at 1e-4 it missed the forget target on 3
# of 6 sweep worlds in 300 steps, at 1e-3 (the full RMU example's step size) it reached it on
# 5 of 6 keeping >= 0.99 of unseen utility (README "Worlds nobody tuned it on").
FULL_FALLBACK_LR_BY_ALGORITHM = {"rmu": 1e-3}


def full_fallback_lr(algorithm: str) -> float:
    """The largest step size auto's full fallback trains at for `algorithm`."""
    return FULL_FALLBACK_LR_BY_ALGORITHM.get(algorithm, FULL_FALLBACK_LR)


@dataclass
class SelectionPlan:
    selected: list[ScoredExpert]
    scope: str  # the scope the job trains (spec.scope, or "full" after an auto fallback)
    auto: AutoSelection | None = None
    # What a second attempt changed (workers/attempt.py): the warning says which attempt the
    # model is, since auto's own warning describes the plan it chose, not the one kept.
    attempt_note: str | None = None

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(s.layer, s.expert) for s in self.selected]

    @property
    def warning(self) -> str | None:
        said = [self.auto.warning if self.auto is not None else None, self.attempt_note]
        return " ".join(w for w in said if w) or None

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "selected": [s._asdict() for s in self.selected],
            "auto": None if self.auto is None else self.auto.to_json(),
            "selection_warning": self.warning,
        }


def plan_selection(
    emap: ExpertMap,
    spec: JobSpec,
    cost: SelectionCost | None = None,
    full_fallback_refusal: Callable[[], str | None] | None = None,
) -> SelectionPlan:
    """The experts and scope of a job. Raises workers.selection.SelectionRefused (a
    ValueError) when num_experts is auto, nothing qualifies and the fallback is stop, or
    the fallback is full and `full_fallback_refusal` says it cannot run (its memory plan
    does not fit the worker: stopping beats an out-of-memory error hours later)."""
    if spec.scope == "full":
        return SelectionPlan([], "full")
    if spec.seuf.num_experts != "auto":
        return SelectionPlan(select_experts(emap, spec.seuf), spec.scope)
    auto = select_auto(emap, spec.seuf, cost, full_fallback_refusal)
    if auto.outcome == "stop":
        raise SelectionRefused(auto)
    emap.selected = list(auto.selected)
    scope = "full" if auto.outcome == "full" else spec.scope
    return SelectionPlan(list(auto.selected), scope, auto)


def full_fallback_refusal(
    spec: JobSpec, config: dict[str, Any], device: str, workers: int
) -> str | None:
    """None when the job's full-parameter fallback fits this worker (workers/planner.py on
    the loaded model's config, against this machine's memory or GPU), else the numbers."""
    from workers.model_shape import shape_from_config
    from workers.planner import GiB, estimate, local_capacity

    try:
        shape = shape_from_config(config)
    except ValueError:
        return None  # a config the planner cannot read: the planner never refuses it
    cap = local_capacity(device, workers)
    plan = estimate(shape, spec.model_copy(update={"scope": "full"}), cap)
    if plan.fits:
        return None
    return (
        f"it needs {plan.per_worker_bytes / GiB:.1f} GiB per worker, workers have "
        f"{cap.per_worker_bytes / GiB:.1f} GiB ({cap.source})"
    )


def projection_mode(spec: JobSpec, scope: str, can_project: bool, has_retain: bool) -> str:
    """The router projection that runs: the spec's choice, or for `auto` nullspace where it
    can run (retain data, one plain worker: `can_project`, workers.runners.base.Runner.
    projects_routers; a scope that trains a router: seuf, router, or the full-parameter
    fallback of a job that asked for SEUF), else none."""
    mode = spec.seuf.router_projection
    if mode != "auto":
        return mode
    fallback = scope == "full" and spec.scope != "full"
    runs = has_retain and can_project and (scope in ("seuf", "router") or fallback)
    return "nullspace" if runs else "none"


def fallback_projection_mode(
    spec: JobSpec, scope: str, can_project: bool, has_retain: bool
) -> str | None:
    """What auto's full fallback projects (None when no fallback to full runs): all =
    every matrix (workers/projected_fallback.py), routers = the routers only, none = nothing
    (projection_mode says none). auto: all for RMU where it can run (retain data here, one
    plain worker: `can_project`, and JobSpec.projected_fallback_refusal), routers otherwise."""
    if scope != "full" or spec.scope == "full":
        return None
    mode = spec.seuf.fallback_projection
    if mode == "auto":
        can = has_retain and can_project and spec.projected_fallback_refusal() is None
        mode = "all" if spec.algorithm == "rmu" and can else "routers"
    if mode == "routers" and projection_mode(spec, scope, can_project, has_retain) == "none":
        return "none"  # what the certificate shows: nothing was projected
    return mode


def fallback_rmu_layer(spec: JobSpec, fallback_mode: str | None, num_layers: int) -> int | None:
    """The layer RMU steers under auto's full fallback with every matrix projected (None:
    the objective's own rule): n // 4, about the RMU paper's depth (it steers layer 7 of
    32). With every reader of the stream held on retain inputs, the forget states must
    leave through the layers below the steered one; on the sweep's 4-layer worlds layer 1
    met the forget target on 5 of 6, a prototype at the middle layer (2) on 4 (README
    "RMU's projected fallback")."""
    if spec.algorithm != "rmu" or fallback_mode != "all" or spec.objective.rmu_layer is not None:
        return None
    return num_layers // 4


def attach_projection(
    model: nn.Module,
    adapter: MoEAdapter,
    spec: JobSpec,
    pairs: Sequence[tuple[int, int]],
    retain_batches: Iterable[Batch] | None,
    scope: str | None = None,
    mode: str | None = None,
) -> list[ProjectedRouter]:
    """ProjectedRouter handles for every router the scope trains, when the projection
    `mode` (projection_mode; default the spec's) is nullspace (call BEFORE training: the
    retain hidden states are the original model's): the selected pairs' layers, or every
    MoE layer when `scope` is full (num_experts auto's fallback: every router trains; the
    spec refuses nullspace for a job that asked for full parameters). Empty when it is off,
    the scope trains no router (experts), or there is no retain data (ValueError: the
    projection is defined by it)."""
    scope = scope or spec.scope
    mode = mode or spec.seuf.router_projection
    if scope == "full":
        layers = [m.layer for m in adapter.moe_layers()]
    elif scope in ("seuf", "router"):
        layers = sorted({layer for layer, _ in pairs})
    else:
        layers = []
    if mode != "nullspace" or not layers:
        return []
    if retain_batches is None:
        raise ValueError("seuf.router_projection 'nullspace' needs a retain corpus")
    batches = list(retain_batches)
    out: list[ProjectedRouter] = []
    try:
        for layer in layers:
            proj = RouterProjector.for_layer(
                model, adapter, layer, batches, energy=spec.seuf.router_projection_energy
            )
            out.append(ProjectedRouter(proj, adapter.moe_layer(layer).router))
    except Exception:
        close_all(out)
        raise
    return out


def close_all(routers: Iterable[ProjectedRouter | FallbackProjection]) -> None:
    for r in routers:
        r.close()


def training_for(plan: SelectionPlan, spec: JobSpec) -> TrainingOptions:
    """The training settings the plan's scope needs: the spec's, or after a fallback to
    full parameters its step size capped and, when a forget target ends the job, its
    budget widened (FULL_FALLBACK_*: the smaller steps need more of them; without a target
    the spec's max_steps is the user's budget and stays)."""
    tr = spec.training
    if plan.scope == "full" and spec.scope != "full":
        stop = tr.stop
        targeted = stop.forget_accuracy_target is not None or stop.forget_loss_target is not None
        steps = max(tr.max_steps, FULL_FALLBACK_STEPS) if targeted else tr.max_steps
        lr = spec.seuf.fallback_lr
        lr = min(tr.lr, full_fallback_lr(spec.algorithm)) if lr == "auto" else lr
        return tr.model_copy(update={"lr": lr, "max_steps": steps})
    return tr
