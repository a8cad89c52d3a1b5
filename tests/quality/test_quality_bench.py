"""The shipped example specs and the quality bench's spec variants and ratios (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import quality
from workers.spec import JobSpec, load_spec
from workers.spec_types import ALGORITHMS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("scope", ["seuf", "full"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_example_is_a_valid_spec_with_the_shared_stop_rule(algorithm: str, scope: str) -> None:
    path = EXAMPLES / f"demo-{algorithm}-{scope}.yaml"
    text = path.read_text()
    assert f"moe-unlearn run examples/demo-{algorithm}-{scope}.yaml" in text  # header command
    spec = load_spec(path)
    assert (spec.algorithm, spec.scope, spec.model) == (algorithm, scope, "demo")
    assert spec.training.stop.forget_accuracy_target == 0.30
    assert spec.training.max_steps >= 50  # a real budget, not a stub
    assert spec.evaluation.backend == "lm-eval"


def test_api_example_equals_the_yaml_example() -> None:
    body = json.loads((EXAMPLES / "demo-gdiff-seuf-api.json").read_text())
    from_yaml = yaml.safe_load((EXAMPLES / "demo-gdiff-seuf.yaml").read_text())
    assert body == from_yaml
    assert (
        JobSpec.model_validate(body).resolved()
        == load_spec(EXAMPLES / "demo-gdiff-seuf.yaml").resolved()
    )


@pytest.mark.parametrize(
    ("variant", "field", "value"),
    [
        ("seuf_no_anchor", "anchor_weight", 0.0),
        ("random", "selection", "random"),
        ("top3", "num_experts", 3),
        ("affinity", "attribution", "affinity"),
    ],
)
def test_variant_changes_only_its_field(variant: str, field: str, value: object) -> None:
    base = JobSpec.model_validate(quality.variant_spec("gdiff", "seuf", 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("gdiff", variant, 1)).resolved()
    assert var["seuf"][field] == value
    assert base["world"]["seed"] == var["world"]["seed"] == 1
    assert var["evaluation"]["backend"] == "direct"
    assert var["evaluation"]["robustness"] == []  # the quality bench turns the checks off
    diff = {k for k in base if base[k] != var[k]}
    assert diff == {"seuf"}


def test_unknown_variant_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        quality.variant_spec("gdiff", "nope", 0)


def _run(seed: int, forget: float, u_before: float, u_after: float) -> dict:
    return {
        "algorithm": "gdiff",
        "variant": "seuf",
        "seed": seed,
        "selected": [{"layer": 1, "expert": 2, "score": 0.5}],
        "before": {
            "forget_accuracy": 1.0,
            "utility_accuracy": 1.0,
            "utility_accuracy_unseen": u_before,
        },
        "after": {
            "forget_accuracy": forget,
            "utility_accuracy": 0.9,
            "utility_accuracy_unseen": u_after,
        },
        "routing_overlap_forget": 0.8,
        "tunable_ratio": 0.025,
        "steps": 21,
        "stopped_by": "forget_accuracy",
        "wall_s": 10.0,
    }


def test_ratios_and_targets() -> None:
    runs = {"a": _run(0, 0.28, 0.8, 0.76), "b": _run(1, 0.28, 0.8, 0.76), "c": _run(1, 0.4, 1, 1)}
    r = quality.ratios(runs)
    assert r["a"]["utility_kept_unseen"] == pytest.approx(0.95)
    assert r["a"]["utility_kept_retain_pool"] == pytest.approx(0.9)
    assert r["a"]["meets_goal_95"] and r["a"]["meets_seed_target"]
    assert r["b"]["seed_target_kept"] == 0.90 and r["b"]["meets_seed_target"]
    assert not r["c"]["meets_seed_target"]
    assert r["c"]["forget_gap_to_target"] == pytest.approx(0.10)
    md = quality.markdown(runs, r)
    assert "| a | 1.00 -> 0.28 | 0.800 -> 0.760 (0.950) |" in md
    assert "1:2" in md


# --- the sweep (issue 13) ----------------------------------------------------------------


def test_sweep_draws_its_own_varied_worlds() -> None:
    worlds = quality.draw_worlds()
    assert worlds == quality.draw_worlds()  # fixed by the draw seed
    assert len(worlds) == 6
    assert sorted({w["arch"] for w in worlds}) == ["mixtral", "olmoe", "qwen2_moe"]
    for w in worlds:
        assert quality.SWEEP_SEEDS[0] <= w["seed"] < quality.SWEEP_SEEDS[1]
        assert 6 <= w["topics"] <= 12 and 0 <= w["forget_topic"] < w["topics"]
        spec = JobSpec.model_validate(
            quality.variant_spec(
                "gdiff", "seuf", 0, world={k: v for k, v in w.items() if k != "key"}
            )
        )
        assert (spec.world.arch, spec.world.seed) == (w["arch"], w["seed"])
        assert spec.world.facts_per_topic == quality.SWEEP_FACTS
    assert len({w["forget_topic"] for w in worlds}) == 6  # forget topic varied
    assert len({w["seed"] for w in worlds}) == 6
    assert quality.draw_worlds(draw=14) != worlds


def test_sweep_shards_pick_by_index_or_key() -> None:
    worlds = quality.draw_worlds()
    assert quality.pick_worlds(worlds, None) == worlds
    assert quality.pick_worlds(worlds, ["3", worlds[0]["key"]]) == [worlds[3], worlds[0]]
    with pytest.raises(ValueError, match="unknown world 'x'"):
        quality.pick_worlds(worlds, ["x"])
    with pytest.raises(ValueError, match="unknown world '6'"):
        quality.pick_worlds(worlds, ["6"])
    plan = quality.sweep_plan(worlds[:2], ["gdiff", "npo"], ["full", "seuf"])
    assert len(plan) == 8 and plan[0][0] == f"sweep/{worlds[0]['key']}/gdiff/full"


@pytest.mark.parametrize(
    ("variant", "check"),
    [
        ("experts", lambda d: d["scope"] == "experts"),
        ("nullspace", lambda d: d["seuf"]["router_projection"] == "nullspace"),
        ("auto", lambda d: d["seuf"]["num_experts"] == "auto"),
        ("lr1e3", lambda d: d["training"]["lr"] == 1e-3),
        ("rr10", lambda d: d["seuf"]["retain_routing_weight"] == 10.0),
        ("rr10_noproj", lambda d: d["seuf"]["router_projection"] == "none"),
        ("flr3e4", lambda d: d["seuf"]["fallback_lr"] == 3e-4),
        ("flr1e3_rr0", lambda d: d["seuf"]["retain_routing_weight"] == 0.0),
        (
            "one_rr1000",
            lambda d: (d["seuf"]["num_experts"], d["seuf"]["retain_routing_weight"]) == (1, 1e3),
        ),
        ("decay", lambda d: d["training"]["lr_policy"] == "decay"),
        ("fp_all", lambda d: d["seuf"]["fallback_projection"] == "all"),
        ("fp_routers", lambda d: d["seuf"]["fallback_projection"] == "routers"),
        (
            "flr1e4_rr1000",
            lambda d: (d["seuf"]["fallback_lr"], d["seuf"]["retain_routing_weight"]) == (1e-4, 1e3),
        ),
        (
            "guard",
            lambda d: d["training"]["stop"]["utility_drop_tolerance"] == quality.GUARD_TOLERANCE,
        ),
    ],
)
def test_sweep_variants_change_only_their_field(variant: str, check) -> None:
    base = JobSpec.model_validate(quality.variant_spec("npo", "seuf", 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("npo", variant, 1)).resolved()
    assert check(var)
    assert {k for k in base if base[k] != var[k]} <= {"seuf", "scope", "training"}
    assert sum(base[k] != var[k] for k in base) == 1


def test_climb_variants_set_rmus_patience_only() -> None:
    base = JobSpec.model_validate(quality.variant_spec("rmu", "defaults", 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("rmu", "climb_p30", 1)).resolved()
    assert var["seuf"]["fallback_rmu_patience"] == 30
    changed = {k for k, v in base["seuf"].items() if var["seuf"][k] != v}
    assert changed == {"fallback_rmu_patience"}
    assert {k for k in base if base[k] != var[k]} == {"seuf"}
    with pytest.raises(ValueError, match="RMU settings"):
        quality.variant_spec("npo", "climb_p30", 1)


@pytest.mark.parametrize("policy", ["decay", "guard"])
def test_policy_variants_at_ten_times_the_fallback_step(policy: str) -> None:
    base = JobSpec.model_validate(quality.variant_spec("gdiff", policy, 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("gdiff", f"flr1e3_{policy}", 1)).resolved()
    assert var["seuf"]["fallback_lr"] == 1e-3 and base["seuf"]["fallback_lr"] == "auto"
    assert var["training"] == base["training"]


def test_small_size_worlds_are_keyed_apart() -> None:
    world = quality.draw_worlds()[0]
    small = quality.with_size(world, "small")
    assert small["key"] == f"small-{world['key']}" and small["size"] == "small"
    assert quality.with_size(world, "full") is world
    block = {k: v for k, v in small.items() if k != "key"}
    spec = JobSpec.model_validate(quality.variant_spec("gdiff", "defaults", 0, world=block))
    assert spec.world.size == "small" and spec.world.seed == world["seed"]


def test_per_sample_variants_pin_one_expert_and_steer_per_sample() -> None:
    base = JobSpec.model_validate(quality.variant_spec("rmu", "seuf", 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("rmu", "per_sample", 1)).resolved()
    assert var["objective"]["rmu_directions"] == "per_sample"
    assert var["seuf"]["num_experts"] == 1  # the example as it shipped when these ran
    assert {k for k in base if base[k] != var[k]} == {"objective", "seuf"}
    rr = JobSpec.model_validate(quality.variant_spec("rmu", "per_sample_rr1000", 1)).resolved()
    assert rr["seuf"]["retain_routing_weight"] == 1000.0
    assert rr["objective"] == var["objective"]


def test_rmu_layer_variants_steer_layer_k_under_the_fallback() -> None:
    base = JobSpec.model_validate(quality.variant_spec("rmu", "flr3e4_rr1000", 1)).resolved()
    var = JobSpec.model_validate(quality.variant_spec("rmu", "flr3e4_rr1000_l1", 1)).resolved()
    assert (var["objective"]["rmu_layer"], var["objective"]["rmu_layer_offset"]) == (1, 0)
    assert var["seuf"] == base["seuf"] and var["seuf"]["fallback_lr"] == 3e-4


@pytest.mark.parametrize("variant", ["per_sample", "flr1e4_rr1000_l1"])
def test_rmu_only_variants_refuse_other_algorithms(variant: str) -> None:
    with pytest.raises(ValueError, match="algorithm rmu only"):
        quality.variant_spec("gdiff", variant, 1)


def test_margin_worlds_are_keyed_apart_and_summarised_as_their_own_kind() -> None:
    world = quality.draw_worlds()[0]
    m24 = quality.with_retain_topics(quality.with_margin(world, 24), "half")
    assert m24["key"].startswith(f"m24-{world['key']}-r") and m24["topic_router_margin"] == 24
    assert quality.with_margin(world, None) is world
    block = {k: v for k, v in m24.items() if k != "key"}
    spec = JobSpec.model_validate(quality.variant_spec("gdiff", "defaults", 0, world=block))
    assert spec.world.topic_router_margin == 24
    assert quality.world_set(m24["key"]) == "@m24+retain_topics"
    assert quality.world_set(f"small-m8-{world['key']}") == "@small+m8"
    assert quality.world_set(world["key"]) == ""  # mixtral-s..: an "m" inside is no margin


def test_fixed_topic_count_keeps_the_forget_topic_in_range() -> None:
    for world in quality.draw_worlds():
        six = quality.with_topics(world, 6)
        assert six["topics"] == 6 and six["forget_topic"] == world["forget_topic"] % 6
        assert six["key"] == f"{world['arch']}-s{world['seed']}-t6-f{six['forget_topic']}"
        block = {k: v for k, v in six.items() if k != "key"}
        JobSpec.model_validate(quality.variant_spec("gdiff", "defaults", 0, world=block))
    assert quality.with_topics(world, None) is world


def test_defaults_variant_is_the_example_untouched() -> None:
    base = JobSpec.model_validate(quality.variant_spec("npo", "seuf", 1)).resolved()
    assert JobSpec.model_validate(quality.variant_spec("npo", "defaults", 1)).resolved() == base


def _sweep_run(alg: str, variant: str, forget: float, kept: float, overlap: float) -> dict:
    r = _run(1000, forget, 1.0, kept)
    r.update(algorithm=alg, variant=variant, routing_overlap_retain=overlap)
    r["routing_overlap_retain_per_layer"] = {"0": 1.0, "1": overlap, "2": overlap - 0.02}
    r["selected"] = [{"layer": 1, "expert": 0, "score": 0.3}]
    return r


def test_sweep_summary_min_mean_and_acceptance(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    runs = {}
    for i, (fk, sk, ov) in enumerate([(0.99, 0.97, 0.97), (0.98, 0.99, 0.99), (0.95, 0.90, 0.90)]):
        runs[f"sweep/w{i}/gdiff/full"] = _sweep_run("gdiff", "full", 0.29, fk, 0.85)
        runs[f"sweep/w{i}/gdiff/seuf"] = _sweep_run("gdiff", "seuf", 0.28, sk, ov)
    # Shards written at different times merge by key; other runs are kept.
    quality.merge_save({"gdiff/seuf/seed0": _run(0, 0.28, 0.8, 0.78)})
    quality.merge_save(dict(list(runs.items())[:3]))
    stored = quality.merge_save(dict(list(runs.items())[3:]))
    assert set(stored) == set(runs) | {"gdiff/seuf/seed0"}
    data = json.loads((tmp_path / "quality.json").read_text())
    assert "ratios" in data and set(data["ratios"]) == set(stored)
    seuf = data["sweep"]["gdiff/seuf"]
    assert seuf["n_worlds"] == 3 and seuf["worlds_meeting"] == 2
    assert seuf["kept_unseen_min"] == pytest.approx(0.90)
    assert seuf["kept_unseen_mean"] == pytest.approx((0.97 + 0.99 + 0.90) / 3)
    # Overlap from the target layer (1) up: mean of layers 1 and 2, never the free layer 0.
    assert seuf["worlds"]["w0"]["retain_overlap"] == pytest.approx(0.96)
    assert seuf["worlds_meeting_with_overlap"] == 2  # w0 0.96, w1 0.98; w2 kept too little
    assert seuf["kept_minus_full"]["w0"] == pytest.approx(-0.02)
    assert seuf["at_least_full_every_world"] is False
    assert "gdiff/seuf | 3 | 2 | 0.900 / 0.953" in (tmp_path / "quality.md").read_text()


def test_sweep_compares_with_full_only_on_the_same_build(tmp_path, monkeypatch) -> None:
    """A world builds to other weights on another CPU: SEUF against full is compared only
    where both ran on one build (runs without a recorded build count as the same)."""
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    runs = {}
    for world, full_sha, seuf_sha in (("w0", "a" * 64, "a" * 64), ("w1", "b" * 64, "c" * 64),
                                      ("w2", None, "d" * 64)):
        full = _sweep_run("gdiff", "full", 0.29, 0.99, 0.85)
        seuf = _sweep_run("gdiff", "seuf", 0.28, 0.90, 0.97)
        full["base_model_sha256"], seuf["base_model_sha256"] = full_sha, seuf_sha
        runs[f"sweep/{world}/gdiff/full"], runs[f"sweep/{world}/gdiff/seuf"] = full, seuf
    quality.merge_save(runs)
    s = json.loads((tmp_path / "quality.json").read_text())["sweep"]["gdiff/seuf"]
    assert s["worlds"]["w1"]["build"] == "c" * 12 and s["worlds"]["w2"]["build"] == "d" * 12
    assert s["full_on_another_build"] == ["w1"]
    assert set(s["kept_minus_full"]) == {"w0", "w2"}
    assert s["kept_minus_full"]["w0"] == pytest.approx(-0.09)


def test_retain_topics_worlds_and_the_uncovered_comparison(tmp_path, monkeypatch) -> None:
    world = quality.draw_worlds()[0]
    half = quality.with_retain_topics(world, "half")
    assert half["retain_topics"] == world["topics"] // 2
    assert half["key"] == f"{world['key']}-r{world['topics'] // 2}"
    assert quality.with_retain_topics(world, None) is world
    block = {k: v for k, v in half.items() if k != "key"}  # what the sweep passes
    spec = JobSpec.model_validate(quality.variant_spec("gdiff", "seuf", 0, world=block))
    assert spec.world.retain_topics == world["topics"] // 2  # the spec's own spelling
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    runs = {}
    for variant, kept_unc, ov in (("full", 0.90, 0.85), ("seuf", 0.95, 0.97)):
        r = _sweep_run("gdiff", variant, 0.28, 0.99, ov)
        r["before"]["utility_accuracy_uncovered_topics"] = 1.0
        r["after"]["utility_accuracy_uncovered_topics"] = kept_unc
        r["routing_overlap_retain_from_target"] = ov + 0.01  # the engine's figure wins
        runs[f"sweep/w0-r3/gdiff/{variant}"] = r
    quality.merge_save(runs)
    s = json.loads((tmp_path / "quality.json").read_text())["sweep"]
    cell = s["gdiff/seuf@retain_topics"]  # its own kind of world: apart from the drawn ones
    assert cell["kept_uncovered_minus_full"]["w0-r3"] == pytest.approx(0.05)
    assert cell["worlds"]["w0-r3"]["retain_overlap"] == pytest.approx(0.98)
    assert "gdiff/seuf" not in s


def test_summary_cells_hold_one_kind_of_world(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    runs = {}
    for world in ("w0", "w0-r3", "small-w0", "small-w0-r3"):
        for variant, kept in (("full", 0.99), ("seuf", 0.90)):
            runs[f"sweep/{world}/gdiff/{variant}"] = _sweep_run("gdiff", variant, 0.28, kept, 0.97)
    runs["sweep/small-w0/gdiff/seuf"]["after"]["utility_accuracy_unseen"] = 1.0
    quality.merge_save(runs)
    s = json.loads((tmp_path / "quality.json").read_text())["sweep"]
    suffixes = ("", "@retain_topics", "@small", "@small+retain_topics")
    assert sorted(s) == sorted(f"gdiff/{v}{x}" for v in ("full", "seuf") for x in suffixes)
    assert all(e["n_worlds"] == 1 for e in s.values())
    # Each kind is compared with the full run of its own kind.
    assert s["gdiff/seuf@small"]["kept_minus_full"] == {"small-w0": pytest.approx(0.01)}
    assert s["gdiff/seuf"]["kept_minus_full"] == {"w0": pytest.approx(-0.09)}
