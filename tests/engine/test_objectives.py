"""Each objective equals its formula computed by hand; NPO really unlearns."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.objectives import (
    OBJECTIVES,
    Batches,
    Reference,
    loss_positions,
    make_objective,
    rmu_sample_directions,
    run_forward,
    sequence_nll,
)
from workers.reference import prepare_reference, reference_forget_nll, rmu_direction
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions, StopRule, TrainingOptions
from workers.train import forget_loss_check, train

LAYER = 1


def hand_nll(logits, batch):
    """Per-sample summed NLL and target count, one position at a time (float64)."""
    logits = logits.detach()
    b, s, _ = logits.shape
    nll, cnt = [0.0] * b, [0] * b
    for i in range(b):
        for t in range(s - 1):
            if batch["loss_mask"][i, t] == 1:
                lp = torch.log_softmax(logits[i, t].double(), -1)
                nll[i] -= float(lp[batch["input_ids"][i, t + 1]])
                cnt[i] += 1
    return nll, cnt


def full_logits(model, batch):
    """[B, S, V] logits at every position (the training forward computes them only at the
    scored positions; the formulas are checked against the model's plain output)."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.fixture(scope="module")
def setup():
    model, adapter = model_and_adapter(seed=0)
    other, _ = model_and_adapter(seed=1)  # a reference that differs from the current model
    fc, rc = corpus(5, seed=11, loss_tokens="answer"), corpus(4, seed=12)
    batches = Batches(fc.collate([3, 0, 4]), rc.collate([2, 1, 3]))
    return model, adapter, other, fc, rc, batches


def _value(name, setup, opts=None, **kw):
    model, adapter, _, _, _, batches = setup
    obj = make_objective(name, opts or ObjectiveOptions(), adapter, **kw)
    return obj, obj.forward(model, batches)


def test_ga_and_gdiff_equal_their_formulas(setup):
    batches = setup[5]
    obj, out = _value("ga", setup)
    loss, parts = obj(out, batches)
    nf, cf = hand_nll(full_logits(setup[0], batches.forget), batches.forget)
    assert loss.item() == pytest.approx(-sum(nf) / sum(cf), rel=1e-5)
    assert parts["forget_nll"] == pytest.approx(sum(nf) / sum(cf), rel=1e-5)
    obj, out = _value("gdiff", setup, ObjectiveOptions(retain_weight=0.7))
    loss, _ = obj(out, batches)
    nr, cr = hand_nll(full_logits(setup[0], batches.retain), batches.retain)
    assert loss.item() == pytest.approx(-sum(nf) / sum(cf) + 0.7 * sum(nr) / sum(cr), rel=1e-5)


def test_npo_uses_a_real_frozen_reference_and_differs_from_ga(setup):
    model, adapter, other, fc, _, batches = setup
    beta = 0.5
    opts = ObjectiveOptions(beta=beta)
    obj = make_objective("npo", opts, adapter)
    ref = reference_forget_nll(other, fc)  # per forget sample, corpus order
    obj.reference = Reference(forget_nll=ref)
    out = obj.forward(model, batches)
    loss, parts = obj(out, batches)
    nf, cf = hand_nll(full_logits(setup[0], batches.forget), batches.forget)
    ref_logits = other(
        input_ids=batches.forget["input_ids"], attention_mask=batches.forget["attention_mask"]
    ).logits
    rf, _ = hand_nll(ref_logits.detach(), batches.forget)
    assert [ref[i].item() for i in batches.forget["index"]] == pytest.approx(rf, rel=1e-5)
    lf = -(2 / beta) * sum(logsig(beta * (a - r)) for a, r in zip(nf, rf, strict=True)) / 3
    nr, cr = hand_nll(full_logits(setup[0], batches.retain), batches.retain)
    assert parts["forget"] == pytest.approx(lf, rel=1e-5)
    assert loss.item() == pytest.approx(lf + sum(nr) / sum(cr), rel=1e-5)  # retain_weight 1
    ga_loss, _ = make_objective("ga", opts, adapter)(out, batches)
    assert abs(parts["forget"] - ga_loss.item()) > 1e-3
    # With the current model as its own reference, every sample sits at (2/beta) log 2.
    obj.reference = Reference(forget_nll=reference_forget_nll(model, fc))
    _, parts_self = obj(out, batches)
    assert parts_self["forget"] == pytest.approx(2 / beta * math.log(2), rel=1e-4)
    with pytest.raises(ValueError, match="needs reference"):
        make_objective("npo", opts, adapter)(out, batches)


def test_simnpo_is_length_normalised_and_reference_free(setup):
    batches = setup[5]
    beta, delta = 0.3, 0.4
    obj, out = _value(
        "simnpo", setup, ObjectiveOptions(beta=beta, simnpo_delta=delta, retain_weight=0.0)
    )
    loss, _ = obj(out, batches)
    nf, cf = hand_nll(full_logits(setup[0], batches.forget), batches.forget)
    terms = [logsig(beta * (a / c - delta)) for a, c in zip(nf, cf, strict=True)]
    want = -(2 / beta) * sum(terms) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert obj.reference is None


def _block_out(model, layer, batch):
    got = []
    h = model.model.layers[layer].mlp.register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    return got[0].double()


def _masked_mean_sq(diff, mask):
    total, n = 0.0, 0
    for i in range(diff.shape[0]):
        for t in range(diff.shape[1]):
            if mask[i, t]:
                total += float((diff[i, t] ** 2).mean())
                n += 1
    return total / n


def test_rmu_steers_the_target_block_output(setup):
    model, adapter, other, fc, rc, batches = setup
    opts = ObjectiveOptions(rmu_steering_coeff=6.0, rmu_alpha=3.0)
    obj = make_objective("rmu", opts, adapter, selected=[(LAYER, 2)])
    prepare_reference(obj, other, fc, rc, seed=7)  # reference activations from `other`
    out = obj.forward(model, batches)
    loss, parts = obj(out, batches)
    u = rmu_direction(32, 7).double()
    assert float(u.norm()) == pytest.approx(1.0)
    hf = _block_out(model, LAYER, batches.forget)
    hr = _block_out(model, LAYER, batches.retain)
    hr_ref = _block_out(other, LAYER, batches.retain)
    lf = _masked_mean_sq(hf - 6.0 * u, batches.forget["attention_mask"])
    lr = _masked_mean_sq(hr - hr_ref, batches.retain["attention_mask"])
    assert lr > 1e-6  # the reference really differs from the current model
    assert parts["forget"] == pytest.approx(lf, rel=1e-5)
    assert parts["retain_mse"] == pytest.approx(lr, rel=1e-4)
    assert loss.item() == pytest.approx(lf + 3.0 * lr, rel=1e-5)


def test_rmu_seuf_options_steer_the_layer_above_at_answer_positions_relative_norm(setup):
    """rmu_layer_offset 1 steers the block one layer above the target, rmu_positions
    "answer" only at positions predicting an answer token, and rmu_coeff_relative scales
    c by the mean reference output norm of that block."""
    model, adapter, other, fc, rc, batches = setup
    opts = ObjectiveOptions(
        rmu_steering_coeff=3.0,
        rmu_alpha=2.0,
        rmu_layer_offset=1,
        rmu_positions="answer",
        rmu_coeff_relative=True,
    )
    target = LAYER - 1
    obj = make_objective("rmu", opts, adapter, selected=[(target, 2)])
    assert obj.capture is model.model.layers[LAYER].mlp
    ref = prepare_reference(obj, other, fc, rc, seed=7)
    assert ref is not None and ref.rmu_block_norm is not None
    hr_all = _block_out(other, LAYER, rc.collate(list(range(len(rc)))))
    mask = rc.collate(list(range(len(rc))))["attention_mask"].bool()
    assert ref.rmu_block_norm == pytest.approx(float(hr_all[mask].norm(dim=-1).mean()), rel=1e-5)
    out = obj.forward(model, batches)
    loss, parts = obj(out, batches)
    c = 3.0 * ref.rmu_block_norm
    u = rmu_direction(32, 7).double()
    f = batches.forget
    at_answer = torch.zeros_like(f["attention_mask"])
    at_answer[:, :-1] = f["loss_mask"][:, :-1]
    assert 0 < int(at_answer.sum()) < int(f["attention_mask"].sum())  # a real restriction
    lf = _masked_mean_sq(_block_out(model, LAYER, f) - c * u, at_answer)
    lr = _masked_mean_sq(
        _block_out(model, LAYER, batches.retain) - _block_out(other, LAYER, batches.retain),
        batches.retain["attention_mask"],
    )
    assert parts["forget"] == pytest.approx(lf, rel=1e-5)
    assert loss.item() == pytest.approx(lf + 2.0 * lr, rel=1e-4)
    # capped at the last layer
    top = len(model.model.layers) - 1
    capped = make_objective("rmu", opts, adapter, selected=[(top, 2)])
    assert capped.capture is model.model.layers[top].mlp
    # no selection (scope full): the middle layer, as before
    full = make_objective("rmu", ObjectiveOptions(), adapter)
    assert full.capture is model.model.layers[len(model.model.layers) // 2].mlp


def test_rmu_per_sample_directions_steer_each_sample_to_its_own_target(setup):
    """rmu_directions "per_sample": sample i's target is c * u_i, u_i a Gaussian unit vector
    that depends on (seed, i) only (the same in any batch), distinct across samples."""
    model, adapter, other, fc, rc, batches = setup
    opts = ObjectiveOptions(rmu_steering_coeff=6.0, rmu_alpha=3.0, rmu_directions="per_sample")
    obj = make_objective("rmu", opts, adapter, selected=[(LAYER, 2)])
    prepare_reference(obj, other, fc, rc, seed=7)
    loss, parts = obj(obj.forward(model, batches), batches)
    idx = batches.forget["index"]  # [3, 0, 4]
    u = rmu_sample_directions(32, 7, idx).double()
    assert torch.allclose(u.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    # one sample's direction does not depend on its batch
    assert torch.equal(u[1].float(), rmu_sample_directions(32, 7, torch.tensor([0]))[0])
    cos = u @ u.T
    assert float((cos - torch.eye(3, dtype=cos.dtype)).abs().max()) < 0.8  # not one direction
    hf = _block_out(model, LAYER, batches.forget)
    lf = _masked_mean_sq(hf - 6.0 * u[:, None, :], batches.forget["attention_mask"])
    lr = _masked_mean_sq(
        _block_out(model, LAYER, batches.retain) - _block_out(other, LAYER, batches.retain),
        batches.retain["attention_mask"],
    )
    assert parts["forget"] == pytest.approx(lf, rel=1e-5)
    assert loss.item() == pytest.approx(lf + 3.0 * lr, rel=1e-5)
    shared = make_objective(
        "rmu", ObjectiveOptions(rmu_steering_coeff=6.0), adapter, selected=[(LAYER, 2)]
    )
    prepare_reference(shared, other, fc, rc, seed=7)
    assert shared(shared.forward(model, batches), batches)[1]["forget"] != pytest.approx(lf)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_anchor_matches_formula_with_both_reductions(setup, reduction):
    model, adapter, _, _, _, batches = setup
    alpha = 2.5
    for experts in ([3], [3, 6]):
        sel = [(LAYER, e) for e in experts]
        obj = make_objective(
            "ga",
            ObjectiveOptions(),
            adapter,
            selected=sel,
            anchor_weight=alpha,
            anchor_reduction=reduction,
        )
        out = obj.forward(model, batches)
        loss, parts = obj(out, batches)
        logits: list[torch.Tensor] = []

        def keep(m, i, o, logits=logits):
            logits.append(o[0])

        h = model.model.layers[LAYER].mlp.gate.register_forward_hook(keep)
        with torch.no_grad():
            model(
                input_ids=batches.forget["input_ids"],
                attention_mask=batches.forget["attention_mask"],
            )
        h.remove()
        p = torch.softmax(logits[0].double(), -1)
        a = torch.zeros(8, dtype=torch.float64)
        a[experts] = 1.0 / len(experts)
        mask = batches.forget["attention_mask"].reshape(-1)
        per_tok = [float(((p[t] - a) ** 2).sum()) for t in range(p.shape[0]) if mask[t]]
        want = sum(per_tok) / len(per_tok) / (8 if reduction == "mean" else 1)
        assert parts["anchor"] == pytest.approx(want, rel=1e-5)
        nf, cf = hand_nll(full_logits(setup[0], batches.forget), batches.forget)
        assert loss.item() == pytest.approx(-sum(nf) / sum(cf) + alpha * want, rel=1e-5)


def test_aux_loss_off_by_default_and_added_when_asked(setup):
    model, adapter, _, _, _, batches = setup
    model.config.output_router_logits = True  # even a config that asks for it is overridden
    try:
        obj, out = _value("ga", setup)
        assert out.forget.aux_loss is None
        base, _ = obj(out, batches)
        obj = make_objective("ga", ObjectiveOptions(), adapter, router_aux_loss=True)
        out = obj.forward(model, batches)
        loss, parts = obj(out, batches)
        ref = model(
            input_ids=batches.forget["input_ids"],
            attention_mask=batches.forget["attention_mask"],
            output_router_logits=True,
        )
        assert parts["aux"] == pytest.approx(ref.aux_loss.item(), rel=1e-5)
        coef = model.config.router_aux_loss_coef
        assert coef > 0
        assert loss.item() == pytest.approx(base.item() + coef * ref.aux_loss.item(), rel=1e-5)
    finally:
        model.config.output_router_logits = False


def test_registry_and_errors(setup):
    adapter = setup[1]
    assert set(OBJECTIVES) == {"ga", "gdiff", "npo", "simnpo", "rmu"}
    with pytest.raises(ValueError, match="unknown algorithm 'dpo'"):
        make_objective("dpo", ObjectiveOptions(), adapter)
    obj, out = _value("ga", setup)
    with pytest.raises(ValueError, match="needs a retain batch"):
        make_objective("gdiff", ObjectiveOptions(), adapter)(out, Batches(setup[5].forget))


def test_minimising_npo_raises_forget_nll():
    model, adapter = model_and_adapter(seed=0)
    fc = corpus(8, seed=21)
    check = forget_loss_check(fc.in_order(8))
    before = check(model)["forget_loss"]
    sel = [(LAYER, 2)]
    sc = apply_scope(model, adapter, "seuf", sel)
    obj = make_objective(
        "npo", ObjectiveOptions(beta=0.5), adapter, sel, anchor_weight=1.0, layers=sc.layers
    )
    prepare_reference(obj, model, fc, None)  # the original model, before any step
    opts = TrainingOptions(lr=2e-2, max_steps=6, stop=StopRule())
    res = train(model, adapter, sc, obj, BatchStream(fc, 4, 0), None, opts)
    sc.bake()
    after = check(model)["forget_loss"]
    assert after > before + 0.05, (before, after)
    assert res.history[-1].parts["forget_nll"] > res.history[0].parts["forget_nll"]


def test_logits_at_loss_positions_equal_the_full_logits_loss(setup):
    """The training forward runs the LM head only where the loss looks (answer tokens here):
    same logits there, same NLLs, same gradients as from full [B, S, V] logits."""
    model, adapter, _, fc, _, batches = setup
    b = batches.forget  # loss_tokens="answer": most positions are not scored
    rows, cols = loss_positions(b)
    assert 0 < len(rows) < int(b["attention_mask"].sum()) - len(b["index"])
    assert [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)] == [
        (i, t) for i in range(b["loss_mask"].shape[0]) for t in range(b["loss_mask"].shape[1] - 1)
        if b["loss_mask"][i, t] == 1
    ]  # fmt: skip
    sc = apply_scope(model, adapter, "seuf", [(LAYER, 2)])
    try:
        grads, nlls = [], []
        for at in ("all", "loss"):
            for p in sc.trainable_parameters():
                p.grad = None
            out = run_forward(model, b, logits=at)
            nll, n = sequence_nll(out.logits, b)
            (nll.sum() / n.sum()).backward()
            grads.append([p.grad.clone() for p in sc.trainable_parameters()])
            nlls.append((nll.detach(), n))
            if at == "all":
                full = out.logits.detach()
            else:
                assert out.logits.shape == (len(rows), full.shape[-1])
                torch.testing.assert_close(out.logits.detach(), full[rows, cols])
        torch.testing.assert_close(nlls[0], nlls[1], rtol=1e-6, atol=1e-6)
        nf, cf = hand_nll(full, b)
        assert nlls[1][0].tolist() == pytest.approx(nf, rel=1e-5)
        assert nlls[1][1].tolist() == cf
        for g_all, g_loss in zip(*grads, strict=True):
            assert float(g_all.abs().max()) > 0
            torch.testing.assert_close(g_loss, g_all, rtol=1e-5, atol=1e-7)
    finally:
        sc.discard()
    assert run_forward(model, b, logits="none").logits is None
    rmu = make_objective("rmu", ObjectiveOptions(), adapter, selected=[(LAYER, 2)])
    assert rmu.forward(model, batches).forget.logits is None  # RMU needs no LM head
    with pytest.raises(ValueError, match="no logits"):
        sequence_nll(None, b)
