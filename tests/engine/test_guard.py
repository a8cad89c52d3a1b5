"""The utility guard and the step-size policy: stop before the damage, keep the best state
that met the forget target, report target_not_met when it never did."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.guard import (
    GuardedSteps,
    UtilityGuard,
    lr_scale,
    utility_drop,
)
from workers.spec import TrainingOptions
from workers.train import make_scheduler

BASE = {"forget_accuracy": 1.0, "utility_accuracy": 0.98, "retain_loss": 0.5}


def test_utility_drop_accuracy_first_then_retain_nll() -> None:
    assert utility_drop(BASE, {"utility_accuracy": 0.90}) == pytest.approx(0.08)
    assert utility_drop({"retain_loss": 0.5}, {"retain_loss": 0.6}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="needs utility_accuracy or retain_loss"):
        utility_drop({"forget_accuracy": 1.0}, {"forget_accuracy": 0.5})


def test_guard_stops_on_damage_and_restores_best_target_state() -> None:
    g = UtilityGuard(dict(BASE), tolerance=0.03, forget_target=0.30)
    trace = [  # (forget, utility): a too-large step size overshoots and takes utility with it
        (0.80, 0.98),
        (0.29, 0.97),  # target met, drop 0.01
        (0.27, 0.975),  # target met, less damage: the best
        (0.10, 0.93),  # drop 0.05 > 0.03: stop
    ]
    verdicts = [
        g.check(5 * (i + 1), {"forget_accuracy": f, "utility_accuracy": u}, lambda i=i: f"s{i}")
        for i, (f, u) in enumerate(trace)
    ]
    assert verdicts == ["continue", "target", "target", "utility_guard"]
    assert g.outcome == "target_met"
    keep = g.restore_state()
    assert keep is not None and keep.step == 15 and keep.state == "s2"
    assert g.to_json()["restored_step"] == 15 and len(g.to_json()["history"]) == 4


def test_guard_without_target_reached_reports_target_not_met() -> None:
    g = UtilityGuard(dict(BASE), tolerance=0.03, forget_target=0.30)
    assert g.check(5, {"forget_accuracy": 0.7, "utility_accuracy": 0.98}, lambda: "a") == "continue"
    assert (
        g.check(10, {"forget_accuracy": 0.5, "utility_accuracy": 0.96}, lambda: "b") == "continue"
    )
    assert g.check(15, {"forget_accuracy": 0.4, "utility_accuracy": 0.90}, lambda: "c") == (
        "utility_guard"
    )
    assert g.outcome == "target_not_met"
    keep = g.restore_state()
    assert keep is not None and keep.state == "b"  # most forgetting within tolerance


def test_guard_with_forget_loss_target_and_no_tolerance() -> None:
    g = UtilityGuard({"retain_loss": 1.0}, tolerance=None, forget_loss_target=5.0)
    assert g.check(3, {"forget_loss": 2.0, "retain_loss": 9.0}, lambda: 1) == "continue"
    assert g.check(6, {"forget_loss": 6.0, "retain_loss": 9.0}, lambda: 2) == "target"
    assert g.outcome == "target_met"


def test_lr_scale_decays_towards_the_target() -> None:
    assert lr_scale(1.0, 1.0, 0.3) == pytest.approx(1.0)
    assert lr_scale(0.65, 1.0, 0.3) == pytest.approx(0.6)
    assert lr_scale(0.2, 1.0, 0.3) == pytest.approx(0.2)
    assert lr_scale(0.5, 0.3, 0.3) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="floor"):
        lr_scale(0.5, 1.0, 0.3, floor=0.0)


def test_guard_state_round_trips_for_a_resumed_run() -> None:
    g = UtilityGuard(dict(BASE), tolerance=0.03, forget_target=0.30)
    g.start(lambda: 0)
    g.check(5, {"forget_accuracy": 0.7, "utility_accuracy": 0.97}, lambda: 5)
    back = UtilityGuard.from_state(g.state_dict())
    assert back == g and back.fallback is not None and back.fallback.step == 5
    assert [h["step"] for h in back.history] == [0.0, 5.0]


def _options(**stop: Any) -> TrainingOptions:
    return TrainingOptions.model_validate(
        {"lr": 0.1, "schedule": "linear", "max_steps": 10,
         "lr_policy": "decay", "stop": {"forget_accuracy_target": 0.3, **stop}}
    )  # fmt: skip


def test_guarded_steps_snapshot_restore_and_scaled_lr_keep_the_scheduler() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opts = _options(utility_drop_tolerance=0.05)
    gs = GuardedSteps(opts, [p], None, {"forget_accuracy": 1.0, "utility_accuracy": 0.9})
    opt = torch.optim.SGD([p], lr=opts.lr)
    sched = make_scheduler(opt, opts)
    lrs = []
    for step, (forget, utility) in enumerate([(0.65, 0.88), (0.4, 0.80)], start=1):
        with gs.scaled(opt):
            lrs.append(opt.param_groups[0]["lr"])
            p.grad = -torch.ones(3)
            opt.step()
        sched.step()
        worse, agreed = gs.propose(step, {"forget_accuracy": forget, "utility_accuracy": utility})
        gs.apply(step, agreed)
    # step 1 at the full lr; step 2 at the schedule's lr x lr_scale(0.65, 1.0, 0.3) = 0.6
    assert lrs == pytest.approx([0.1, 0.1 * 0.9 * 0.6])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.8)  # the scheduler's own
    # step 2 lost 0.10 of utility (> 0.05): stop; step 1's state (0.1 each) comes back
    assert worse and set(gs.snaps) == {1}
    assert gs.restore(gs.restore_code()) == {"forget_accuracy": 0.65, "utility_accuracy": 0.88}
    assert p.detach().tolist() == pytest.approx([0.1] * 3)
