"""seuf.num_experts auto and the router projection on a real (small) demo world: the
expert map of a trained model, not a hand-made one."""

from __future__ import annotations

import pytest
import torch

from workers.attribution import attribute
from workers.data import read_corpus, tokenize
from workers.moe import get_adapter
from workers.router_projection import RouterProjector, router_inputs
from workers.routing import router_outputs
from workers.selection import SelectionCost, select_auto
from workers.spec import SeufOptions
from workers.world import World

pytestmark = pytest.mark.slow  # builds the small world once per session (about a minute)


def _batches(world: World, split: str, tokenizer) -> list[dict]:
    records = read_corpus(world.corpus_path(split))
    return tokenize(records, tokenizer, 64, loss_tokens="answer").in_order(16)


@pytest.fixture(scope="module")
def mapped(small_world: World, small_model, small_tokenizer):
    forget = _batches(small_world, "forget", small_tokenizer)
    retain = _batches(small_world, "retain", small_tokenizer)
    adapter = get_adapter(small_model)
    with torch.no_grad():
        emap = attribute(small_model, adapter, forget, retain_batches=retain, method="contrastive")
    return emap, SelectionCost.of(small_model, adapter), forget, retain, adapter


def test_auto_reports_when_no_small_expert_set_qualifies(mapped) -> None:
    emap, cost, *_ = mapped
    # Thresholds no expert set of this world can reach within one expert's budget.
    one = min(cost.expert.values()) + min(cost.router.values())
    strict = SeufOptions(
        num_experts="auto", auto_min_share=1.0, auto_min_ratio=1e6,
        parameter_budget=one / cost.total, fallback="stop",
    )  # fmt: skip
    auto = select_auto(emap, strict, cost)
    assert auto.outcome == "stop" and auto.selected == []
    assert auto.warning is not None and "fallback stop: stopping the job" in auto.warning
    # Thresholds the contrastive top expert meets: one expert, priced within the budget.
    top = emap.ranking[0]
    r = emap.layers.index(top.layer)
    own_share = emap.forget_mass[r][top.expert] / sum(emap.forget_mass[r])
    loose = SeufOptions(num_experts="auto", auto_min_share=own_share, auto_min_ratio=1.0)
    auto = select_auto(emap, loose, cost)
    assert auto.outcome == "qualified" and auto.selected[0] == top
    assert auto.parameter_fraction is not None and auto.parameter_fraction <= 0.1


def test_projection_on_the_worlds_retain_states(mapped, small_model) -> None:
    emap, _, forget, retain, adapter = mapped
    layer = emap.ranking[0].layer
    h_r = router_inputs(small_model, adapter, layer, retain)
    h_f = router_inputs(small_model, adapter, layer, forget)
    assert h_r.shape[0] > h_r.shape[1]  # more retain tokens than hidden units
    # The exact span of that many tokens is everything: no direction would be left to move.
    exact = RouterProjector.from_hidden_states(h_r, energy=1.0)
    assert exact.rank == exact.dim
    proj = RouterProjector.for_layer(small_model, adapter, layer, retain)  # energy 0.99
    assert 0 < proj.rank < proj.dim and proj.energy >= 0.99
    torch.manual_seed(0)
    g = torch.randn(adapter.num_experts, proj.dim)
    pg = proj.project(g)
    retain_kept = float((pg @ h_r.T).norm() / (g @ h_r.T).norm())
    forget_kept = float((pg @ h_f.T).norm() / (g @ h_f.T).norm())
    # A random update moves retain logits by < 20% of what it did unprojected. How much of
    # it reaches forget logits depends on how much the forget and retain hidden states share,
    # a property of the world's build (retain / forget 0.09 / 0.12 on one, 0.105 / 0.093 on
    # another machine's): only that forget routing can still move is asserted (below).
    assert retain_kept < 0.2
    assert forget_kept > 0
    router = adapter.moe_layer(layer).router
    w0 = router.weight.detach().clone()
    base = router_outputs(small_model, adapter, forget[0])[layer].logits
    try:
        with torch.no_grad():
            router.weight.add_(pg)
        moved = router_outputs(small_model, adapter, forget[0])[layer].logits
        assert (moved - base).abs().max() > 1e-2  # forget routing can still move
    finally:
        with torch.no_grad():
            router.weight.copy_(w0)
