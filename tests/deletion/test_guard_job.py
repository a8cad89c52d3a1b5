"""The utility guard and lr_policy decay through the real path (`model: demo` on the
session's small world, `workers.run.run_job`): a deliberately too-large step size is
stopped before it takes the retain questions with it, and the packaged model is the
guard's restored state; decay lowers the step size as forget accuracy nears its target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.small_world import example_on_small_world
from workers.guard import lr_scale
from workers.run import run_job
from workers.spec import JobSpec

TOLERANCE = 0.05
TARGET = 0.30


class Steps:
    """A reporter that keeps every step event's payload."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def stage(self, name: str) -> None:
        pass

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "step":
            self.steps.append(payload)


def _ga_spec(**training: Any) -> JobSpec:
    data = example_on_small_world("demo-ga-seuf.yaml")
    stop = {**data["training"]["stop"], "eval_every": 1, **training.pop("stop", {})}
    data["training"] = {**data["training"], **training, "stop": stop}
    data["evaluation"] = {"backend": "direct", "robustness": []}  # fast; same scorer as lm-eval
    # One expert at the given step size: a full-parameter fallback (auto's, on this world)
    # would cap the step size, and the guard is tested against a too-large one. Without the
    # retain routing loss: at weight 100 it kept utility in place at lr 0.05 (the job met
    # its forget target instead), and the guard is tested against damage.
    data["seuf"].update(num_experts=1, router_projection="none", retain_routing_weight=0)
    return JobSpec.model_validate(data)


@pytest.mark.slow
def test_the_utility_guard_stops_a_deliberately_too_large_step_size(
    small_world, tmp_path: Path
) -> None:
    spec = _ga_spec(lr=0.05, max_steps=30, stop={"utility_drop_tolerance": TOLERANCE})
    rec = Steps()
    res = run_job(spec, tmp_path / "out", reporter=rec)
    before, after, g = res.before, res.after, res.guard
    assert res.stopped_by == "utility_guard" and g is not None, (res.stopped_by, g)
    assert res.target_met is False and g["outcome"] == "target_not_met"
    # the last check lost more than the tolerance on the retain-pool questions ...
    last = rec.steps[-1]["metrics"]
    assert before["utility_accuracy"] - last["utility_accuracy"] > TOLERANCE, last
    # ... and the state put back (an earlier check: the most forgetting within tolerance)
    # is the model measured after and written: utility within the tolerance of before
    kept = g["restored_step"]
    assert 0 < kept < res.steps
    assert after["utility_accuracy"] == pytest.approx(g["restored_metrics"]["utility_accuracy"])
    assert after["forget_accuracy"] == pytest.approx(g["restored_metrics"]["forget_accuracy"])
    assert before["utility_accuracy"] - after["utility_accuracy"] <= TOLERANCE
    assert after["forget_accuracy"] < before["forget_accuracy"] - 0.2  # it did forget some
    # SEUF: only the selected expert's slices and its layer's router changed
    (sel,) = res.selected
    prefix = f"model.layers.{sel['layer']}.mlp."
    assert res.changed and all(r["name"].startswith(prefix) for r in res.changed), res.changed
    assert {r["expert"] for r in res.changed} == {sel["expert"], None}
    # the written model is the restored one
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluate import evaluate_world

    out = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    again = evaluate_world(model, AutoTokenizer.from_pretrained(str(out)), small_world,
                           backend="direct")  # fmt: skip
    assert again["utility_accuracy"] == pytest.approx(after["utility_accuracy"])


@pytest.mark.slow
def test_decay_lowers_the_step_size_as_forget_nears_its_target(small_world, tmp_path: Path):
    spec = _ga_spec(lr=0.03, max_steps=12, lr_policy="decay")
    rec = Steps()
    res = run_job(spec, tmp_path / "out", reporter=rec)
    start = res.before["forget_accuracy"]
    factor = 1.0  # each step's lr: the constant schedule's x lr_scale at the check before
    for s in rec.steps:
        assert s["lr"] == pytest.approx(0.03 * factor), (s["step"], s["lr"], factor)
        factor = lr_scale(s["metrics"]["forget_accuracy"], start, TARGET)
    lrs = [s["lr"] for s in rec.steps]
    assert lrs[0] == pytest.approx(0.03) and min(lrs) < 0.03 * 0.7, lrs
    assert res.guard is None  # decay alone: no guard
