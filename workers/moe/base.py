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

from workers.partitioned import full_shape


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
    """Family-specific knowledge about one MoE architecture.

    The structure discovery is generic (every supported family stores its decoder layers
    at `model.model.layers`, the sparse block at `layer.mlp`, the router at
    `mlp.<router_attr>` and the fused experts at `mlp.experts`); a subclass sets `family`,
    `model_types`, `router_attr`, `shared_attrs`, the config fields naming E and K, and
    overrides the gate scoring when the family does not use a softmax over all logits.
    Parameter names are those of `model.named_parameters()` for the model given here
    (a ...ForCausalLM: "model.layers.3.mlp.experts.gate_up_proj")."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    router_attr: str = "gate"  # attribute of the sparse block holding the router
    shared_attrs: tuple[str, ...] = ()  # attributes of the block holding shared experts/gates
    num_experts_field: str = "num_experts"  # config field giving E (routed experts)
    top_k_field: str = "num_experts_per_tok"  # config field giving K
    # The dimension of the fused gate_up_proj [E, ...] that reads the MoE input (hidden
    # size): last where the experts apply it as F.linear, 1 where they compute x @ W.
    expert_input_dim: int = -1

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- structure -------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.num_experts_field))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.top_k_field))

    def decoder_layers(self) -> nn.ModuleList:
        """All decoder layers (model.model.layers), dense and MoE."""
        base = getattr(self.model, "model", self.model)  # ForCausalLM -> base model
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"{type(self.model).__name__} has no decoder layer list at model.layers "
                f"(expected a {self.family} transformers model)"
            )
        return layers

    def is_moe_block(self, block: nn.Module) -> bool:
        """A sparse block has a router and fused experts; dense MLP layers have neither."""
        return isinstance(getattr(block, self.router_attr, None), nn.Module) and isinstance(
            getattr(block, "experts", None), nn.Module
        )

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order (dense layers are skipped)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        out: list[MoELayer] = []
        for idx, layer in enumerate(self.decoder_layers()):
            block = getattr(layer, "mlp", None)
            if block is None or not self.is_moe_block(block):
                continue
            router = getattr(block, self.router_attr)
            experts = block.experts
            exp_prefix = names[id(experts)]
            expert_params: dict[str, int] = {}
            for pname, p in experts.named_parameters():
                # The fused tensors are the module's own parameters; a submodule's are not
                # fused [E, ...] (workers/scope.py's trainable slices).
                if "." in pname:
                    continue
                shape = full_shape(p)  # a ZeRO-3 partition's own tensor is flat
                if len(shape) == 0 or shape[0] != self.num_experts:
                    raise ValueError(
                        f"{exp_prefix}.{pname} has shape {tuple(shape)}: expected the "
                        f"expert index ({self.num_experts} experts) on dim 0"
                    )
                expert_params[f"{exp_prefix}.{pname}"] = 0
            r_prefix = names[id(router)]
            router_params = [f"{r_prefix}.{n}" for n, _ in router.named_parameters()]
            shared: list[str] = []
            for attr in self.shared_attrs:
                mod = getattr(block, attr, None)
                if isinstance(mod, nn.Module):
                    s_prefix = names[id(mod)]
                    shared += [f"{s_prefix}.{n}" for n, _ in mod.named_parameters()]
            out.append(MoELayer(idx, block, router, experts, expert_params, router_params, shared))
        return out

    def moe_layer_indices(self) -> list[int]:
        """Decoder-layer indices of the MoE layers (dense layers excluded)."""
        return [m.layer for m in self.moe_layers()]

    def moe_layer(self, layer: int) -> MoELayer:
        """The MoE layer at decoder index `layer`; ValueError naming the valid ones."""
        for m in self.moe_layers():
            if m.layer == layer:
                return m
        raise ValueError(
            f"layer {layer} is not an MoE layer of this {self.family} model; "
            f"MoE layers: {self.moe_layer_indices()}"
        )

    # --- gate scoring ------------------------------------------------------------------
    def gate_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The full router probability vector p_t [T, E] (before top-K): softmax for most
        families, sigmoid for DeepSeek-V3. Used by the router anchor loss."""
        return torch.softmax(logits.float(), dim=-1)

    def topk_mask(self, out: RouterOutput) -> torch.Tensor:
        """[T, E] float mask: 1 where expert i is in token t's top-K (the router's own
        choice, which may differ from top-K of `gate_probs`: group-limited routing,
        DeepSeek-V3's correction bias)."""
        mask = torch.zeros(out.logits.shape, dtype=torch.float32, device=out.logits.device)
        mask.scatter_(1, out.topk_indices.long(), 1.0)
        return mask

    def used_gate_scores(self, out: RouterOutput) -> torch.Tensor:
        """g_{i,t} [T, E]: the architecture's gate score of expert i for token t if i is in
        t's top-K, else 0 (the quantity the paper's affinity score averages)."""
        return self.gate_probs(out.logits) * self.topk_mask(out)


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
