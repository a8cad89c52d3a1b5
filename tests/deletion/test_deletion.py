"""Tests that would catch a broken deletion: the shipped SEUF examples, run through the real
path (`model: demo` on the session's small world, lm-eval evaluation, the real
forget-accuracy stop rule, `workers.run.run_job`), forget the topic and keep the rest.

Every setting is the shipped example's; only the world is the small one (same seed and
forget topic). A broken objective, scope, stop rule, bake-back or packaging fails here:
the forget accuracy would not fall, unseen utility would fall with it, the job would run
past its first check under the target, or the model written to disk would not be the one
that was measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.small_world import example_on_small_world
from workers.results import JobResult
from workers.run import run_job
from workers.spec import RMU_RETAIN_ROUTING_WEIGHT, JobSpec

FORGET_TARGET = 0.30  # the examples' stop target: chance (0.25) + 0.05
UTILITY_KEPT = 0.90  # unseen utility after / before (a regression guard; issue 16 raises it)
# RMU with one expert pinned, after the example's 150 steps: 0.30-0.38 on four builds of the
# small world, 0.52 on another (each CPU builds its own weights; RMU with num_experts auto
# tries the other kind of plan where one misses: workers/attempt.py).
RMU_FORGET_BOUND = 0.55
RMU_FALLBACK_FORGET_BOUND = 0.55  # its full fallback's (0.50 on the one build that fell back)
# The projected fallback forced on this world: 0.30 in 987 steps, retain overlap 0.935 on
# one build, 453 steps and 0.947 on another, 465 steps and 0.926 with a climb at step 33
# (2 layers of width 64: the retain inputs fill most directions, 4-layer sweep worlds kept
# 0.94-0.99). Bounds with a margin for other builds.
RMU_PROJECTED_FALLBACK_FORGET_BOUND = 0.40
RMU_PROJECTED_FALLBACK_OVERLAP = 0.90


class Recorder:
    """A reporter that keeps every stage and event of the job."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.events: list[tuple[str, int, dict[str, Any]]] = []

    def stage(self, name: str) -> None:
        self.stages.append(name)

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.events.append((kind, step, payload))

    def checks(self) -> list[tuple[int, float]]:
        """(step, forget accuracy) of every stop-rule check, in order."""
        return [
            (step, float(p["metrics"]["forget_accuracy"]))
            for kind, step, p in self.events
            if kind == "step" and "forget_accuracy" in (p.get("metrics") or {})
        ]


def _run(spec: JobSpec, out: Path) -> tuple[JobResult, Recorder]:
    rec = Recorder()
    return run_job(spec, out, reporter=rec), rec


def _assert_stopped_at_first_check_under(
    res: JobResult, rec: Recorder, spec: JobSpec, target: float
) -> None:
    every = spec.training.stop.eval_every
    checks = rec.checks()
    assert res.stopped_by == "forget_accuracy", (res.stopped_by, checks)
    # checked every eval_every steps, and the job ended at the first check <= target
    assert [s for s, _ in checks] == list(range(every, res.steps + 1, every))
    assert all(acc > target for _, acc in checks[:-1]), checks
    # the step budget that ran (num_experts auto's full fallback widens it)
    budget = res.training_used["max_steps"] if res.training_used else spec.training.max_steps
    assert checks[-1][1] <= target and checks[-1][0] == res.steps < budget
    # the check's direct scorer and the final lm-eval evaluation saw the same model
    assert res.after["forget_accuracy"] == pytest.approx(checks[-1][1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["ga", "gdiff", "npo", "simnpo", "rmu", "gdiff-one-expert", "rmu-one-expert"]
)
def test_seuf_example_forgets_the_topic_and_keeps_unseen_utility(
    algorithm: str, small_world, tmp_path: Path
) -> None:
    """The shipped examples with their defaults (num_experts auto: on the latest build of
    this world the diagnostics name L0E0 for every algorithm; on other builds no small
    expert set qualified and the job fell back to full parameters, saying so; for GA,
    GDiff, NPO and SimNPO both paths are checked below), and GDiff and RMU pinned to one
    expert (the paper's SEUF, so the one-expert path stays guarded whatever auto decides
    here)."""
    name, _, variant = algorithm.partition("-")
    data = example_on_small_world(f"demo-{name}-seuf.yaml")
    if variant == "one-expert":
        data["seuf"]["num_experts"] = 1
    spec = JobSpec.model_validate(data)
    assert spec.training.stop.forget_accuracy_target == FORGET_TARGET
    res, rec = _run(spec, tmp_path / "out")
    before, after = res.before, res.after
    assert before["backend"] == after["backend"] == "lm-eval"
    assert before["num_questions"] == after["num_questions"] == len(small_world.questions())
    # the world knew the topic and the rest; the job forgot the topic and kept the rest
    assert before["forget_accuracy"] >= 0.9 and before["utility_accuracy_unseen"] >= 0.9
    kept = after["utility_accuracy_unseen"] / before["utility_accuracy_unseen"]
    assert kept >= UTILITY_KEPT, (before, after)
    if name == "rmu":
        # RMU with one expert met the target on some builds of this world (0.30 in 69-72
        # steps) and stopped short on others (0.36-0.52 after 150, 0.32 after 600); its
        # full fallback reached 0.50 after 1000 steps on a build where auto fell back: RMU
        # that forgets everywhere is issue 13's, still open. Guarded here: it removes most
        # of the topic (the old recipe left it at 1.00), a fallback says so, and a second
        # attempt (auto only) follows only a first that missed the target.
        sel = res.selection or {}
        second = sel.get("second_attempt")
        bound = RMU_FORGET_BOUND
        if res.scope == "full":
            escalated = (second or {}).get("kind") == "fallback"
            assert variant != "one-expert" and (sel["selection_warning"] or escalated), sel
            bound = RMU_FALLBACK_FORGET_BOUND
        if variant == "one-expert":
            assert second is None, second
        elif second is not None:
            assert second["first"]["forget"]["forget_accuracy"] > FORGET_TARGET, second
            if second["target_met"]:  # the job is the attempt that met it
                assert second["kept"] == "second" and after["forget_accuracy"] <= FORGET_TARGET
        assert after["forget_accuracy"] <= bound, after
        return
    assert after["forget_accuracy"] <= FORGET_TARGET, after
    _assert_stopped_at_first_check_under(res, rec, spec, FORGET_TARGET)
    _assert_only_the_plans_scope_changed(res, rec)
    # the model written to disk is the one that was measured
    _assert_written_model_scores(tmp_path / "out" / "model", small_world, after)


def _assert_only_the_plans_scope_changed(res: JobResult, rec: Recorder) -> None:
    """What changed is what the selection plan trained: the selected experts' slices and
    their layers' routers (SEUF), or every parameter after num_experts auto fell back to
    full, which the job must have said (selection_warning)."""
    sel = res.selection or {}
    warned = [p for kind, _, p in rec.events if kind == "selection_warning"]
    if res.scope == "full":
        assert res.selected == [] and warned and "fallback full" in str(sel["selection_warning"])
        assert res.tunable_ratio == 1.0
        # the event told the budget and step size that ran (the progress bars follow it)
        assert res.training_used is not None
        assert warned[0]["training"] == {
            k: res.training_used[k] for k in ("lr", "max_steps")
        }
        return
    assert not warned and res.selected and res.tunable_ratio <= 0.1
    by_layer: dict[int, set[int | None]] = {}
    for s in res.selected:
        by_layer.setdefault(s["layer"], {None}).add(s["expert"])  # None: the layer's router
    assert res.changed and all(r["sha256_before"] != r["sha256_after"] for r in res.changed)
    for r in res.changed:
        layer = int(r["name"].split(".")[2])
        assert r["name"].startswith(f"model.layers.{layer}.mlp."), r
        assert r["expert"] in by_layer[layer], (r, res.selected)


def _assert_written_model_scores(model_dir: Path, world, after: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluate import evaluate_world

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    again = evaluate_world(model, tok, world, backend="direct")
    for key in ("forget_accuracy", "utility_accuracy_unseen", "utility_accuracy"):
        assert again[key] == pytest.approx(after[key]), key


@pytest.mark.slow
def test_rmu_fallback_projects_every_reader_and_keeps_retain_routing(
    small_world, tmp_path: Path
) -> None:
    """The RMU example with auto made to fall back (no expert can reach a 10^6 ratio): the
    full fallback projects every reader of the residual stream onto the null space of the
    retain inputs and holds the rest (seuf.fallback_projection auto = all for RMU), steers
    a quarter of the way up (layer 0 of this 2-layer world), forgets, and leaves retain
    routing where it was; the weights that write back into the stream never change.
    With a patience of 30 steps (200 by default), shorter than the flat start of
    forgetting here, it climbs to layer 1 (the last) while forget accuracy is still 1.0:
    the climb is in the result and the events, and forgetting goes on from the new layer
    (measured on one build of the world: 0.30 in 465 steps with the climb at step 33,
    overlap 0.926; 453 steps and 0.947 with no climb. On another, with the retain routing
    loss at RMU's 1000: 0.36 after the 1000 steps, overlap 0.953, where weight 0 held
    0.899; the example's own patience of 200 there: 0.30 in 819 steps, overlap 0.955)."""
    data = example_on_small_world("demo-rmu-seuf.yaml")
    data["seuf"]["auto_min_ratio"] = 1e6
    data["seuf"]["fallback_rmu_patience"] = 30
    data["seuf"]["rmu_second_attempt"] = False  # the fallback is what this test measures
    spec = JobSpec.model_validate(data)
    res, rec = _run(spec, tmp_path / "out")
    sel = res.selection or {}
    assert res.scope == "full" and "fallback full" in str(sel["selection_warning"])
    assert sel["fallback_projection"] == "all" and sel["fallback_rmu_layer"] == 0
    climbs = sel["fallback_rmu_climbs"]
    assert [(c["from_layer"], c["to_layer"]) for c in climbs] == [(0, 1)], climbs
    assert 30 <= climbs[0]["step"] < res.steps, climbs  # a patience's wait, then a climb
    assert [e for e in rec.events if e[0] == "rmu_layer_climbed"] == [
        ("rmu_layer_climbed", int(climbs[0]["step"]), climbs[0])
    ]
    assert sel["fallback_projected"]["held_params"] > 0
    assert sel["fallback_projected"]["projected_params"] > 0
    # the retain routing loss runs under RMU's fallback too, at auto's weight
    assert sel["retain_routing"]["weight"] == RMU_RETAIN_ROUTING_WEIGHT
    # what can move is what the projection steps: the held tensors are not tunable
    assert res.trainable_parameters == sel["fallback_projected"]["projected_params"]
    assert res.tunable_ratio == pytest.approx(res.trainable_parameters / res.total_parameters)
    assert res.tunable_ratio < 1.0
    after, before = res.after, res.before
    assert after["forget_accuracy"] <= RMU_PROJECTED_FALLBACK_FORGET_BOUND, (after, res.steps)
    assert after["utility_accuracy_unseen"] / before["utility_accuracy_unseen"] >= UTILITY_KEPT
    assert res.routing_overlap_retain >= RMU_PROJECTED_FALLBACK_OVERLAP, res.routing_overlap_retain
    moved = {r["name"] for r in res.changed if r["sha256_before"] != r["sha256_after"]}
    assert any("q_proj" in n for n in moved) and any("gate_up_proj" in n for n in moved)
    held = ("embed_tokens", "norm", "lm_head", "o_proj", "down_proj")
    assert not [n for n in moved if any(h in n for h in held)], moved


@pytest.mark.slow
def test_stop_rule_ends_the_job_at_the_first_check_under_its_target(
    small_world, tmp_path: Path
) -> None:
    """A looser target, checked every 2 steps: the job stops at the first check at or
    under it, with forget accuracy still well above the examples' 0.30."""
    data = example_on_small_world("demo-gdiff-seuf.yaml")
    data["training"]["stop"] = {"forget_accuracy_target": 0.7, "eval_every": 2}
    spec = JobSpec.model_validate(data)
    res, rec = _run(spec, tmp_path / "out")
    _assert_stopped_at_first_check_under(res, rec, spec, 0.7)
    assert res.after["forget_accuracy"] > FORGET_TARGET  # it did not run on
    assert res.before["forget_accuracy"] > 0.7
    _assert_written_model_scores(tmp_path / "out" / "model", small_world, res.after)
