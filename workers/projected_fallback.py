"""The full-parameter fallback with every update kept off the retain data (issue 13).

When `seuf.num_experts: auto` finds no localised experts it falls back to training all
parameters. There, retain tokens share every weight with the forget tokens, and their
routing drifts (RMU's fallback left 0.71-0.83 of retain routing in place on the sweep).
`seuf.fallback_projection: all` extends the router projection (GRIP, workers/
router_projection.py) to every matrix the fallback trains: each update is projected onto
the null space of the retain inputs that matrix reads (the AlphaEdit / GRIP construction,
W -> W + dW P with P = I - U U^T over the retain inputs' principal directions), so the
retain activations, and with them retain routing, stay where they were at every layer,
while forget tokens (whose inputs leave the retain span) can still move.

What is projected, what is held:
- every matrix that reads the residual stream through the decoder layer's norms
  (input_layernorm, post_attention_layernorm): the attention's input projections (q, k,
  v; MLA's first projections), the router, shared experts' gate and up projections, each
  against the retain inputs it reads, with its bias held (a bias moves every token alike);
- the fused routed experts' input projection (`gate_up_proj`, along the adapter's
  `expert_input_dim`), against the router's inputs: every expert reads a subset of them,
  so a change null on all of them is null on each expert's share;
- everything else the full scope would train is held at its value: the matrices that
  write back into the stream (the attention's o_proj, the experts' down projections),
  MLA's latent projections, embeddings, norms, the LM head, biases. With every reader of
  the stream fixed on retain inputs, their inputs on retain tokens cannot change, and an
  o_proj left free measured slower to forget (olmoe s2160: 402 steps vs 69 held).

Linears that read the same tensor in a forward (q/k/v) share one projector. The retain
inputs are summed into one d x d Gram matrix per group on the model's device (float32:
at energy 1.0 its rounding keeps a few extra directions, which only protects more), so
memory is one d x d matrix per group while collecting, then one d x k basis per group
and one copy of every projected tensor (its post-step projection needs the last value).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.moe.base import MoEAdapter
from workers.router_projection import (
    DEFAULT_MAX_TOKENS,
    ProjectedRouter,
    ProjectedTensor,
    RouterProjector,
    base_forward,
)
from workers.routing import Batch

EXPERT_INPUT_PARAM = "gate_up_proj"  # the fused experts' tensor that reads the MoE input


@dataclass
class FallbackProjection:
    """The handles that keep the fallback's updates retain-safe; `after_step()` after
    every optimizer step, `close()` at the end (removes the gradient hooks)."""

    routers: list[ProjectedRouter]
    handles: list[ProjectedRouter | ProjectedTensor]
    projectors: list[RouterProjector] = field(default_factory=list)
    held_tensors: list[nn.Parameter] = field(default_factory=list)  # frozen by hold()
    held: int = 0  # parameters held at their value (elements)
    projected: int = 0  # parameters whose update is projected (elements)

    def hold(self) -> None:
        """Freeze the held tensors (call AFTER apply_scope, which makes every parameter
        trainable): no gradient, no optimizer state, no copy, and they cannot change."""
        for p in self.held_tensors:
            p.requires_grad_(False)

    def after_step(self) -> None:
        for h in (*self.routers, *self.handles):
            h.after_step()

    def close(self) -> None:
        for h in (*self.routers, *self.handles):
            h.close()

    def to_json(self) -> dict[str, object]:
        ranks = [p.rank for p in self.projectors]
        return {
            "groups": len(self.projectors),
            "mean_rank": sum(ranks) / len(ranks) if ranks else None,
            "mean_dim": (
                sum(p.dim for p in self.projectors) / len(self.projectors)
                if self.projectors
                else None
            ),
            "projected_params": self.projected,
            "held_params": self.held,
        }


def _retain_grams(
    model: nn.Module,
    modules: list[nn.Module],
    norms: list[nn.Module],
    batches: Iterable[Batch],
    max_tokens: int,
) -> tuple[list[list[nn.Module]], list[torch.Tensor], int]:
    """The `modules` that read a norm's output (the residual stream a layer reads), in
    groups that read the same tensor, and each group's Gram matrix (sum of x x^T over the
    non-pad retain tokens; float32, on the input's device). Modules reading anything else
    (an attention or expert output, a low-rank latent) are left out: the caller holds
    them."""
    seen: dict[int, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)  # hidden states
        if isinstance(first, torch.Tensor):
            seen[id(mod)] = first.detach()

    def grab_out(mod: nn.Module, _args: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            seen[id(mod)] = out.detach()

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    handles += [n.register_forward_hook(grab_out) for n in norms]
    groups: list[list[nn.Module]] | None = None
    grams: list[torch.Tensor] = []
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            seen.clear()
            mask = base_forward(model, batch)
            with torch.no_grad():
                if groups is None:  # first batch: who reads which norm's output
                    stream = {seen[id(n)].data_ptr() for n in norms if id(n) in seen}
                    by_input: dict[int, list[nn.Module]] = {}
                    for m in modules:
                        x = seen.get(id(m))
                        if x is not None and x.data_ptr() in stream:
                            by_input.setdefault(x.data_ptr(), []).append(m)
                    groups = list(by_input.values())
                    grams = [
                        torch.zeros(
                            seen[id(g[0])].shape[-1],
                            seen[id(g[0])].shape[-1],
                            device=seen[id(g[0])].device,
                        )
                        for g in groups
                    ]
                keep = mask.reshape(-1)
                for g, gram in zip(groups, grams, strict=True):
                    x = seen[id(g[0])].reshape(mask.numel(), -1)[keep.to(gram.device)].float()
                    gram.addmm_(x.T, x)
            tokens += int(keep.sum())
            if tokens >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if groups is None or tokens == 0:
        raise ValueError("the retain batches hold no tokens")
    return groups, grams, tokens


NORMS = ("input_layernorm", "post_attention_layernorm")  # what a decoder layer reads through


def attach_fallback_projection(
    model: nn.Module,
    adapter: MoEAdapter,
    retain_batches: Iterable[Batch],
    *,
    energy: float,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FallbackProjection:
    """Projection handles for every parameter the full scope trains (call BEFORE training:
    the retain inputs are the original model's; then `hold()` after apply_scope). The
    pipeline passes the retain batches less the overlap probe's samples where the corpus
    allows (workers/retain_routing.held_out), so the retain overlap it reports is then
    measured on tokens the projector never saw."""
    layers = list(adapter.decoder_layers())
    moe = {m.layer: m for m in adapter.moe_layers()}
    routers = [m.router for m in moe.values()]
    router_ids = {id(r) for r in routers}
    linears = [
        m
        for layer in layers
        for m in layer.modules()
        if isinstance(m, nn.Linear) and id(m) not in router_ids and m.weight.numel() > 0
    ]
    norms = [getattr(layer, n) for layer in layers for n in NORMS if hasattr(layer, n)]
    if len(norms) != len(NORMS) * len(layers):
        raise ValueError(
            f"seuf.fallback_projection 'all' finds each decoder layer's inputs through its "
            f"{' and '.join(NORMS)}; this {adapter.family} model lacks them"
        )
    groups, grams, tokens = _retain_grams(
        model, [*routers, *linears], norms, retain_batches, max_tokens
    )
    out = FallbackProjection([], [])
    covered: set[int] = set()
    by_module: dict[int, RouterProjector] = {}
    try:
        for group, gram in zip(groups, grams, strict=True):
            proj = RouterProjector.from_gram(gram, tokens, energy=energy)
            out.projectors.append(proj)
            for m in group:
                by_module[id(m)] = proj
        if any(id(r) not in by_module for r in routers):
            raise RuntimeError("a router did not read its layer's post-attention norm output")
        for m in [*routers, *linears]:
            if id(m) not in by_module:
                continue  # reads no norm output: held with the rest below
            handle = ProjectedRouter(by_module[id(m)], m)
            (out.routers if id(m) in router_ids else out.handles).append(handle)
            for _, p in handle.params:
                covered.add(id(p))
                if p.dim() == 2:
                    out.projected += p.numel()
                else:  # a bias moves every token alike: frozen by hold() with the rest
                    out.held_tensors.append(p)
                    out.held += p.numel()
        for m in moe.values():
            proj = by_module[id(m.router)]
            for name, p in m.experts.named_parameters():
                if "." in name or id(p) in covered or not p.requires_grad:
                    continue
                covered.add(id(p))
                if name == EXPERT_INPUT_PARAM:
                    out.handles.append(ProjectedTensor(p, proj, adapter.expert_input_dim))
                    out.projected += p.numel()
                else:
                    out.held_tensors.append(p)
                    out.held += p.numel()
        for p in model.parameters():
            if id(p) not in covered and p.numel() > 0:
                out.held_tensors.append(p)
                covered.add(id(p))
                out.held += p.numel()
    except Exception:
        out.close()
        raise
    return out
