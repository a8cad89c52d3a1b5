"""Routing overlap and selection shift against a snapshot of the original routing."""

from __future__ import annotations

import pytest
import torch

from tests.engine._moe_hand import make_batch
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.routing import collect_topk, routing_overlap, routing_shift


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_unchanged_model_overlaps_fully(family: str, padded_batches) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    ref = collect_topk(model, adapter, padded_batches)
    assert ref.layers == adapter.moe_layer_indices()
    assert ref.topk[0][ref.layers[0]].shape == (3, 9, adapter.top_k)
    assert routing_overlap(model, adapter, padded_batches, ref) == 1.0


def test_overlap_after_swapping_router_rows_equals_hand_value(padded_batches) -> None:
    # Swapping rows 0 and 1 of the LAST MoE layer's router swaps experts 0 and 1 in every
    # token's top-K there (nothing downstream routes), so per token the overlap is
    # |S ∩ swap(S)| / K, computed here from the original top-K alone.
    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    ref = collect_topk(model, adapter, padded_batches)
    last = adapter.moe_layers()[-1]
    with torch.no_grad():
        w = last.router.weight
        w[[0, 1]] = w[[1, 0]].clone()
    swap = {0: 1, 1: 0}
    k = adapter.top_k
    inter, tokens = 0.0, 0
    for b, topk in enumerate(ref.topk):
        mask = ref.masks[b]
        idx = topk[last.layer]
        for i in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if mask[i, t]:
                    s = {int(x) for x in idx[i, t]}
                    inter += len(s & {swap.get(x, x) for x in s}) / k
                    tokens += 1
    last_overlap = inter / tokens
    assert last_overlap < 1.0  # the swap did move some tokens
    n = len(ref.layers)
    expected = ((n - 1) * 1.0 + last_overlap) / n
    shift = routing_shift(model, adapter, padded_batches, ref)
    assert shift.overall == pytest.approx(expected, abs=1e-12)
    assert routing_overlap(model, adapter, padded_batches, ref) == pytest.approx(expected)
    assert shift.per_layer[last.layer] == pytest.approx(last_overlap)
    assert all(shift.per_layer[lay] == 1.0 for lay in ref.layers[:-1])
    assert shift.tokens == tokens == 33
    # Selection frequencies of experts 0 and 1 swap in that layer; nothing else moves.
    before, after = shift.freq_before[last.layer], shift.freq_after[last.layer]
    assert after[0] == pytest.approx(before[1]) and after[1] == pytest.approx(before[0])
    assert after[2:] == pytest.approx(before[2:])
    assert shift.freq_delta[last.layer][0] == pytest.approx(before[1] - before[0])
    assert sum(before) == pytest.approx(k)
    assert set(shift.to_json()) >= {"overall", "per_layer", "freq_delta"}


def test_perturbing_an_early_router_changes_that_layer_and_later() -> None:
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    batches = [make_batch([8, 8, 6], 8, seed=9)]
    ref = collect_topk(model, adapter, batches)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.mul_(-1.0)  # reverse the ranking in layer 0
    shift = routing_shift(model, adapter, batches, ref)
    # K=2 of E=8 reversed: a token's new top-2 are its old bottom-2, no expert in common.
    assert shift.per_layer[0] == 0.0
    assert shift.overall < 1.0


def test_mismatched_batches_are_rejected(padded_batches) -> None:
    model = tiny_model("olmoe").train()
    adapter = get_adapter(model)
    ref = collect_topk(model, adapter, padded_batches)
    assert model.training  # measuring routing does not leave the model in eval mode
    with pytest.raises(ValueError, match="collected on 2 batches, got 1"):
        routing_overlap(model, adapter, padded_batches[:1], ref)
    with pytest.raises(ValueError, match="batch 0 differs"):
        routing_overlap(model, adapter, padded_batches[::-1], ref)
