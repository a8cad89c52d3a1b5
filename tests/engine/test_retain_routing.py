"""The retain routing loss (workers/retain_routing.py): equals its formula, is zero at the
original model, keeps the layers from the lowest trained one up, runs a retain forward even
for GA, and training with it moves retain routing less than training without it."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.objectives import Batches, make_objective
from workers.reference import prepare_reference
from workers.retain_routing import collect_routing_targets
from workers.routing import collect_topk, routing_overlap
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions, StopRule, TrainingOptions
from workers.train import train


def _gate_logits(model, batch):
    """Every MoE layer's router logits [T, E] of one plain forward (float64)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda m, i, o, k=k: got.__setitem__(k, o[0].detach().double())
        )
        for k, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return got


def test_loss_equals_its_formula_against_another_models_routing():
    model, adapter = model_and_adapter(seed=0)
    other, other_adapter = model_and_adapter(seed=1)  # the "original": routes differently
    fc, rc = corpus(5, seed=11, loss_tokens="answer"), corpus(4, seed=12)
    batches = Batches(fc.collate([3, 0, 4]), rc.collate([2, 1, 3]))
    w = 3.0
    obj = make_objective("gdiff", ObjectiveOptions(), adapter, retain_routing_weight=w)
    layers = [m.layer for m in obj.retain_routing_layers]
    assert layers == adapter.moe_layer_indices()  # no selection: every MoE layer
    prepare_reference(obj, other, fc, rc)  # targets from `other`
    assert obj.reference is not None and obj.reference.retain_routing is not None
    out = obj.forward(model, batches)
    loss, parts = obj(out, batches)

    k = adapter.top_k
    mask = batches.retain["attention_mask"].reshape(-1).bool()
    ref, now = _gate_logits(other, batches.retain), _gate_logits(model, batches.retain)
    per_layer = []
    for layer in layers:
        q_all = torch.softmax(ref[layer], -1)[mask]
        p_all = torch.softmax(now[layer], -1)[mask]
        kls = []
        for q_t, p_t in zip(q_all, p_all, strict=True):
            top = torch.topk(q_t, k).indices
            q = [float(q_t[i]) for i in top] + [1.0 - float(q_t[top].sum())]
            p = [float(p_t[i]) for i in top] + [1.0 - float(p_t[top].sum())]
            kls.append(
                sum(a * (math.log(a) - math.log(b)) for a, b in zip(q, p, strict=True) if a > 0)
            )
        per_layer.append(sum(kls) / len(kls))
    want = sum(per_layer) / len(per_layer)
    assert want > 0.05  # the two models route differently: the check is not of zeros
    # float16 reference probabilities: ~1e-3 relative
    assert parts["retain_routing"] == pytest.approx(want, rel=5e-3)
    base = parts["total"] - w * parts["retain_routing"]
    assert base == pytest.approx(-parts["forget_nll"] + parts["retain_nll"], rel=1e-5, abs=1e-5)
    assert other_adapter.top_k == k


def test_zero_at_the_original_model_and_only_layers_from_the_lowest_selected_up():
    model, adapter = model_and_adapter(seed=0)
    fc, rc = corpus(5, seed=11), corpus(6, seed=12)
    top = adapter.moe_layer_indices()[-1]
    obj = make_objective("ga", ObjectiveOptions(), adapter, [(top, 2)], retain_routing_weight=1.0)
    assert [m.layer for m in obj.retain_routing_layers] == [top]
    assert obj.uses_retain  # GA has no retain term; the routing loss needs the forward
    prepare_reference(obj, model, fc, rc)
    batches = Batches(fc.collate([0, 1]), rc.collate([5, 0, 2]))
    out = obj.forward(model, batches)
    assert out.retain is not None and out.retain.logits is None  # GA: routing only
    assert set(out.retain.routers) == {top}
    _, parts = obj(out, batches)
    assert parts["retain_routing"] == pytest.approx(0.0, abs=1e-4)
    # Off: no retain forward for GA, no reference.
    off = make_objective("ga", ObjectiveOptions(), adapter)
    assert not off.uses_retain and prepare_reference(off, model, fc, rc) is None


def test_reference_of_another_corpus_is_refused():
    model, adapter = model_and_adapter(seed=0)
    rc, other = corpus(4, seed=12), corpus(4, seed=99)
    targets = collect_routing_targets(model, adapter, adapter.moe_layers(), rc)
    obj = make_objective("gdiff", ObjectiveOptions(), adapter, retain_routing_weight=1.0)
    prepare_reference(obj, model, rc, other)
    lengths = [int(s) for s in other.collate([0, 1, 2, 3])["attention_mask"].sum(1)]
    mine = [t.shape[0] for t in targets.indices]
    if lengths == mine:
        pytest.skip("the two corpora happen to have equal lengths")
    obj.reference.retain_routing = targets  # type: ignore[union-attr]
    batches = Batches(rc.collate([0]), other.collate([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="routing reference"):
        obj(obj.forward(model, batches), batches)


def _ga_full(weight: float) -> float:
    """Full-parameter GA for 12 steps; retain routing overlap after (on the retain data)."""
    model, adapter = model_and_adapter(seed=0)
    fc, rc = corpus(16, seed=21), corpus(16, seed=22)
    probe = rc.in_order(8)
    ref = collect_topk(model, adapter, probe)
    sc = apply_scope(model, adapter, "full", [])
    obj = make_objective(
        "ga", ObjectiveOptions(), adapter, layers=sc.layers, retain_routing_weight=weight
    )
    prepare_reference(obj, model, fc, rc)
    opts = TrainingOptions(lr=3e-3, max_steps=12, stop=StopRule())
    res = train(model, adapter, sc, obj, BatchStream(fc, 8, 0), BatchStream(rc, 8, 1), opts)
    sc.bake()
    if weight > 0:
        assert "retain_routing" in res.history[-1].parts
    return routing_overlap(model, adapter, probe, ref)


def test_training_with_the_loss_moves_retain_routing_less():
    without, with_loss = _ga_full(0.0), _ga_full(10.0)
    assert without < 0.95, without  # GA at this step size moves retain routing
    assert with_loss > without + 0.03, (without, with_loss)


def test_reference_is_capped_and_samples_past_the_cap_train_without_the_term():
    model, adapter = model_and_adapter(seed=0)
    other, _ = model_and_adapter(seed=1)
    rc = corpus(8, seed=12)
    full = collect_routing_targets(other, adapter_of(other), adapter_of(other).moe_layers(), rc)
    # room for exactly the first batch of 4
    one_batch = sum(full.indices[i].nbytes + full.probs[i].nbytes for i in range(4))
    capped = collect_routing_targets(
        other, adapter_of(other), adapter_of(other).moe_layers(), rc, batch_size=4,
        max_bytes=one_batch,
    )  # fmt: skip
    assert capped.samples == 4 and full.samples == 8
    assert capped.nbytes <= one_batch
    obj = make_objective("gdiff", ObjectiveOptions(), adapter, retain_routing_weight=1.0)
    fc = corpus(2, seed=11)
    prepare_reference(obj, other, fc, rc)
    assert obj.reference is not None
    past = Batches(fc.collate([0]), rc.collate([5, 6]))  # samples 4..7 have no reference
    obj.reference.retain_routing = capped
    _, parts = obj(obj.forward(model, past), past)
    assert parts["retain_routing"] == 0.0
    mixed = Batches(fc.collate([0]), rc.collate([1, 6]))
    _, parts_mixed = obj(obj.forward(model, mixed), mixed)
    only = Batches(fc.collate([0]), rc.collate([1]))
    _, parts_only = obj(obj.forward(model, only), only)
    assert parts_mixed["retain_routing"] == pytest.approx(parts_only["retain_routing"], rel=1e-5)


def adapter_of(model):
    from workers.moe import get_adapter

    return get_adapter(model)


def test_the_overlap_probe_is_held_out_of_the_loss_when_the_corpus_is_big_enough():
    from workers.retain_routing import held_out

    assert held_out(10, [0, 1, 2, 3, 4]) == {0, 1, 2, 3, 4}  # half left: held out
    assert held_out(10, range(6)) == set()  # fewer than half left: the loss needs them
    model, adapter = model_and_adapter(seed=0)
    rc = corpus(8, seed=12)
    targets = collect_routing_targets(model, adapter, adapter.moe_layers(), rc, skip={1, 6})
    assert targets.samples == 6
    assert targets.indices[1].dim() == 1 and targets.indices[6].dim() == 1  # no reference
    assert targets.indices[0].dim() == 3
