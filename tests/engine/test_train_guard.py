"""The utility guard and lr_policy decay in the training loop (workers/train.py): the guard
stops a too-large step size on the retain NLL and puts back its best state; a resumed run
keeps the guard's baseline and snapshots (the same outcome as an uninterrupted run)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.guard import utility_drop
from workers.objectives import make_objective
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions, StopRule, TrainingOptions
from workers.train import StepInfo, forget_loss_check, train

SEL = [(1, 2)]


def _setup():
    model, adapter = model_and_adapter(seed=0)
    sc = apply_scope(model, adapter, "seuf", SEL)
    obj = make_objective("ga", ObjectiveOptions(), adapter, SEL, anchor_weight=0.0,
                         layers=sc.layers)  # fmt: skip
    forget = BatchStream(corpus(8, seed=1), 4, seed=3)
    retain = BatchStream(corpus(8, seed=2), 4, seed=4)
    f_check = forget_loss_check([forget.corpus.collate(range(8))])
    r_check = forget_loss_check([retain.corpus.collate(range(8))])

    def check(m: nn.Module) -> dict[str, float]:
        return {**f_check(m), "retain_loss": r_check(m)["forget_loss"]}

    return model, adapter, sc, obj, forget, retain, check


def _opts(tolerance: float | None = 0.22, **kw) -> TrainingOptions:
    stop = StopRule(forget_loss_target=1000.0, eval_every=2, utility_drop_tolerance=tolerance)
    return TrainingOptions(**{"lr": 0.5, "max_steps": 30, "grad_clip": 0.0, "stop": stop, **kw})


def _trainables(sc) -> list[torch.Tensor]:
    return [p.detach().clone() for p in sc.trainable_parameters()]


def test_guard_stops_a_too_large_step_and_restores_its_best_state() -> None:
    model, adapter, sc, obj, f, r, check = _setup()
    states: dict[int, list[torch.Tensor]] = {}

    def keep(info: StepInfo) -> None:
        states[info.step] = _trainables(sc)

    res = train(model, adapter, sc, obj, f, r, _opts(), callback=keep, stop_check=check)
    g = res.guard
    assert g is not None and res.stopped_by == "utility_guard", g
    assert g["outcome"] == "target_not_met"
    last = g["history"][-1]
    assert last["step"] == res.steps and last["drop"] > 0.22  # the stop: past the tolerance
    kept = g["restored_step"]
    assert 0 < kept < res.steps
    # the restored state: the most forgetting among the checks within the tolerance
    within = [h for h in g["history"] if h["drop"] <= 0.22]
    assert kept == max(within, key=lambda h: h["forget_loss"])["step"]
    now = _trainables(sc)
    assert all(torch.equal(a, b) for a, b in zip(now, states[kept], strict=True))
    assert res.metrics == g["restored_metrics"]
    again = check(model)
    assert again["retain_loss"] == pytest.approx(res.metrics["retain_loss"])
    assert utility_drop(g["baseline"], again) <= 0.22


def _resumable_run(callback: Callable[[StepInfo], None] | None = None):
    model, adapter, sc, obj, f, r, check = _setup()
    res = train(model, adapter, sc, obj, f, r, _opts(), callback=callback, stop_check=check)
    return res, _trainables(sc)


def test_a_resumed_run_keeps_the_guards_baseline_and_ends_the_same() -> None:
    full, full_params = _resumable_run()
    saved: dict[str, object] = {}

    def at_four(info: StepInfo) -> None:
        if info.step == 4:
            saved["state"], saved["params"] = info.state(), _trainables(sc0)

    model0, adapter0, sc0, obj0, f0, r0, check0 = _setup()
    train(model0, adapter0, sc0, obj0, f0, r0, _opts(), callback=at_four, stop_check=check0)
    state = saved["state"]
    assert isinstance(state, dict) and state["guard"]["baseline"] == full.guard["baseline"]

    model, adapter, sc, obj, f, r, check = _setup()
    with torch.no_grad():  # the weights as they were at step 4, then resume
        for p, v in zip(sc.trainable_parameters(), saved["params"], strict=True):  # type: ignore[arg-type]
            p.copy_(v)
    resumed = train(model, adapter, sc, obj, f, r, _opts(), stop_check=check, resume=state)
    assert resumed.resumed_from == 4 and resumed.stopped_by == full.stopped_by
    assert resumed.guard == full.guard  # same baseline, history and restored step
    assert all(torch.equal(a, b) for a, b in zip(_trainables(sc), full_params, strict=True))

    # a checkpoint from a run without the guard cannot silently start a new baseline
    plain = dict(state)
    plain.pop("guard")
    with pytest.raises(RuntimeError, match="without the guard's state"):
        train(model, adapter, sc, obj, f, r, _opts(), stop_check=check, resume=plain)


def test_decay_scales_the_step_lr_and_leaves_the_schedule() -> None:
    model, adapter, sc, obj, f, r, check = _setup()
    base = check(model)["forget_loss"]
    target = base + 4.0
    opts = _opts(tolerance=None, lr=0.05, max_steps=8, schedule="linear", lr_policy="decay",
                 stop=StopRule(forget_loss_target=target, eval_every=2))  # fmt: skip
    res = train(model, adapter, sc, obj, f, r, opts, stop_check=check)
    from workers.guard import lr_scale
    from workers.train import lr_factor

    factor = 1.0
    for h in res.history:
        assert h.lr == pytest.approx(0.05 * lr_factor(h.step - 1, opts) * factor), h.step
        if h.metrics:
            factor = lr_scale(-h.metrics["forget_loss"], -base, -target)
    assert res.guard is None and any(h.lr < 0.05 * lr_factor(h.step - 1, opts) for h in
                                     res.history)  # fmt: skip
