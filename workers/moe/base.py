"""What every MoE family adapter tells the engine (the contract shared by attribution,
selection, scope, the anchor loss and the distributed runner).

In transformers 5 the routed experts of a layer are fused 3-D parameters whose first
dimension is the expert index, so "expert i" is the slice [i] of each tensor listed in
`MoELayer.expert_params`. Routers return (router_logits, topk_weights, topk_indices)
from their own forward; a forward hook on the router (see `RouterTap`) reads them there,
which also holds under ZeRO-3 sharding (no re-reading of weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block of a decoder layer."""

    layer: int  # index of the decoder layer (model.model.layers[layer])
    block: nn.Module  # the sparse MoE block (the layer's `mlp`)
    router: nn.Module  # module whose forward returns (logits, topk_weights, topk_indices)
    experts: nn.Module  # the fused routed-experts module
    # full parameter name -> the dimension that indexes experts (0 for every fused tensor)
    expert_params: dict[str, int]
    router_params: list[str]  # full names of the router's trainable parameters
    shared_params: list[str] = field(default_factory=list)  # shared experts + their gate


@dataclass(frozen=True)
class RouterOutput:
    """What one router produced on one forward pass (tokens flattened: T = batch*seq)."""

    logits: torch.Tensor  # [T, E]
    topk_weights: torch.Tensor  # [T, K] the weights the model mixes experts with
    topk_indices: torch.Tensor  # [T, K]


class MoEAdapter:
    """Family-specific knowledge about one MoE architecture. Subclasses set `family`,
    `model_types` and implement the abstract methods."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order (dense layers are skipped)."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        """All decoder layers (model.model.layers), dense and MoE."""
        raise NotImplementedError

    # --- gate scoring ------------------------------------------------------------------
    def gate_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The full router probability vector p_t [T, E] (before top-K): softmax for most
        families, sigmoid for DeepSeek-V3. Used by the router anchor loss."""
        return torch.softmax(logits.float(), dim=-1)

    def used_gate_scores(self, out: RouterOutput) -> torch.Tensor:
        """g_{i,t} [T, E]: the architecture's gate score of expert i for token t if i is in
        t's top-K, else 0 (the quantity the paper's affinity score averages)."""
        probs = self.gate_probs(out.logits)
        mask = torch.zeros_like(probs)
        mask.scatter_(1, out.topk_indices.long(), 1.0)
        return probs * mask


@contextmanager
def router_tap(layers: list[MoELayer]) -> Iterator[dict[int, list[RouterOutput]]]:
    """Record every router output of the given layers while the context is open:
    {layer index: [RouterOutput per forward call]}. Outputs keep their autograd graph,
    so the anchor loss can backpropagate through them."""
    records: dict[int, list[RouterOutput]] = {m.layer: [] for m in layers}
    handles = []
    for m in layers:

        def hook(_mod: nn.Module, _inp: object, out: tuple, layer: int = m.layer) -> None:
            records[layer].append(RouterOutput(out[0], out[1], out[2]))

        handles.append(m.router.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
