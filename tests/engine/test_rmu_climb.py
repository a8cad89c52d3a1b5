"""RMU's projected fallback climbs a layer when forgetting stalls (workers/rmu_climb.py):
the climb waits out its patience from the last new low, steers the next block with that
block's retain reference, stops at the last layer, survives a checkpoint, and
`train` hands it every forget check that did not stop training."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_activation_cache import rand_corpus
from tests.engine.test_projected_fallback import spec
from workers.data import BatchStream
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.objectives import make_objective
from workers.reference import prepare_reference, reference_activations
from workers.rmu_climb import RmuClimb, kept_climbs
from workers.scope import apply_scope
from workers.spec import RMU_PATIENCE, JobSpec, ObjectiveOptions, TrainingOptions
from workers.train import train

torch.set_num_threads(1)
N_LAYERS = 3


def _setup(seed: int = 3):
    model = tiny_model("qwen2_moe", seed=seed, num_hidden_layers=N_LAYERS)
    adapter = get_adapter(model)
    forget, retain = rand_corpus(8, seed=1), rand_corpus(8, seed=2)
    objective = make_objective("rmu", ObjectiveOptions(rmu_layer=0), adapter)
    prepare_reference(objective, model, forget, retain, seed=0, batch_size=4)
    return model, adapter, objective, forget, retain


def test_climbs_after_its_patience_from_the_last_low_and_stops_at_the_top() -> None:
    model, adapter, objective, _, retain = _setup()
    seen: list[dict[str, float]] = []
    climb = RmuClimb(objective, model, adapter, retain, 6, 0, batch_size=4, notify=seen.append)
    layers = adapter.decoder_layers()
    norm0 = objective.reference.rmu_block_norm

    climb.observe(3, {"forget_accuracy": 0.5})  # the first low
    climb.observe(6, {"forget_accuracy": 0.6})
    assert climb.layer == 0 and objective.capture is layers[0].mlp  # 3 steps < 6
    climb.observe(9, {"forget_accuracy": 0.5})  # no new low for 6 steps: climb
    assert climb.layer == 1 and objective.capture is layers[1].mlp
    assert seen == climb.climbs == [
        {"step": 9, "from_layer": 0, "to_layer": 1, "forget_accuracy": 0.5,
         "best_forget_accuracy": 0.5}
    ]  # fmt: skip
    # The reference is the new block's, on the retain corpus, from the model as it is.
    want = reference_activations(model, layers[1].mlp, retain, batch_size=4)
    got = objective.reference.retain_activations
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert objective.reference.rmu_block_norm != pytest.approx(norm0)

    climb.observe(12, {"forget_accuracy": 0.45})  # a new low restarts the wait
    climb.observe(15, {"forget_accuracy": 0.45})
    assert climb.layer == 1
    climb.observe(18, {"forget_accuracy": 0.45})
    assert climb.layer == 2  # 6 steps after the low at 12
    climb.observe(99, {"forget_accuracy": 0.9})
    assert climb.layer == 2 == N_LAYERS - 1 and len(climb.climbs) == 2  # the top layer
    climb.observe(120, {})  # a check that measured neither changes nothing
    assert climb.since == 18


def test_without_accuracy_a_new_high_of_the_forget_loss_is_progress() -> None:
    """A real model's job stops on forget_loss: its checks carry no accuracy."""
    model, adapter, objective, _, retain = _setup()
    climb = RmuClimb(objective, model, adapter, retain, 6, 0, batch_size=4)
    climb.observe(3, {"forget_loss": 2.0})
    climb.observe(6, {"forget_loss": 2.5})  # higher: progress
    climb.observe(9, {"forget_loss": 2.4})
    assert climb.layer == 0 and climb.since == 6
    climb.observe(12, {"forget_loss": 2.5})  # not higher than the best: 6 steps since
    assert climb.layer == 1
    assert climb.climbs == [
        {"step": 12, "from_layer": 0, "to_layer": 1, "minus_forget_loss": -2.5,
         "best_minus_forget_loss": -2.5}
    ]  # fmt: skip


def test_the_record_keeps_the_climbs_before_the_state_the_guard_put_back() -> None:
    model, adapter, objective, _, retain = _setup()
    climb = RmuClimb(objective, model, adapter, retain, 3, 0, batch_size=4)
    climb.observe(3, {"forget_accuracy": 0.5})
    climb.observe(6, {"forget_accuracy": 0.5})  # climb to 1
    climb.observe(9, {"forget_accuracy": 0.5})  # climb to 2
    steps = lambda climbs: [c["step"] for c in climbs]  # noqa: E731
    assert steps(kept_climbs(climb, "max_steps", {"restored_step": 9})) == [6]
    assert steps(kept_climbs(climb, "utility_guard", {"restored_step": 7})) == [6]
    assert steps(kept_climbs(climb, "max_steps", {"restored_step": 12})) == [6, 9]
    assert steps(kept_climbs(climb, "max_steps", None)) == [6, 9]  # no guard: nothing put back
    # stopped on the target: the guard puts nothing back
    assert steps(kept_climbs(climb, "forget_accuracy", {"restored_step": 3})) == [6, 9]
    assert kept_climbs(None, "max_steps", None) == []


def test_a_resumed_climb_steers_where_the_checkpoint_did() -> None:
    model, adapter, objective, _, retain = _setup()
    climb = RmuClimb(objective, model, adapter, retain, 3, 0, batch_size=4)
    climb.observe(3, {"forget_accuracy": 0.5})
    climb.observe(6, {"forget_accuracy": 0.5})
    state = climb.state_dict()
    assert state["layer"] == 1

    model2, adapter2, objective2, _, retain2 = _setup()
    again = RmuClimb(objective2, model2, adapter2, retain2, 3, 0, batch_size=4)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert objective2.capture is adapter2.decoder_layers()[1].mlp
    for a, b in zip(
        objective.reference.retain_activations,
        objective2.reference.retain_activations,
        strict=True,
    ):
        assert torch.equal(a, b)


def test_climb_refuses_what_it_cannot_steer() -> None:
    model, adapter, objective, _, retain = _setup()
    with pytest.raises(ValueError, match="patience"):
        RmuClimb(objective, model, adapter, retain, 0, 0)
    ga = make_objective("ga", ObjectiveOptions(), adapter)
    with pytest.raises(ValueError, match="'rmu' only"):
        RmuClimb(ga, model, adapter, retain, 5, 0)
    with pytest.raises(ValueError, match="does not steer layer 1"):
        RmuClimb(objective, model, adapter, retain, 5, 1)
    climb = RmuClimb(objective, model, adapter, retain, 5, 0)
    with pytest.raises(ValueError, match="out of range"):
        climb.load_state_dict({"layer": -1, "best": 1.0, "since": 0, "climbs": []})


def test_train_hands_every_check_to_the_observer_and_checkpoints_its_state() -> None:
    """A forget target never reached: every check before the last step reaches the
    observer, whose climb changes what the loss steers; the final state carries the
    observer's state."""
    model, adapter, objective, forget, retain = _setup()
    scope = apply_scope(model, adapter, "full", [])
    climb = RmuClimb(objective, model, adapter, retain, 4, 0, batch_size=4)
    checks: list[int] = []
    accuracy = iter([0.9, 0.8, 0.8, 0.8, 0.8, 0.8])

    def stop_check(_model: torch.nn.Module) -> dict[str, float]:
        checks.append(1)
        return {"forget_accuracy": next(accuracy)}

    opts = TrainingOptions.model_validate(
        {"lr": 1e-3, "batch_size": 4, "max_steps": 12,
         "stop": {"forget_accuracy_target": 0.0, "eval_every": 2}}
    )  # fmt: skip
    res = train(
        model, adapter, scope, objective, BatchStream(forget, 4, 0), BatchStream(retain, 4, 1),
        opts, stop_check=stop_check, observer=climb,
    )  # fmt: skip
    assert res.steps == 12 and len(checks) == 6
    # Lows at 2 and 4; no new low for 4 steps at 8: climb to 1. At 12 it would climb
    # again, but 12 is the last step: a climb there would steer nothing.
    assert [(c["step"], c["to_layer"]) for c in climb.climbs] == [(8, 1)]
    assert res.state["observer"] == climb.state_dict()
    assert objective.capture is adapter.decoder_layers()[1].mlp


def test_spec_refuses_a_patience_it_would_ignore() -> None:
    assert spec().seuf.fallback_rmu_patience == RMU_PATIENCE
    assert spec(fallback_rmu_patience=0).seuf.fallback_rmu_patience == 0
    with pytest.raises(ValueError, match="fallback_rmu_patience"):
        spec("gdiff", fallback_rmu_patience=50)
    chosen = {
        "forget": {"demo": "forget"},
        "retain": {"demo": "retain"},
        "algorithm": "rmu",
        "objective": {"rmu_layer": 1},  # the job chose its layer: nothing to climb from
        "seuf": {"fallback_rmu_patience": 50},
    }
    with pytest.raises(ValueError, match="fallback_rmu_patience"):
        JobSpec.model_validate(chosen)
    for ignored in (
        {"num_experts": 2},
        {"fallback": "widen"},
        {"fallback_projection": "routers"},
    ):
        with pytest.raises(ValueError, match="fallback_rmu_patience"):
            spec(fallback_rmu_patience=50, **ignored)
    with pytest.raises(ValueError, match="fallback_rmu_patience"):
        spec("rmu", "full", fallback_rmu_patience=50)
    # The default is accepted everywhere (a resolved spec carries it).
    assert spec("gdiff", fallback_rmu_patience=RMU_PATIENCE).seuf.fallback_rmu_patience == 200


def test_spec_refuses_turning_off_a_second_attempt_it_would_not_make() -> None:
    """seuf.rmu_second_attempt (workers/attempt.py): false is refused where no second
    attempt could run (the conditions of the patience); true, the default, everywhere."""
    assert spec().seuf.rmu_second_attempt is True
    assert spec(rmu_second_attempt=False).seuf.rmu_second_attempt is False
    for args, seuf in (
        (("gdiff",), {}),
        (("rmu", "full"), {}),
        ((), {"fallback_projection": "routers"}),
        ((), {"num_experts": 1}),
    ):
        with pytest.raises(ValueError, match="rmu_second_attempt"):
            spec(*args, rmu_second_attempt=False, **seuf)
    assert spec("gdiff").seuf.rmu_second_attempt is True
    with pytest.raises(ValueError, match="rmu_second_attempt"):
        spec(rmu_second_attempt="sometimes")
