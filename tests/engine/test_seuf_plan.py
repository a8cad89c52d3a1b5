"""The pipeline glue of issue 13: the selection plan (auto and its fallbacks) and the
projected routers of a job spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.engine._moe_hand import make_batch
from tests.engine.test_selection_auto import LOCAL, SPREAD
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.routing import router_outputs
from workers.selection import SelectionRefused
from workers.seuf_plan import (
    FULL_FALLBACK_LR,
    FULL_FALLBACK_STEPS,
    attach_projection,
    close_all,
    full_fallback_lr,
    full_fallback_refusal,
    plan_selection,
    projection_mode,
    training_for,
)
from workers.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


def spec(scope: str = "seuf", **seuf: object) -> JobSpec:
    return JobSpec.model_validate(
        {"forget": {"demo": "forget"}, "retain": {"demo": "retain"}, "scope": scope, "seuf": seuf}
    )


def test_plan_keeps_fixed_selections_and_full_scope() -> None:
    assert plan_selection(LOCAL, spec("full")).scope == "full"
    assert plan_selection(LOCAL, spec("full")).selected == []
    plan = plan_selection(LOCAL, spec(num_experts=1))
    assert plan.pairs == [(2, 1)] and plan.scope == "seuf" and plan.warning is None


def test_plan_auto_qualified_fallback_full_and_stop() -> None:
    plan = plan_selection(LOCAL, spec(num_experts="auto"))
    assert plan.pairs == [(2, 1)] and plan.scope == "seuf" and plan.auto is not None
    full = plan_selection(SPREAD, spec(num_experts="auto", fallback="full"))
    assert full.scope == "full" and full.selected == [] and SPREAD.selected == []
    assert full.warning is not None and "fallback full" in full.warning
    assert full.to_json()["selection_warning"] == full.warning
    with pytest.raises(SelectionRefused, match="fallback stop"):
        plan_selection(SPREAD, spec(num_experts="auto", fallback="stop"))


def test_a_full_fallback_trains_at_a_capped_lr_and_widens_only_a_targeted_budget() -> None:
    fell = plan_selection(SPREAD, spec(num_experts="auto"))
    assert fell.scope == "full"
    targeted = JobSpec.model_validate(
        spec().resolved()
        | {"training": {"lr": 3e-3, "max_steps": 150, "stop": {"forget_accuracy_target": 0.3}}}
    )
    tr = training_for(fell, targeted)
    assert (tr.lr, tr.max_steps) == (FULL_FALLBACK_LR, FULL_FALLBACK_STEPS)
    untargeted = JobSpec.model_validate(
        spec().resolved() | {"training": {"lr": 3e-3, "max_steps": 6}}
    )
    assert (training_for(fell, untargeted).lr, training_for(fell, untargeted).max_steps) == (
        FULL_FALLBACK_LR, 6,
    )  # fmt: skip
    kept = plan_selection(LOCAL, targeted)  # qualified: the spec's own settings
    assert training_for(kept, targeted) == targeted.training
    # seuf.fallback_lr names the fallback's step size (the cap is auto's)
    named = JobSpec.model_validate(
        targeted.resolved() | {"seuf": {**targeted.resolved()["seuf"], "fallback_lr": 1e-3}}
    )
    assert training_for(fell, named).lr == 1e-3
    assert training_for(kept, named) == named.training  # only a fallback uses it


def test_retain_routing_weight_auto_is_on_for_seuf_jobs_with_retain_data_only() -> None:
    from workers.spec import (
        RETAIN_ROUTING_WEIGHT,
        RETAIN_ROUTING_WEIGHT_FALLBACK,
        RMU_RETAIN_ROUTING_WEIGHT,
    )

    assert spec().retain_routing_weight() == RETAIN_ROUTING_WEIGHT > 0
    assert spec().retain_routing_weight("seuf") == RETAIN_ROUTING_WEIGHT
    # auto's full fallback moves every parameter below the routers: the heavier weight
    assert spec().retain_routing_weight("full") == RETAIN_ROUTING_WEIGHT_FALLBACK
    assert RETAIN_ROUTING_WEIGHT_FALLBACK > RETAIN_ROUTING_WEIGHT
    assert spec("router").retain_routing_weight() == RETAIN_ROUTING_WEIGHT
    assert spec("full").retain_routing_weight() == 0.0  # the baseline stays plain
    assert spec("experts").retain_routing_weight() == 0.0
    assert spec("full", retain_routing_weight=2.5).retain_routing_weight() == 2.5
    assert spec(retain_routing_weight=0).retain_routing_weight() == 0.0
    no_retain = JobSpec.model_validate(
        {"forget": {"demo": "forget"}, "algorithm": "ga", "seuf": {"attribution": "affinity"}}
    )
    assert no_retain.retain_routing_weight() == 0.0
    rmu = JobSpec.model_validate(spec().resolved() | {"algorithm": "rmu"})
    # auto for RMU: on for selected experts and under the projected fallback; off under an
    # unprojected fallback (it held back the steering there) and for the baselines
    assert rmu.retain_routing_weight("seuf") == RMU_RETAIN_ROUTING_WEIGHT > 0
    assert rmu.retain_routing_weight() == RMU_RETAIN_ROUTING_WEIGHT
    assert rmu.retain_routing_weight("full", "all") == RMU_RETAIN_ROUTING_WEIGHT
    assert rmu.retain_routing_weight("full", "routers") == 0.0
    assert rmu.retain_routing_weight("full") == 0.0
    # the other algorithms' fallback weight does not depend on the projection
    assert spec().retain_routing_weight("full", "routers") == RETAIN_ROUTING_WEIGHT_FALLBACK
    rmu_full = JobSpec.model_validate(rmu.resolved() | {"scope": "full"})
    assert rmu_full.retain_routing_weight() == 0.0
    named = JobSpec.model_validate(rmu.resolved() | {"seuf": {"retain_routing_weight": 5}})
    assert named.retain_routing_weight() == 5.0


def test_rmu_falls_back_at_its_own_step_size() -> None:
    fell = plan_selection(SPREAD, spec(num_experts="auto"))
    rmu = JobSpec.model_validate(
        spec().resolved()
        | {"algorithm": "rmu", "training": {"lr": 1e-2, "stop": {"forget_accuracy_target": 0.3}}}
    )
    assert training_for(fell, rmu).lr == full_fallback_lr("rmu") == 1e-3
    assert full_fallback_lr("gdiff") == FULL_FALLBACK_LR


def test_a_full_fallback_that_cannot_fit_the_worker_stops_the_job_instead() -> None:
    """The default (auto, fallback full) on a model whose full-parameter training does not
    fit this machine: the planner says so from the loaded model's config and the job stops
    with the numbers, rather than running out of memory after hours."""
    cfg = json.loads((ROOT / "bench" / "configs" / "qwen1.5-moe-a2.7b.json").read_text())
    big = {**cfg, "num_hidden_layers": 2}  # 1.76B parameters: full float32 AdamW > 24 GiB
    job = spec()  # the defaults
    why = full_fallback_refusal(job, big, "cpu", 1)
    assert why is not None and "GiB per worker" in why and "this machine" in why
    with pytest.raises(SelectionRefused, match="fallback full cannot run") as e:
        plan_selection(SPREAD, job, None, lambda: full_fallback_refusal(job, big, "cpu", 1))
    assert e.value.auto.outcome == "stop" and "GiB per worker" in str(e.value)
    # A model whose full training fits: the fallback runs as before.
    tiny = tiny_model("qwen2_moe", seed=0).config.to_dict()
    assert full_fallback_refusal(job, tiny, "cpu", 1) is None
    plan = plan_selection(SPREAD, job, None, lambda: full_fallback_refusal(job, tiny, "cpu", 1))
    assert plan.scope == "full"


def test_attach_projection_only_where_a_router_trains() -> None:
    model = tiny_model("qwen2_moe", seed=0)
    adapter = get_adapter(model)
    retain = [make_batch([8, 6], 8, seed=11)]
    on = spec(router_projection="nullspace", router_projection_energy=1.0)  # exact span
    assert attach_projection(model, adapter, spec(), [(1, 0)], retain) == []
    assert attach_projection(model, adapter, on, [(1, 0)], retain, scope="experts") == []
    assert attach_projection(model, adapter, on, [], retain) == []
    with pytest.raises(ValueError, match="needs a retain corpus"):
        attach_projection(model, adapter, on, [(1, 0)], None)
    routers = attach_projection(model, adapter, on, [(1, 0), (2, 3), (1, 2)], retain)
    assert [r.projector.rank for r in routers] == [14, 14]  # one per trained router layer
    every = attach_projection(model, adapter, on, [], retain, scope="full")  # auto's fallback
    assert [r.projector.rank for r in every] == [14] * len(adapter.moe_layers())
    close_all(every)
    # A change the optimizer would make is projected: retain logits of layer 1 hold.
    router = adapter.moe_layer(1).router
    before = router_outputs(model, adapter, retain[0])[1].logits
    with torch.no_grad():
        router.weight.add_(torch.randn_like(router.weight))
    routers[0].after_step()
    after = router_outputs(model, adapter, retain[0])[1].logits
    mask = retain[0]["attention_mask"].reshape(-1).bool()
    assert (after - before)[mask].abs().max() < 1e-4
    close_all(routers)
    assert all(not r.handles for r in routers)


def test_projection_auto_runs_nullspace_only_where_it_can() -> None:
    """router_projection auto: nullspace with retain data, one worker and a scope that
    trains a router; none otherwise; an explicit choice is kept as given."""
    auto = JobSpec.model_validate(
        {"forget": {"demo": "forget"}, "retain": {"demo": "retain"}, "algorithm": "gdiff",
         "seuf": {"router_projection": "auto"}}
    )  # fmt: skip
    assert projection_mode(auto, "seuf", True, True) == "nullspace"
    assert projection_mode(auto, "router", True, True) == "nullspace"
    # auto's full-parameter fallback trains every router: each is projected
    assert projection_mode(auto, "full", True, True) == "nullspace"
    asked_full = JobSpec.model_validate(auto.resolved() | {"scope": "full"})
    assert projection_mode(asked_full, "full", True, True) == "none"  # the baseline, as asked
    assert projection_mode(auto, "experts", True, True) == "none"
    assert projection_mode(auto, "seuf", False, True) == "none"
    assert projection_mode(auto, "seuf", True, False) == "none"
    off = JobSpec.model_validate(auto.resolved() | {"seuf": {"router_projection": "none"}})
    assert projection_mode(off, "seuf", True, True) == "none"
