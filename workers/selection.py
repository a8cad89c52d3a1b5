"""Expert selection: which (layer, expert) pairs SEUF unlearns, from an ExpertMap.

Modes (SeufOptions.selection): top_m (global top-M, the paper's default with M=1),
in_layer (top-M inside `layer`), per_layer (top-1 of every MoE layer, best layer first),
random (M pairs drawn uniformly with `seed`, an ablation), manual (`experts`, validated);
num_experts "auto" (`select_auto`): as many experts as the forget knowledge needs.
The first returned expert's layer is the target layer: its router is the one trained
with the anchor loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.attribution import ExpertMap, ScoredExpert
from workers.spec import SeufOptions


def _check_count(m: int, available: int, where: str) -> None:
    if m > available:
        raise ValueError(f"seuf.num_experts={m} but only {available} routed experts exist {where}")


def select_experts(expert_map: ExpertMap, options: SeufOptions) -> list[ScoredExpert]:
    """The selected experts, best (or first given) first; also stored in
    `expert_map.selected`. Raises ValueError naming valid values on bad layers/experts.
    num_experts auto: SelectionRefused when nothing qualifies and the fallback is stop, or
    full (a list of experts cannot say "all parameters": callers that can switch the scope
    use workers.seuf_plan.plan_selection)."""
    if options.num_experts == "auto":
        auto = select_auto(expert_map, options)
        if auto.outcome in ("stop", "full"):
            raise SelectionRefused(auto)
        expert_map.selected = list(auto.selected)
        return list(auto.selected)
    m = options.num_experts
    e = expert_map.num_experts
    ranking = ranked(expert_map)
    mode = options.selection
    if mode == "top_m":
        _check_count(m, len(ranking), "in the model")
        chosen = ranking[:m]
    elif mode == "in_layer":
        layer = options.layer
        if layer not in expert_map.layers:
            raise ValueError(
                f"seuf.layer={layer} is not an MoE layer; MoE layers: {expert_map.layers}"
            )
        _check_count(m, e, f"in layer {layer}")
        chosen = [p for p in ranking if p.layer == layer][:m]
    elif mode == "per_layer":
        best: dict[int, ScoredExpert] = {}
        for p in ranking:  # ranking is best-first, so the first seen per layer wins
            best.setdefault(p.layer, p)
        chosen = sorted(best.values(), key=lambda p: (-p.score, p.layer))
    elif mode == "random":
        _check_count(m, len(ranking), "in the model")
        pairs = sorted(ranking, key=lambda p: (p.layer, p.expert))  # seed-stable order
        chosen = random.Random(options.seed).sample(pairs, m)
    elif mode == "manual":
        chosen = []
        seen: set[tuple[int, int]] = set()
        for n, ref in enumerate(options.experts):
            if ref.layer not in expert_map.layers:
                raise ValueError(
                    f"seuf.experts[{n}].layer={ref.layer} is not an MoE layer (dense or out "
                    f"of range); MoE layers: {expert_map.layers}"
                )
            if not 0 <= ref.expert < e:
                raise ValueError(
                    f"seuf.experts[{n}].expert={ref.expert} out of range: valid 0..{e - 1}"
                )
            if (ref.layer, ref.expert) in seen:
                raise ValueError(f"seuf.experts[{n}] repeats layer {ref.layer} expert {ref.expert}")
            seen.add((ref.layer, ref.expert))
            chosen.append(
                ScoredExpert(ref.layer, ref.expert, expert_map.score(ref.layer, ref.expert))
            )
    else:  # pragma: no cover - SeufOptions validates the mode
        raise ValueError(f"unknown selection mode {mode!r}")
    expert_map.selected = list(chosen)
    return list(chosen)


@dataclass(frozen=True)
class SelectionCost:
    """Parameter counts that price a selection: per MoE layer, one expert's slice and the
    router; `total` is every parameter of the model. Without it only the count is bounded."""

    total: int
    expert: dict[int, int]
    router: dict[int, int]

    @classmethod
    def of(cls, model: Any, adapter: Any) -> SelectionCost:
        """From a model and its workers.moe adapter (fused [E, ...] expert tensors; whole
        sizes of partitioned ones)."""
        from workers.partitioned import full_numel, full_shape

        params = dict(model.named_parameters())
        expert: dict[int, int] = {}
        router: dict[int, int] = {}
        for m in adapter.moe_layers():
            expert[m.layer] = sum(
                full_numel(params[n]) // full_shape(params[n])[0] for n in m.expert_params
            )
            router[m.layer] = sum(full_numel(params[n]) for n in m.router_params)
        return cls(sum(full_numel(p) for p in params.values()), expert, router)

    def of_pairs(self, pairs: list[ScoredExpert]) -> int:
        """Trainable parameters of a SEUF scope over `pairs` (slices + their layers' routers)."""
        layers = {p.layer for p in pairs}
        return sum(self.expert[p.layer] for p in pairs) + sum(self.router[x] for x in layers)


Outcome = Literal["qualified", "widen", "full", "stop"]


@dataclass
class AutoSelection:
    """What `num_experts: auto` decided, and why (stored in the job result).

    coverage: forget gate mass the selection carries (one layer: its share; several layers:
    1 - prod(1 - share_l)); ratio: their forget mass / retain mass (None: unknown or no
    retain mass). outcome: qualified, or the fallback taken (widen / full / stop)."""

    selected: list[ScoredExpert]
    outcome: Outcome
    coverage: float
    ratio: float | None
    parameter_fraction: float | None
    min_share: float
    min_ratio: float
    parameter_budget: float
    warning: str | None = None
    per_layer_share: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "selected": [s._asdict() for s in self.selected],
            "outcome": self.outcome,
            "coverage": self.coverage,
            # JSON has no infinity: a zero retain mass reads as ratio None, infinite True.
            "ratio": self.ratio if self.ratio is not None and math.isfinite(self.ratio) else None,
            "ratio_infinite": self.ratio is not None and math.isinf(self.ratio),
            "parameter_fraction": self.parameter_fraction,
            "min_share": self.min_share,
            "min_ratio": self.min_ratio,
            "parameter_budget": self.parameter_budget,
            "warning": self.warning,
            "per_layer_share": {str(k): v for k, v in self.per_layer_share.items()},
        }


class SelectionRefused(ValueError):
    """num_experts auto with fallback stop found no qualifying set: the job ends here."""

    def __init__(self, auto: AutoSelection) -> None:
        super().__init__(auto.warning or "no expert set qualifies")
        self.auto = auto


def _stats(emap: ExpertMap, pairs: list[ScoredExpert]) -> tuple[float, float | None, dict]:
    by_layer: dict[int, list[int]] = {}
    for p in pairs:
        by_layer.setdefault(p.layer, []).append(p.expert)
    shares: dict[int, float] = {}
    missed = 1.0
    fsum = rsum = 0.0
    for layer, experts in by_layer.items():
        r = emap.layers.index(layer)
        fm = emap.forget_mass[r]
        total = sum(fm)
        shares[layer] = sum(fm[e] for e in experts) / total if total > 0 else 0.0
        missed *= 1.0 - shares[layer]
        fsum += sum(fm[e] for e in experts)
        if emap.retain_mass is not None:
            rsum += sum(emap.retain_mass[r][e] for e in experts)
    ratio = fsum / rsum if emap.retain_mass is not None and rsum > 0 else None
    if emap.retain_mass is not None and rsum == 0 and fsum > 0:
        ratio = float("inf")
    return (1.0 - missed if pairs else 0.0), ratio, shares


def select_auto(
    emap: ExpertMap,
    options: SeufOptions,
    cost: SelectionCost | None = None,
    full_refusal: Callable[[], str | None] | None = None,
) -> AutoSelection:
    """Experts by score (best first), each with its own forget/retain ratio >= min_ratio
    (so the set's ratio is too: it is a weighted mean of theirs), added while the set stays
    within the parameter budget, until the set carries min_share of the forget gate mass.
    A layer's experts add up within it; layers combine as 1 - prod(1 - share).

    When no such set exists (knowledge spread thin, or the specific experts carry little):
    `warning` says why and `outcome` is the fallback: widen (the best-scoring experts with a
    positive score that fit the budget, whatever their ratio), full (no experts: the caller
    trains all parameters) or stop (the caller ends the job). `full_refusal`, asked only
    when the fallback is full: why full-parameter training cannot run (None: it can); a
    reason turns the outcome into stop, and the warning says why."""
    min_share, min_ratio, budget = (
        options.auto_min_share,
        options.auto_min_ratio,
        options.parameter_budget,
    )
    # Without a cost model, a budget in experts: the same fraction of all routed experts.
    max_count = max(1, int(budget * len(emap.layers) * emap.num_experts))

    def fits(pairs: list[ScoredExpert]) -> bool:
        if cost is None:
            return len(pairs) <= max_count
        return cost.of_pairs(pairs) <= budget * cost.total

    def fraction(pairs: list[ScoredExpert]) -> float | None:
        return cost.of_pairs(pairs) / cost.total if cost is not None and pairs else None

    ranking = ranked(emap)
    chosen: list[ScoredExpert] = []
    reason = ""
    if emap.retain_mass is None:
        reason = "no retain data: the forget/retain ratio of the experts is unknown"
    else:
        for p in ranking:
            if p.score <= 0:
                break
            _, own_ratio, _ = _stats(emap, [p])
            if own_ratio is None or own_ratio < min_ratio or not fits([*chosen, p]):
                continue
            chosen.append(p)
            cov, ratio, shares = _stats(emap, chosen)
            if cov >= min_share:
                return AutoSelection(
                    chosen,
                    "qualified",
                    cov,
                    ratio,
                    fraction(chosen),
                    min_share,
                    min_ratio,
                    budget,
                    None,
                    shares,
                )
        cov, _, _ = _stats(emap, chosen)
        reason = (
            f"experts with forget/retain ratio >= {min_ratio:g} within the parameter budget "
            f"{budget:g} carry {cov:.2f} of the forget gate mass (< {min_share:g}): the "
            "knowledge is not localised in a few experts"
        )
    outcome: Outcome = options.fallback
    cannot = full_refusal() if outcome == "full" and full_refusal is not None else None
    if cannot is not None:
        outcome = "stop"
    picked: list[ScoredExpert] = []
    if outcome == "widen":
        for p in ranking:
            if p.score <= 0:
                break
            if fits([*picked, p]):
                picked.append(p)
        if not picked:  # every score <= 0: the best one, so SEUF still has a target
            picked = ranking[:1]
    cov, ratio, shares = _stats(emap, picked or chosen)
    action = {
        "widen": f"widened to {len(picked)} experts",
        "full": "unlearning all parameters instead",
        "stop": "stopping the job",
    }[outcome]
    told = f"fallback {outcome}"
    if cannot is not None:
        told = f"fallback full cannot run ({cannot})"
        action += " (seuf.fallback widen, or more memory per worker)"
    return AutoSelection(
        picked,
        outcome,
        cov,
        ratio,
        fraction(picked),
        min_share,
        min_ratio,
        budget,
        f"seuf.num_experts auto: {reason}; {told}: {action}",
        shares,
    )


def ranked(emap: ExpertMap) -> list[ScoredExpert]:
    """Every pair best first: the map's own ranking when it has one, else by score."""
    return emap.ranking or sorted(
        (
            ScoredExpert(layer, i, emap.scores[r][i])
            for r, layer in enumerate(emap.layers)
            for i in range(emap.num_experts)
        ),
        key=lambda p: (-p.score, p.layer, p.expert),
    )
