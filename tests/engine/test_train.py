"""The training loop: deterministic, stop rules, schedule, resume, routing overlap."""

from __future__ import annotations

import math

import pytest
import torch

from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.objectives import Batches, make_objective
from workers.routing import collect_topk, routing_overlap
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions, StopRule, TrainingOptions
from workers.train import forget_loss_check, lr_factor, train

SEL = [(1, 2)]


def _setup(algorithm="gdiff", scope="seuf"):
    model, adapter = model_and_adapter(seed=0)
    sc = apply_scope(model, adapter, scope, SEL)
    obj = make_objective(
        algorithm, ObjectiveOptions(), adapter, SEL, anchor_weight=1.0, layers=sc.layers
    )
    forget = BatchStream(corpus(8, seed=1), 4, seed=3)
    retain = BatchStream(corpus(8, seed=2), 4, seed=4)
    return model, adapter, sc, obj, forget, retain


def _opts(**kw):
    base = {"lr": 1e-2, "max_steps": 5, "stop": StopRule()}
    return TrainingOptions(**{**base, **kw})


def test_two_runs_with_the_same_seed_are_identical():
    runs = []
    for _ in range(2):
        model, adapter, sc, obj, f, r = _setup()
        res = train(model, adapter, sc, obj, f, r, _opts(weight_decay=0.1, warmup_steps=2))
        runs.append(
            (
                [h.loss for h in res.history],
                [h.parts for h in res.history],
                [p.detach().clone() for p in sc.trainable_parameters()],
            )
        )
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2], strict=True))
    assert len(set(runs[0][0])) > 1  # the loss actually moved


def test_forget_loss_target_stops_early_and_callback_sees_every_step():
    model, adapter, sc, obj, f, r = _setup("ga")
    check = forget_loss_check([f.corpus.collate(range(8))])
    start = check(model)["forget_loss"]
    seen = []
    opts = _opts(max_steps=60, stop=StopRule(forget_loss_target=start + 0.2, eval_every=2))
    res = train(model, adapter, sc, obj, f, None, opts, callback=seen.append, stop_check=check)
    assert res.stopped_by == "forget_loss"
    assert res.steps < 60 and res.steps % 2 == 0
    assert res.metrics["forget_loss"] >= start + 0.2
    assert [s.step for s in seen] == list(range(1, res.steps + 1))
    assert all(s.metrics == {} for s in seen if s.step % 2)  # checked only every eval_every


def test_forget_accuracy_target_and_callback_stop():
    model, adapter, sc, obj, f, r = _setup()
    calls = []

    def fake_accuracy(m):  # a real callable the runner would pass; here a countdown
        calls.append(1)
        return {"forget_accuracy": 1.0 - 0.3 * len(calls)}

    opts = _opts(max_steps=50, stop=StopRule(forget_accuracy_target=0.3, eval_every=3))
    res = train(model, adapter, sc, obj, f, r, opts, stop_check=fake_accuracy)
    assert (res.stopped_by, res.steps) == ("forget_accuracy", 9)  # 0.7, 0.4, 0.1 <= 0.3
    with pytest.raises(ValueError, match="no stop_check"):
        train(model, adapter, sc, obj, f, r, opts)
    res = train(
        model, adapter, sc, obj, f, r, _opts(max_steps=50), callback=lambda info: info.step == 4
    )
    assert (res.stopped_by, res.steps) == ("callback", 4)
    with pytest.raises(ValueError, match="needs retain batches"):
        train(model, adapter, sc, obj, f, None, _opts())


def test_warmup_and_schedules():
    o = _opts(max_steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, o) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, o) == pytest.approx(1.0)
    assert lr_factor(6, o) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin = _opts(max_steps=10, warmup_steps=0, schedule="linear")
    assert lr_factor(5, lin) == pytest.approx(0.5)
    model, adapter, sc, obj, f, r = _setup()
    res = train(
        model, adapter, sc, obj, f, r, _opts(max_steps=4, warmup_steps=2, schedule="linear")
    )
    assert [h.lr for h in res.history] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])


def test_resume_continues_exactly():
    model, adapter, sc, obj, f, r = _setup()
    full = train(model, adapter, sc, obj, f, r, _opts(max_steps=6, weight_decay=0.1))
    want = [p.detach().clone() for p in sc.trainable_parameters()]
    model, adapter, sc, obj, f, r = _setup()
    first = train(model, adapter, sc, obj, f, r, _opts(max_steps=3, weight_decay=0.1))
    second = train(
        model, adapter, sc, obj, f, r, _opts(max_steps=6, weight_decay=0.1), resume=first.state
    )
    assert [h.step for h in second.history] == [4, 5, 6]
    assert [h.loss for h in first.history + second.history] == [h.loss for h in full.history]
    got = list(sc.trainable_parameters())
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    # A checkpoint taken inside the callback (what the Ray runner does) resumes the same way.
    model, adapter, sc, obj, f, r = _setup()
    saved = {}

    def ckpt(info):
        if info.step == 2:
            saved["state"], saved["stale"] = info.state(), info.state

    train(model, adapter, sc, obj, f, r, _opts(max_steps=3, weight_decay=0.1), callback=ckpt)
    assert saved["state"]["step"] == 2
    with pytest.raises(RuntimeError, match="called at step 3"):
        saved["stale"]()


def test_overlap_is_reported_and_matches_routing_module():
    model, adapter = model_and_adapter(seed=0)
    probe = [corpus(6, seed=9).collate(range(6))]
    snap = collect_topk(model, adapter, probe)  # the original routing, before wiring
    sc = apply_scope(model, adapter, "seuf", SEL)
    obj = make_objective(
        "ga", ObjectiveOptions(), adapter, SEL, anchor_weight=0.0, layers=sc.layers
    )
    f = BatchStream(corpus(8, seed=1), 4, seed=3)
    res = train(
        model,
        adapter,
        sc,
        obj,
        f,
        None,
        _opts(lr=5e-2, max_steps=6),
        routing_reference=snap,
        routing_batches=probe,
        overlap_every=2,
    )
    ov = [h.overlap for h in res.history]
    assert ov[0] is None and all(0.0 <= v <= 1.0 for v in ov[1:])
    assert ov[1] == ov[2] and ov[3] == ov[4]
    sc.bake()
    assert res.overlap == pytest.approx(routing_overlap(model, adapter, probe, snap))
    assert res.overlap < 1.0  # GA on an expert + router without anchor moved the routing


def test_reported_grad_norm_and_plain_batch_lists():
    model, adapter, sc, obj, f, r = _setup("ga")
    batches = [f.batch(0), f.batch(1)]
    # The first step's gradient norm, computed outside the loop on the same batch.
    loss, _ = obj(obj.forward(model, Batches(batches[0])), Batches(batches[0]))
    loss.backward()
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in sc.trainable_parameters())).item()
    for p in sc.trainable_parameters():
        p.grad = None
    res = train(model, adapter, sc, obj, batches, None, _opts(max_steps=3, grad_clip=1e-3))
    assert res.history[0].grad_norm == pytest.approx(want, rel=1e-5)
    assert want > 1e-3  # so clipping was active


def test_a_tensor_frozen_after_wiring_gets_no_master_and_no_optimizer_state():
    """The projected fallback freezes the tensors it holds after the scope is wired: in
    bfloat16 they get no float32 master (4 bytes a held parameter; they had one before)
    nor AdamW moments, and stay bit for bit; the rest train through their masters."""
    model, adapter = model_and_adapter(seed=0)
    model.to(torch.bfloat16)
    sc = apply_scope(model, adapter, "full", [])
    held = {"model.embed_tokens.weight", "lm_head.weight"}
    params = dict(model.named_parameters())
    for name in held:
        params[name].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in params.items()}
    obj = make_objective("gdiff", ObjectiveOptions(), adapter, [], anchor_weight=0.0)
    seen = []
    f, r = BatchStream(corpus(8, seed=1), 4, seed=3), BatchStream(corpus(8, seed=2), 4, seed=4)
    train(model, adapter, sc, obj, f, r, _opts(max_steps=2), callback=seen.append)
    state = seen[-1].state()
    trained = [n for n, p in params.items() if p.requires_grad]
    assert len(state["master"]) == len(trained) == len(params) - len(held)
    moments = state["optimizer"]["state"]
    assert len(moments) == len(trained), len(moments)
    assert all(torch.equal(params[n], before[n]) for n in held)
    assert any(not torch.equal(params[n], before[n]) for n in trained)
