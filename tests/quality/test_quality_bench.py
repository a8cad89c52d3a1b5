"""The shipped example specs and the quality bench's spec variants and ratios (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import quality
from workers.spec import ALGORITHMS, JobSpec, load_spec

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
