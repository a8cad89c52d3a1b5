"""Issue 13's options in a real job on the small demo world: the router projection, the
per-layer retain overlap in the result, and auto selection falling back to full."""

from __future__ import annotations

import pytest

from tests.small_world import example_on_small_world
from workers.run import run_job
from workers.spec import JobSpec

pytestmark = pytest.mark.slow


def _spec(**seuf: object) -> JobSpec:
    d = example_on_small_world("demo-gdiff-seuf.yaml")
    d["seuf"].update({"num_experts": 1, **seuf})  # one expert: what these tests inspect
    d["evaluation"] = {"backend": "direct"}
    return JobSpec.model_validate(d)


def test_nullspace_job_reports_per_layer_retain_overlap(small_world, tmp_path) -> None:
    res = run_job(_spec(router_projection="nullspace"), tmp_path / "ns").to_json()
    proj = res["selection"]["router_projection"]
    assert len(proj) == 1 and 0 < proj[0]["rank"] < proj[0]["dim"]
    per = res["routing_overlap_retain_per_layer"]
    assert per is not None and set(per) == {str(x) for x in range(len(per))}
    target = res["selected"][0]["layer"]
    assert all(per[k] == 1.0 for k in per if int(k) < target)  # frozen below: unmoved
    assert res["routing_overlap_retain"] == pytest.approx(sum(per.values()) / len(per))
    assert res["after"]["forget_accuracy"] < res["before"]["forget_accuracy"]


def test_auto_without_a_small_expert_set_falls_back_to_full(small_world, tmp_path) -> None:
    spec = _spec(num_experts="auto", auto_min_ratio=1e6, fallback="full")
    res = run_job(spec, tmp_path / "auto").to_json()
    sel = res["selection"]
    assert sel["scope"] == "full" and res["scope"] == "full" and res["selected"] == []
    assert "fallback full: unlearning all parameters" in sel["selection_warning"]
    assert res["tunable_ratio"] == 1.0
    with pytest.raises(ValueError, match="fallback stop"):
        run_job(_spec(num_experts="auto", auto_min_ratio=1e6, fallback="stop"), tmp_path / "s")
