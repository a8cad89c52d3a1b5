"""A whole job in library mode on a tiny model directory: evaluate, attribute, unlearn,
evaluate, package. Only the selected slices and the target router change, and the patch
written beside the model turns the base model into the unlearned one, bit-exactly."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine._tiny_dir import make_tiny_model_dir, tiny_dir_spec
from workers.patch import apply_patch, state_sha256
from workers.run import JobCancelled, run_job
from workers.spec import JobSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _spec(d: Path, **over) -> JobSpec:
    return tiny_dir_spec(d, 8, **over)


def test_seuf_job_changes_only_the_selected_expert_and_router(model_dir, tmp_path):
    events: list[tuple[str, int]] = []

    class Rec:
        def stage(self, name: str) -> None:
            events.append(("stage:" + name, 0))

        def event(self, kind: str, step: int, payload: dict) -> None:
            events.append((kind, step))

    res = run_job(_spec(model_dir), tmp_path / "out", reporter=Rec())
    (sel,) = res.selected
    assert res.steps == 8 and res.stopped_by == "max_steps"
    assert [k for k, _ in events if k.startswith("stage:")] == [
        "stage:loading",
        "stage:evaluating_before",
        "stage:attribution",
        "stage:unlearning",
        "stage:evaluating_after",
        "stage:robustness",
        "stage:packaging",
    ]
    assert [s for k, s in events if k == "step"] == list(range(1, 9))
    # Gradient ascent on the forget data with a retain term: the forget NLL rises.
    assert res.after["forget_nll"] > res.before["forget_nll"]
    assert 0.0 < res.routing_overlap_forget <= 1.0
    # The robustness stage ran all four default checks; with no holdout corpus the
    # membership check says why it did not run.
    verdicts = {c["check"]: c["verdict"] for c in res.robustness}
    assert list(verdicts) == ["router_restored", "relearning", "quantization",
                              "membership_inference"]
    assert set(verdicts.values()) <= {"pass", "fail", "not_run"}
    assert verdicts["membership_inference"] == "not_run"

    base = AutoModelForCausalLM.from_pretrained(model_dir / "model").state_dict()
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").state_dict()
    layer, expert = sel["layer"], sel["expert"]
    prefix = f"model.layers.{layer}.mlp."
    for name, t in base.items():
        if name in (prefix + "experts.gate_up_proj", prefix + "experts.down_proj"):
            others = [e for e in range(t.shape[0]) if e != expert]
            assert torch.equal(t[others], new[name][others]), name
            assert not torch.equal(t[expert], new[name][expert]), name
        elif name == prefix + "gate.weight":
            assert not torch.equal(t, new[name])
        else:
            assert torch.equal(t, new[name]), f"{name} changed"
    assert (
        res.trainable_parameters
        == sum(
            base[prefix + n][expert].numel() for n in ("experts.gate_up_proj", "experts.down_proj")
        )
        + base[prefix + "gate.weight"].numel()
    )

    # The patch turns the base model into the unlearned one.
    state = {k: v.clone() for k, v in base.items()}
    apply_patch(state, tmp_path / "out" / "expert_patch.safetensors")
    assert state_sha256(state) == state_sha256(new) == res.unlearned_model_sha256
    assert state_sha256(base) == res.base_model_sha256
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["selected"] == res.selected
    assert json.loads((tmp_path / "out" / "expert_map.json").read_text())["method"] == "contrastive"


def test_full_scope_trains_everything_and_cancel_stops(model_dir, tmp_path):
    res = run_job(_spec(model_dir, scope="full", algorithm="ga"), tmp_path / "full")
    assert res.selected == [] and res.tunable_ratio == 1.0
    steps: list[int] = []

    class Steps:  # should_stop is also read at stage boundaries: count training steps
        def stage(self, name: str) -> None:
            pass

        def event(self, kind: str, step: int, payload: dict) -> None:
            if kind == "step":
                steps.append(step)

    with pytest.raises(JobCancelled) as e:
        run_job(_spec(model_dir), tmp_path / "c", Steps(), should_stop=lambda: len(steps) >= 3)
    assert e.value.step == 3
    assert not (tmp_path / "c" / "result.json").exists()


def test_user_errors_are_value_errors(model_dir, tmp_path):
    (model_dir / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="forget"):
        run_job(_spec(model_dir, forget={"path": str(model_dir / "empty.jsonl")}), tmp_path / "e")
    bad = {"selection": "manual", "experts": [{"layer": 0, "expert": 99}]}
    with pytest.raises(ValueError, match="expert"):
        run_job(_spec(model_dir, seuf=bad), tmp_path / "e2")
    with pytest.raises(ValueError, match="could not be loaded"):
        run_job(_spec(model_dir, model=str(model_dir / "nope")), tmp_path / "e3")


def test_activation_cache_gives_the_same_job(model_dir, tmp_path):
    """The cached path (layers below the target skipped) trains the same weights."""
    manual = {"selection": "manual", "experts": [{"layer": 2, "expert": 3}]}
    results = {}
    for on in (True, False):
        spec = _spec(
            model_dir,
            seuf=manual,
            training={"max_steps": 6, "batch_size": 8, "lr": 3e-3, "activation_cache": on},
        )
        results[on] = run_job(spec, tmp_path / f"cache-{on}")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "cache-True" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cache-False" / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert results[True].selected == results[False].selected
    cache = results[True].activation_cache
    assert cache["layer"] == 2 and cache["hits"] >= 6 and cache["misses"] == 0
    assert results[False].activation_cache is None
    assert results[True].after["forget_nll"] == pytest.approx(
        results[False].after["forget_nll"], rel=1e-4
    )
