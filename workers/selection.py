"""Expert selection: which (layer, expert) pairs SEUF unlearns, from an ExpertMap.

Modes (SeufOptions.selection): top_m (global top-M, the paper's default with M=1),
in_layer (top-M inside `layer`), per_layer (top-1 of every MoE layer, best layer first),
random (M pairs drawn uniformly with `seed`, an ablation), manual (`experts`, validated).
The first returned expert's layer is the target layer: its router is the one trained
with the anchor loss.
"""

from __future__ import annotations

import random

from workers.attribution import ExpertMap, ScoredExpert
from workers.spec import SeufOptions


def _check_count(m: int, available: int, where: str) -> None:
    if m > available:
        raise ValueError(f"seuf.num_experts={m} but only {available} routed experts exist {where}")


def select_experts(expert_map: ExpertMap, options: SeufOptions) -> list[ScoredExpert]:
    """The selected experts, best (or first given) first; also stored in
    `expert_map.selected`. Raises ValueError naming valid values on bad layers/experts."""
    m = options.num_experts
    e = expert_map.num_experts
    ranking = expert_map.ranking or sorted(
        (
            ScoredExpert(layer, i, expert_map.scores[r][i])
            for r, layer in enumerate(expert_map.layers)
            for i in range(e)
        ),
        key=lambda p: (-p.score, p.layer, p.expert),
    )
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
