"""Which parameters unlearning may change, and how that is enforced.

Scopes (JobSpec.scope):
    seuf     the selected experts' slices of every fused expert tensor + the router of each
             layer that holds a selected expert (with M = 1: the target layer's router)
    experts  the selected experts' slices only
    router   the routers of the selected experts' layers only
    full     every parameter of the model

Why a parametrization and not a gradient mask: a fused expert tensor [E, ...] is one
nn.Parameter, so masking its gradient would still allocate a gradient and AdamW moments
of the full tensor, and decoupled weight decay would shrink the other experts. Instead
each fused tensor gets a `torch.nn.utils.parametrize` module holding a trainable copy of
just the selected slices; its forward splices them into the frozen original (out of place,
differentiable only w.r.t. the slices). Gradient and optimizer memory are proportional to
the slices, weight decay only sees the slices, and the masking happens inside the forward.
Under DeepSpeed ZeRO-3 the DeepSpeed config must come from `deepspeed_config_for` (see
there: DeepSpeed's default "leaf module" handling of MoE blocks releases the slices before
their gradient is accumulated); ZeRO-2 and DDP need nothing.
`bake()` writes the slices back in place and removes every parametrization, leaving a plain
transformers model (no hooks survive, unlike grad-mask hooks, which stay on a parameter
through load_state_dict).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from workers.moe.base import MoEAdapter, MoELayer

SCOPES: tuple[str, ...] = ("seuf", "full", "experts", "router")


class SliceSplice(nn.Module):
    """Parametrization: the frozen fused tensor with the selected experts' slices replaced
    by the trainable `slices` parameter ([len(experts), ...] along `dim`)."""

    def __init__(self, original: torch.Tensor, dim: int, experts: Sequence[int]) -> None:
        super().__init__()
        self.dim = dim
        self.experts = [int(e) for e in experts]
        index = torch.tensor(self.experts, dtype=torch.long, device=original.device)
        # Not persistent: the index is structure, not state (state_dict stays slices only).
        self.register_buffer("index", index, persistent=False)
        self.slices = nn.Parameter(original.detach().index_select(dim, index).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return _Splice.apply(original, self.slices.to(original.dtype), self.dim, self.index)


class _Splice(torch.autograd.Function):
    """original with `index` along `dim` replaced by `slices`; gradient for slices only.

    Why not plain `index_copy`: its backward expands the gradient to the *current* shape of
    `slices`, which a ZeRO-3 release may have emptied; this backward only reads the
    incoming gradient."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        original: torch.Tensor,
        slices: torch.Tensor,
        dim: int,
        index: torch.Tensor,
    ) -> torch.Tensor:
        ctx.dim = dim
        ctx.save_for_backward(index)
        return original.detach().index_copy(dim, index, slices.detach())

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor, None, None]:
        (index,) = ctx.saved_tensors
        return None, grad.index_select(ctx.dim, index), None, None


@dataclass(frozen=True)
class Region:
    """One region unlearning may change: a whole parameter (expert None) or the slice
    [expert] along dim 0 of a fused expert tensor (the format of workers.patch)."""

    name: str
    expert: int | None


@dataclass
class TrainableScope:
    """The result of `apply_scope`: what trains, how much, and how to undo the wiring."""

    model: nn.Module
    scope: str
    selected: list[tuple[int, int]]
    regions: list[Region]
    total_params: int
    # The MoE layers as discovered BEFORE wiring, and an adapter pinned to them: while the
    # scope is wired, use `scope.adapter` (structure discovery on the wired model would
    # see the parametrization's tensors instead of the plain fused ones).
    layers: list[MoELayer] = field(default_factory=list)
    adapter: MoEAdapter | None = None
    _splices: list[tuple[nn.Module, str, SliceSplice]] = field(default_factory=list)
    _direct: list[nn.Parameter] = field(default_factory=list)
    _saved_flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    _backup: list[torch.Tensor] = field(default_factory=list)  # routers' values (not "full")
    _active: bool = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the tensors the optimizer should see (slices + whole trainable params)."""
        self._check_active()
        return [s.slices for _, _, s in self._splices] + list(self._direct)

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [(names.get(id(p), "?"), p) for p in self.trainable_parameters()]

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    @property
    def ratio(self) -> float:
        """Tunable-parameter ratio: trainable / all parameters of the plain model."""
        return self.trainable_params / self.total_params

    def expert_dims(self) -> dict[str, int]:
        """Fused expert tensor name -> expert dim, for the tensors this scope slices."""
        return {name: s.dim for _, name, s in self._splices}

    def bake(self) -> None:
        """Write the trained slices into the fused tensors (in place) and remove every
        parametrization; restore requires_grad flags. The model is plain again."""
        self._unwire(keep=True)

    def discard(self) -> None:
        """Remove the wiring and drop what was trained: slices are dropped and routers
        restored, so the model is bitwise as before. With scope "full" (trained in place,
        no copy kept) the weights stay as trained: reload the model instead."""
        self._unwire(keep=False)

    def _unwire(self, keep: bool) -> None:
        self._check_active()
        for module, _, splice in self._splices:
            attr = _attr_of(module, splice)
            original = module.parametrizations[attr].original
            if keep:
                with torch.no_grad():
                    original.index_copy_(splice.dim, splice.index, splice.slices.to(original.dtype))
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if not keep and self.scope != "full":
            with torch.no_grad():
                for p, saved in zip(self._direct, self._backup, strict=True):
                    p.copy_(saved)
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._splices.clear()
        self._direct.clear()
        self._active = False

    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this scope was already baked or discarded")


def deepspeed_config_for(scope: TrainableScope, config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DeepSpeed config that works with this scope.

    DeepSpeed (>= 0.16) treats known MoE blocks (Qwen2-MoE, Qwen3-MoE, Mixtral) as ZeRO-3
    "leaf modules": it gathers their parameters around the whole block and releases them in
    the block's post-backward hook, which fires before the spliced slices' gradient is
    accumulated ("The size of tensor a (0) must match ..."). With slices wired, stage 3 gets
    no leaf modules, so every submodule (the splice included) fetches its own parameters.
    """
    out = copy.deepcopy(config)
    zero = out.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and scope._splices:
        zero["leaf_module"] = {"classes": [], "names": [], "name_suffixes": []}
    return out


def pinned_adapter(adapter: MoEAdapter, layers: Sequence[MoELayer]) -> MoEAdapter:
    """A shallow copy of `adapter` whose moe_layers() returns `layers`."""
    pinned = copy.copy(adapter)
    frozen = list(layers)
    pinned.moe_layers = lambda: list(frozen)  # type: ignore[method-assign]
    return pinned


def _attr_of(module: nn.Module, splice: SliceSplice) -> str:
    for attr, plist in module.parametrizations.items():
        if any(m is splice for m in plist):
            return attr
    raise RuntimeError("parametrization not found on its module")


def _split(name: str) -> tuple[str, str]:
    prefix, _, attr = name.rpartition(".")
    return prefix, attr


def apply_scope(
    model: nn.Module,
    adapter: MoEAdapter,
    scope: str,
    selected: Iterable[tuple[int, int]] = (),
) -> TrainableScope:
    """Freeze the model except the scope's regions and wire the slices.

    `selected` holds (layer, expert) pairs (layer = decoder layer index, as in MoELayer).
    Raises ValueError for an unknown scope, a missing selection or an out-of-range pair.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)} (got {scope!r})")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("model already carries parametrizations: bake or discard them first")
    pairs = sorted({(int(layer), int(e)) for layer, e in selected})
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    saved = [(p, p.requires_grad) for p in params.values()]
    layers_list = adapter.moe_layers()
    ts = TrainableScope(
        model,
        scope,
        pairs,
        [],
        total,
        layers=layers_list,
        adapter=pinned_adapter(adapter, layers_list),
        _saved_flags=saved,
    )

    if scope == "full":
        for name, p in params.items():
            p.requires_grad_(True)
            ts._direct.append(p)
            ts.regions.append(Region(name, None))
        return ts

    if not pairs:
        raise ValueError(f"scope '{scope}' needs at least one selected (layer, expert)")
    layers: dict[int, MoELayer] = {m.layer: m for m in layers_list}
    by_layer: dict[int, list[int]] = {}
    for layer, e in pairs:
        if layer not in layers:
            raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {sorted(layers)})")
        if not 0 <= e < adapter.num_experts:
            raise ValueError(f"expert {e} out of range: layer {layer} has {adapter.num_experts}")
        by_layer.setdefault(layer, []).append(e)

    for p in params.values():
        p.requires_grad_(False)
    try:
        for layer, experts in by_layer.items():
            moe = layers[layer]
            if scope in ("seuf", "experts"):
                for name, dim in moe.expert_params.items():
                    prefix, attr = _split(name)
                    module = model.get_submodule(prefix)
                    splice = SliceSplice(params[name], dim, experts)
                    parametrize.register_parametrization(module, attr, splice)
                    ts._splices.append((module, name, splice))
                    ts.regions.extend(Region(name, e) for e in experts)
            if scope in ("seuf", "router"):
                for name in moe.router_params:
                    params[name].requires_grad_(True)
                    ts._direct.append(params[name])
                    ts._backup.append(params[name].detach().clone())
                    ts.regions.append(Region(name, None))
    except Exception:
        ts.discard()
        raise
    return ts
