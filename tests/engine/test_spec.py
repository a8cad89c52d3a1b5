"""The job spec validates at the edge and resolves to one canonical, hashable form."""

import pytest
from pydantic import ValidationError

from workers.spec import JobSpec, load_spec

BASE = {"forget": {"demo": "forget"}, "retain": {"demo": "retain"}}


def test_defaults_resolve_and_hash_is_stable():
    a = JobSpec.model_validate(BASE)
    b = JobSpec.model_validate(a.resolved())
    assert a.resolved() == b.resolved()
    assert a.spec_hash() == b.spec_hash()
    # Issue 13's sweep chose these defaults (README "Worlds nobody tuned it on").
    assert a.resolved()["seuf"]["num_experts"] == "auto"
    assert a.resolved()["seuf"]["fallback"] == "full"
    assert a.resolved()["seuf"]["router_projection"] == "auto"
    assert a.resolved()["seuf"]["anchor_reduction"] == "sum"
    other = JobSpec.model_validate(BASE | {"algorithm": "npo"})
    assert other.spec_hash() != a.spec_hash()


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"algorithm": "gx"}, "algorithm"),
        ({"training": {"max_steps": -1}}, "training.max_steps"),
        ({"training": {"lr": 0}}, "training.lr"),
        ({"scope": "everything"}, "scope"),
        ({"seuf": {"selection": "in_layer"}}, "seuf"),
        ({"seuf": {"selection": "manual"}}, "seuf"),
        ({"seuf": {"anchor_reduction": "max"}}, "seuf.anchor_reduction"),
        ({"forget": {}}, "forget"),
        ({"forget": {"path": "a", "demo": "forget"}}, "forget"),
        ({"forget": {"corpus_id": "xyz"}}, "forget"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"world": {"topics": 3, "forget_topic": 5}}, "world"),
        ({"world": {"retain_topics": 0}}, "world.retain_topics"),
        ({"world": {"topics": 4, "retain_topics": 4}}, "world"),
    ],
)
def test_bad_specs_name_the_field(patch, where):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(BASE | patch)
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert any(loc.startswith(where) for loc in locs), locs


def test_gdiff_needs_retain_and_demo_corpora_need_demo_model():
    with pytest.raises(ValidationError, match="needs a retain corpus"):
        JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "gdiff"})
    with pytest.raises(ValidationError, match="only be used with model 'demo'"):
        JobSpec.model_validate(BASE | {"model": "/models/qwen"})
    ok = JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga"})
    assert ok.retain is None


def test_retain_topics_is_bounded_and_needs_the_demo_retain_corpus():
    ok = JobSpec.model_validate(BASE | {"world": {"topics": 4, "retain_topics": 3}})
    assert ok.world.retain_topics == 3
    assert JobSpec.model_validate(BASE).resolved()["world"]["retain_topics"] is None
    with pytest.raises(ValidationError, match="retain_topics 4 out of range: the world has 3"):
        JobSpec.model_validate(BASE | {"world": {"topics": 4, "retain_topics": 4}})
    # it narrows the demo retain corpus only: with other retain data it would be ignored
    for retain in ({"path": "r.jsonl"}, {"demo": "untrained"}):
        with pytest.raises(ValidationError, match="retain_topics needs retain: {demo: retain}"):
            JobSpec.model_validate(BASE | {"retain": retain, "world": {"retain_topics": 2}})
    with pytest.raises(ValidationError, match="retain_topics needs retain"):
        JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga",
                                "world": {"retain_topics": 2}})


def test_topic_router_margin_needs_the_demo_world():
    ok = JobSpec.model_validate(BASE | {"world": {"topic_router_margin": 24}})
    assert ok.world.topic_router_margin == 24
    real = {"model": "/models/qwen", "forget": {"path": "f.jsonl"}, "algorithm": "ga"}
    with pytest.raises(ValidationError, match="topic_router_margin needs the demo world"):
        JobSpec.model_validate(real | {"world": {"topic_router_margin": 24}})
    JobSpec.model_validate(real)  # the world block unset: nothing to refuse


def test_revision_is_bounded_and_only_for_hub_models():
    hub = {"model": "org/m", "forget": {"path": "f"}, "algorithm": "ga"}
    for ok in ("main", "v1.0", "refs/pr/1", "a" * 40):
        assert JobSpec.model_validate(hub | {"revision": ok}).revision == ok
    for bad in ("../x", "a/../b", "/x", "x/", "a//b", "-x", "x" * 129, "a b", "m\x00"):
        with pytest.raises(ValidationError, match="revision"):
            JobSpec.model_validate(hub | {"revision": bad})
    with pytest.raises(ValidationError, match="demo has no revisions"):
        JobSpec.model_validate(BASE | {"revision": "main"})
    with pytest.raises(ValidationError, match="job:<id> has no revisions"):
        JobSpec.model_validate(hub | {"model": "job:1", "revision": "main"})
    assert JobSpec.model_validate(hub).output.model == "full"
    with pytest.raises(ValidationError, match="output.model"):
        JobSpec.model_validate(hub | {"output": {"model": "half"}})


def test_load_spec_resolves_relative_paths(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"text": "a"}\n')
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("model: /m\nalgorithm: ga\nforget:\n  path: f.jsonl\n")
    spec = load_spec(spec_file)
    assert spec.forget.path == str(tmp_path / "f.jsonl")
    with pytest.raises(ValueError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    spec_file.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_spec(spec_file)


def test_world_arch_is_one_of_the_adapted_families():
    from typing import get_args

    from workers.moe.tiny import FAMILIES
    from workers.spec import WorldArch, WorldOptions

    assert set(get_args(WorldArch)) == set(FAMILIES)
    with pytest.raises(ValueError, match="arch"):
        WorldOptions(arch="llama")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"algorithm": "ga", "retain": None}, "needs a retain corpus"),
        ({"scope": "full"}, "use scope seuf or router"),
        ({"distributed": {"num_workers": 2}}, "one worker"),
        ({"distributed": {"backend": "deepspeed", "zero_stage": 3}}, "ZeRO-3"),
    ],
)
def test_nullspace_projection_is_refused_where_it_cannot_run(extra, reason):
    body = {"forget": {"demo": "forget"}, "retain": {"demo": "retain"},
            "seuf": {"router_projection": "nullspace"}, **extra}
    if body.get("retain") is None:
        body.pop("retain")
    with pytest.raises(ValueError, match=reason):
        JobSpec.model_validate(body)


GUARD = {"utility_drop_tolerance": 0.05, "forget_accuracy_target": 0.3}


@pytest.mark.parametrize(
    ("training", "extra", "reason"),
    [
        ({"lr_policy": "decay"}, {}, "'decay' needs a forget target"),
        ({"stop": {"utility_drop_tolerance": 0.05}}, {}, "tolerance needs a forget target"),
        ({"stop": {"utility_drop_tolerance": 0.0, "forget_loss_target": 9}}, {}, "greater than"),
        ({"stop": {"utility_drop_tolerance": 1.5, "forget_loss_target": 9}}, {}, "less than"),
        ({"lr_policy": "probe"}, {}, "lr_policy"),
        ({"stop": GUARD}, {"distributed": {"backend": "deepspeed"}}, "use backend ddp"),
        ({"stop": {**GUARD, "forget_accuracy_target": None, "forget_loss_target": 9}},
         {"model": "/m", "forget": {"path": "f.jsonl"}, "retain": None}, "retain corpus"),
    ],
)  # fmt: skip
def test_guard_and_decay_are_refused_where_they_cannot_act(training, extra, reason):
    body = {**BASE, "algorithm": "ga", "training": training, **extra}
    if body.get("retain") is None:
        body.pop("retain")
    with pytest.raises(ValueError, match=reason):
        JobSpec.model_validate(body)
    # the demo world's retain questions are enough: no retain corpus needed there
    ok = JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga",
                                 "training": {"lr_policy": "decay", "stop": GUARD}})  # fmt: skip
    assert ok.training.stop.utility_drop_tolerance == 0.05


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"algorithm": "gdiff", "objective": {"rmu_positions": "answer"}}, "'rmu' only"),
        ({"algorithm": "npo", "objective": {"rmu_coeff_relative": True}}, "'rmu' only"),
        ({"algorithm": "ga", "objective": {"rmu_directions": "per_sample"}}, "'rmu' only"),
        ({"algorithm": "rmu", "scope": "full", "objective": {"rmu_layer_offset": 1}}, "target"),
        ({"algorithm": "rmu", "objective": {"rmu_layer_offset": 1, "rmu_layer": 2}}, "target"),
    ],
)
def test_rmu_seuf_settings_are_refused_where_they_would_be_ignored(extra, reason):
    with pytest.raises(ValidationError, match=reason):
        JobSpec.model_validate(BASE | extra)


def test_rmu_seuf_settings_accepted_with_seuf():
    o = JobSpec.model_validate(
        BASE
        | {
            "algorithm": "rmu",
            "objective": {
                "rmu_layer_offset": 1,
                "rmu_positions": "answer",
                "rmu_coeff_relative": True,
            },
        }
    ).objective
    assert (o.rmu_layer_offset, o.rmu_positions, o.rmu_coeff_relative) == (1, "answer", True)
