"""Routing measurements: one cheap routed forward pass, the original top-K captured once,
and the expert-selection overlap / shift of a model against it.

Overlap (METHOD.md "Measures"): per token and MoE layer |TopK_orig ∩ TopK_now| / K,
averaged over the non-pad tokens and the MoE layers. `collect_topk` stores the original
choice (small int tensors) so no second model copy is needed during training.

Batches are dicts of tensors: `input_ids` [B, S] and `attention_mask` [B, S] (1 = real
token; right or left padding both work, positions are derived from the mask).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.moe.base import MoEAdapter, RouterOutput, router_tap

Batch = Mapping[str, torch.Tensor]


def attention_mask_of(batch: Batch) -> torch.Tensor:
    """The batch's attention mask as bool [B, S] (all ones when absent)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
        )
    return mask.bool()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Routing is measured without dropout / router jitter; the caller's mode is restored
    # (routing_overlap is also called in the middle of training).
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def router_outputs(model: nn.Module, adapter: MoEAdapter, batch: Batch) -> dict[int, RouterOutput]:
    """Run the model once on `batch` (no grad, eval mode, no cache, no hidden states, no
    LM head) and return each MoE layer's router output, tokens flattened as B*S."""
    ids = batch["input_ids"]
    mask = attention_mask_of(batch)
    # Positions from the mask: left padding then gets the positions of the unpadded
    # sequence (RoPE models are shift-invariant anyway; absolute-position ones are not).
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    # The bare decoder (model.model) skips the LM head: for attribution the [T, vocab]
    # projection is pure waste (see the report for the measured saving).
    base = getattr(model, "base_model", model)
    with _eval_mode(model), torch.no_grad(), router_tap(adapter.moe_layers()) as rec:
        base(
            input_ids=ids.to(device),
            attention_mask=mask.long().to(device),
            position_ids=pos.to(device),
            use_cache=False,
        )
    out: dict[int, RouterOutput] = {}
    for layer, calls in rec.items():
        if len(calls) != 1:
            raise RuntimeError(f"router of layer {layer} ran {len(calls)} times in one pass")
        out[layer] = calls[0]
    return out


@dataclass
class TopKSnapshot:
    """The routing of a fixed list of batches: per batch, per MoE layer the top-K expert
    indices [B, S, K] (int16) and the batch's attention mask [B, S]."""

    layers: list[int]
    num_experts: int
    top_k: int
    topk: list[dict[int, torch.Tensor]] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    input_ids: list[torch.Tensor] = field(default_factory=list)  # to check batches match


def collect_topk(model: nn.Module, adapter: MoEAdapter, batches: Iterable[Batch]) -> TopKSnapshot:
    """Capture the top-K choice of every MoE layer on `batches` (run this once on the
    original model; compare later with `routing_overlap` / `routing_shift`)."""
    snap = TopKSnapshot(adapter.moe_layer_indices(), adapter.num_experts, adapter.top_k)
    for batch in batches:
        mask = attention_mask_of(batch)
        b, s = mask.shape
        outs = router_outputs(model, adapter, batch)
        snap.topk.append(
            {
                layer: o.topk_indices.detach().to("cpu", torch.int16).reshape(b, s, -1)
                for layer, o in outs.items()
            }
        )
        snap.masks.append(mask.cpu())
        snap.input_ids.append(batch["input_ids"].detach().cpu())
    return snap


@dataclass
class RoutingShift:
    """How routing moved against a reference snapshot.

    overall: mean overlap over non-pad tokens and MoE layers (1.0 = unchanged);
    per_layer: {layer: mean overlap}; freq_before / freq_after: {layer: [E] fraction of
    non-pad tokens that select each expert}; freq_delta = after - before."""

    overall: float
    per_layer: dict[int, float]
    freq_before: dict[int, list[float]]
    freq_after: dict[int, list[float]]
    tokens: int

    @property
    def freq_delta(self) -> dict[int, list[float]]:
        after, before = self.freq_after, self.freq_before
        return {
            layer: [a - b for a, b in zip(after[layer], before[layer], strict=True)]
            for layer in before
        }

    def to_json(self) -> dict:
        return {
            "overall": self.overall,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "freq_before": {str(k): v for k, v in self.freq_before.items()},
            "freq_after": {str(k): v for k, v in self.freq_after.items()},
            "freq_delta": {str(k): v for k, v in self.freq_delta.items()},
            "tokens": self.tokens,
        }


def _freq(topk: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    # Selection counts per expert over the non-pad tokens: [E].
    sel = torch.zeros(*topk.shape[:2], num_experts, dtype=torch.float64)
    sel.scatter_(2, topk.long(), 1.0)
    return (sel * mask.unsqueeze(-1)).sum(dim=(0, 1))


def routing_shift(
    model: nn.Module, adapter: MoEAdapter, batches: Iterable[Batch], reference: TopKSnapshot
) -> RoutingShift:
    """Compare the model's current routing on `batches` (the same batches, in the same
    order, as those `reference` was collected on) with `reference`."""
    batches = list(batches)
    if len(batches) != len(reference.topk):
        raise ValueError(
            f"reference was collected on {len(reference.topk)} batches, got {len(batches)}"
        )
    now = collect_topk(model, adapter, batches)
    if now.layers != reference.layers or now.top_k != reference.top_k:
        raise ValueError("reference snapshot is from a model with different MoE layers or K")
    k = reference.top_k
    e = reference.num_experts
    inter = {layer: 0.0 for layer in reference.layers}
    f_before = {layer: torch.zeros(e, dtype=torch.float64) for layer in reference.layers}
    f_after = {layer: torch.zeros(e, dtype=torch.float64) for layer in reference.layers}
    tokens = 0
    for i, (ref_b, now_b) in enumerate(zip(reference.topk, now.topk, strict=True)):
        if not torch.equal(reference.input_ids[i], now.input_ids[i]):
            raise ValueError(f"batch {i} differs from the one the reference was collected on")
        mask = reference.masks[i].to(torch.float64)
        tokens += int(mask.sum())
        for layer in reference.layers:
            a, b = ref_b[layer].long(), now_b[layer].long()
            # |A ∩ B| per token: indices within a top-K are distinct, so count pair matches.
            common = (a.unsqueeze(-1) == b.unsqueeze(-2)).sum(dim=(-1, -2)).to(torch.float64)
            inter[layer] += float((common * mask).sum())
            f_before[layer] += _freq(a, mask, e)
            f_after[layer] += _freq(b, mask, e)
    if tokens == 0:
        raise ValueError("no non-pad tokens in the batches: overlap is undefined")
    per_layer = {layer: inter[layer] / (k * tokens) for layer in reference.layers}
    return RoutingShift(
        overall=sum(per_layer.values()) / len(per_layer),
        per_layer=per_layer,
        freq_before={layer: (f_before[layer] / tokens).tolist() for layer in reference.layers},
        freq_after={layer: (f_after[layer] / tokens).tolist() for layer in reference.layers},
        tokens=tokens,
    )


def routing_overlap(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: Iterable[Batch],
    reference_topk: TopKSnapshot,
) -> float:
    """Expert-selection overlap of the model's routing with `reference_topk` on the same
    batches: mean over non-pad tokens and MoE layers of |TopK_orig ∩ TopK_now| / K."""
    return routing_shift(model, adapter, batches, reference_topk).overall
