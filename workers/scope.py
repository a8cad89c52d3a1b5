"""Which parameters unlearning may change, and how that is enforced.

Scopes (JobSpec.scope):
    seuf     the selected experts' slices of every fused expert tensor + the router of each
             layer that holds a selected expert (with M = 1: the target layer's router)
    experts  the selected experts' slices only
    router   the routers of the selected experts' layers only
    full     every parameter of the model

Why not a gradient mask: a fused expert tensor [E, ...] is one nn.Parameter, so masking its
gradient would still allocate a gradient and AdamW moments of the full tensor, and
decoupled weight decay would shrink the other experts. Instead each wired experts module
gets a child `SelectedExperts` holding trainable copies of just the selected slices, and
its forward is redirected through that child: the frozen fused tensors (untouched,
requires_grad False) compute every routed (token, expert) pair with the selected experts'
mixing weights set to 0, and the child adds the selected experts' contribution computed
from the slices by the family's own experts forward, on only the tokens routed to them.
Why not splice the slices into a copy of the fused tensor (the earlier design, a torch
parametrization): that copied the whole [E, ...] tensor every forward and made the
backward compute a weight gradient for all E experts only to keep the slice (the profile
put that at a third of a cached SEUF step). Now gradient and optimizer memory are
proportional to the slices, weight decay only sees the slices, and no frozen expert does
any backward work at the target layer.

Under DeepSpeed ZeRO-3 the child is called as a module inside the experts' forward, so it
gathers its own (sharded) slices; the DeepSpeed config must come from `deepspeed_config_for`
(see there: DeepSpeed's default "leaf module" handling of MoE blocks releases the slices
before their gradient is accumulated); ZeRO-2 and DDP need nothing (the slices get a
gradient every step, zero when no token chose a selected expert).
`bake()` writes the slices back in place and removes the child and the redirection, leaving
a plain transformers model (no hooks survive, unlike grad-mask hooks, which stay on a
parameter through load_state_dict).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.moe.base import MoEAdapter, MoELayer
from workers.partitioned import full_numel, full_shape, gathered, write_whole

SCOPES: tuple[str, ...] = ("seuf", "full", "experts", "router")
SELECTED_ATTR = "selected_experts"  # the child of a wired experts module


class SelectedExperts(nn.Module):
    """Trainable copies of the selected experts' slices of one fused experts module (one
    parameter per fused tensor, named like it, [m, ...] for m selected experts) and the
    forward of the wired module (see the module docstring)."""

    def __init__(self, experts: nn.Module, names: Sequence[str], selected: Sequence[int]) -> None:
        super().__init__()
        fused = [getattr(experts, n) for n in names]  # whole (gathered, under ZeRO-3)
        num_experts = int(full_shape(fused[0])[0])
        self.experts = sorted({int(e) for e in selected})
        self.names = list(names)
        device = fused[0].device
        index = torch.tensor(self.experts, dtype=torch.long, device=device)
        local = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        local[index] = torch.arange(len(self.experts), device=device)
        # Not persistent: structure, not state (the state_dict holds the slices only).
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("local", local, persistent=False)  # expert -> slice row or -1
        for name, t in zip(self.names, fused, strict=True):
            self.register_parameter(name, nn.Parameter(t.detach().index_select(0, index).clone()))

    def slices(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.names]

    def forward(
        self,
        experts: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        fused_forward = type(experts).forward  # the family's own (class) forward
        local = self.local[top_k_index]  # [T, K]
        hit = local >= 0
        # Frozen experts: every routed pair, the selected experts' pairs with weight 0 (their
        # frozen output is discarded exactly: x * 0 = 0, then x + 0 = x).
        out = fused_forward(experts, hidden_states, top_k_index, top_k_weights.masked_fill(hit, 0))
        rows, pos = hit.nonzero(as_tuple=True)
        if rows.numel() == 0:
            # No token chose a selected expert: keep the slices in the graph with a zero
            # gradient (what the fused tensor's rows got), so the optimizer and DDP see them.
            return out + sum(p.sum() for p in self.slices()) * 0.0
        dtype = getattr(experts, self.names[0]).dtype
        view = _subset_view(experts, {n: getattr(self, n).to(dtype) for n in self.names})
        part = fused_forward(
            view,
            hidden_states[rows],
            local[rows, pos].unsqueeze(1),
            top_k_weights[rows, pos].unsqueeze(1),
        )
        return out.index_add(0, rows, part.to(out.dtype))


def _subset_view(experts: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A stand-in for `experts` holding only `tensors` ([m, ...] each) with num_experts = m,
    so the family's experts forward (eager, grouped_mm, ...: whatever the config selects)
    runs on just those experts, indexed 0..m-1. Never called as a module (no hooks)."""
    if "num_experts" not in experts.__dict__:
        raise TypeError(f"{type(experts).__name__} has no num_experts attribute")
    view = object.__new__(type(experts))
    view.__dict__.update(experts.__dict__)
    view.__dict__["_parameters"] = dict(tensors)
    view.__dict__["num_experts"] = int(next(iter(tensors.values())).shape[0])
    return view


def _wired_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The forward of a wired experts module (bound to it as an instance attribute)."""
    return getattr(self, SELECTED_ATTR)(self, hidden_states, top_k_index, top_k_weights)


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
    # scope is wired, use `scope.adapter` (the layer list then cannot drift).
    layers: list[MoELayer] = field(default_factory=list)
    adapter: MoEAdapter | None = None
    # (experts module, its fused tensors' full names in SelectedExperts.names order, child)
    _wired: list[tuple[nn.Module, list[str], SelectedExperts]] = field(default_factory=list)
    _direct: list[nn.Parameter] = field(default_factory=list)
    _saved_flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    _backup: list[torch.Tensor] = field(default_factory=list)  # routers' values (not "full")
    _active: bool = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly the tensors the optimizer should see (slices + whole trainable params)."""
        self._check_active()
        return [p for _, _, sel in self._wired for p in sel.slices()] + list(self._direct)

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [(names.get(id(p), "?"), p) for p in self.trainable_parameters()]

    @property
    def trainable_params(self) -> int:
        return sum(full_numel(p) for p in self.trainable_parameters())

    @property
    def ratio(self) -> float:
        """Tunable-parameter ratio: trainable / all parameters of the plain model."""
        return self.trainable_params / self.total_params

    def expert_dims(self) -> dict[str, int]:
        """Fused expert tensor name -> expert dim, for the tensors this scope slices."""
        return {name: 0 for _, names, _ in self._wired for name in names}

    def baked_tensors(
        self, names: Sequence[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the state dict `bake()` would leave, without baking: a fused
        tensor with its selected rows replaced by the trained slices, every other tensor as
        it is; `names` (else all, sorted), one at a time. For a model partitioned over ranks
        (ZeRO-3) each is gathered for its turn (collective), so no rank ever holds the
        whole model; a tensor is only valid until the next item."""
        self._check_active()
        wired = {full: (sel, full.rpartition(".")[2]) for _, fulls, sel in self._wired
                 for full in fulls}  # fmt: skip
        state = self.model.state_dict(keep_vars=True)
        plain = sorted(n for n in state if SELECTED_ATTR not in n.split("."))
        for name in names if names is not None else plain:
            t = state[name]
            if name not in wired:
                with gathered([t]):
                    yield name, t.detach()
                continue
            sel, short = wired[name]
            trained = getattr(sel, short)
            with gathered([t, trained]), torch.no_grad():
                out = t.detach().clone()
                out.index_copy_(0, sel.index, trained.detach().to(out.dtype))
            yield name, out

    def bake(self) -> None:
        """Write the trained slices into the fused tensors (in place) and remove every
        redirection; restore requires_grad flags. The model is plain again."""
        self._unwire(keep=True)

    def discard(self) -> None:
        """Remove the wiring and drop what was trained: slices are dropped and routers
        restored, so the model is bitwise as before. With scope "full" (trained in place,
        no copy kept) the weights stay as trained: reload the model instead."""
        self._unwire(keep=False)

    def _unwire(self, keep: bool) -> None:
        self._check_active()
        for experts, _, sel in self._wired:
            if keep:
                with torch.no_grad():
                    for name, p in zip(sel.names, sel.slices(), strict=True):
                        fused = getattr(experts, name)
                        fused.index_copy_(0, sel.index, p.to(fused.dtype))
            experts.__dict__.pop("forward", None)  # back to the class's forward
            delattr(experts, SELECTED_ATTR)
        if not keep and self.scope != "full":
            with torch.no_grad():
                for p, saved in zip(self._direct, self._backup, strict=True):
                    write_whole(p, saved)  # ZeRO-3: the shard; the copy was taken gathered
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._wired.clear()
        self._direct.clear()
        self._active = False

    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this scope was already baked or discarded")


# A ZeRO-3 leaf_module config that marks none (DeepSpeed's default marks known MoE blocks;
# the mark outlives the engine that set it).
NO_LEAF_MODULES: dict[str, list[str]] = {"classes": [], "names": [], "name_suffixes": []}


def deepspeed_config_for(scope: TrainableScope, config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DeepSpeed config that works with this scope.

    DeepSpeed (>= 0.16) treats known MoE blocks (Qwen2-MoE, Qwen3-MoE, Mixtral) as ZeRO-3
    "leaf modules": it gathers their parameters around the whole block and releases them in
    the block's post-backward hook, which can fire before the slices' gradient is
    accumulated ("The size of tensor a (0) must match ..."). With slices wired, stage 3 gets
    no leaf modules, so every submodule (SelectedExperts included) fetches its own
    parameters.
    """
    out = copy.deepcopy(config)
    zero = out.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and scope._wired:
        zero["leaf_module"] = dict(NO_LEAF_MODULES)
    return out


def pinned_adapter(adapter: MoEAdapter, layers: Sequence[MoELayer]) -> MoEAdapter:
    """A shallow copy of `adapter` whose moe_layers() returns `layers`."""
    pinned = copy.copy(adapter)
    frozen = list(layers)
    pinned.moe_layers = lambda: list(frozen)  # type: ignore[method-assign]
    return pinned


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
    if any(isinstance(m, SelectedExperts) for m in model.modules()):
        raise ValueError("model already carries wired expert slices: bake or discard them first")
    pairs = sorted({(int(layer), int(e)) for layer, e in selected})
    params = dict(model.named_parameters())
    total = sum(full_numel(p) for p in params.values())
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
            reads = [params[n] for n in (*moe.expert_params, *moe.router_params)]
            with gathered(reads):  # ZeRO-3: this layer's whole tensors for the copies below
                _wire_layer(ts, moe, scope, experts, params)
    except Exception:
        ts.discard()
        raise
    return ts


def _wire_layer(
    ts: TrainableScope,
    moe: MoELayer,
    scope: str,
    experts: list[int],
    params: dict[str, nn.Parameter],
) -> None:
    """apply_scope for one MoE layer: its selected slices wired (seuf, experts), its router
    trainable with a copy kept to restore (seuf, router)."""
    if scope in ("seuf", "experts"):
        names = list(moe.expert_params)  # all on dim 0 (MoEAdapter.moe_layers)
        module = moe.experts
        sel = SelectedExperts(module, [n.rpartition(".")[2] for n in names], experts)
        module.add_module(SELECTED_ATTR, sel)
        ts._wired.append((module, names, sel))
        module.forward = types.MethodType(_wired_forward, module)  # type: ignore[method-assign]
        ts.regions.extend(Region(name, e) for name in names for e in sel.experts)
    if scope in ("seuf", "router"):
        for name in moe.router_params:
            params[name].requires_grad_(True)
            ts._direct.append(params[name])
            ts._backup.append(params[name].detach().clone())
            ts.regions.append(Region(name, None))
