"""The dispatcher's pure helpers, and its failure classes on real Ray exceptions."""

from __future__ import annotations

import math

import pytest

from service.audit import check_payload
from service.failures import classify
from service.recording import (
    expert_scores,
    flatten_scores,
    param_changes,
    safe_payload,
    stored_kind,
)
from workers.progress import JobEvent


def test_flatten_scores_splits_names_and_nests_tasks():
    got = flatten_scores(
        {
            "forget_nll": 2.5,
            "retain_nll": 1.25,
            "utility_accuracy_unseen": 0.5,
            "backend": "lm-eval",  # not a number: dropped
            "forget_topic": 0,
            "steps": 3,
            "ok": True,  # bools are not scores
            "bad": float("nan"),  # cannot be stored
            "tasks": {"mmlu": 0.3, "wmdp": {"acc": 0.25, "acc_norm": 0.5}},
            "per_topic": {"animals": {"accuracy": 0.75}},
        }
    )
    assert got == {
        "forget": {"nll": 2.5, "topic": 0.0},
        "retain": {"nll": 1.25},
        "utility": {"accuracy_unseen": 0.5},
        "summary": {"steps": 3.0},
        "mmlu": {"score": 0.3},
        "wmdp": {"acc": 0.25, "acc_norm": 0.5},
        "per_topic": {"animals.accuracy": 0.75},
    }


def test_expert_scores_rank_by_the_engines_ranking_and_mark_selection():
    emap = {
        "layers": [1, 2],
        "scores": [[0.1, 0.4], [0.3, float("-inf")]],
        "ranking": [
            {"layer": 1, "expert": 1, "score": 0.4},
            {"layer": 2, "expert": 0, "score": 0.3},
            {"layer": 1, "expert": 0, "score": 0.1},
            {"layer": 2, "expert": 1, "score": float("-inf")},
        ],
    }
    rows = expert_scores(emap, [{"layer": 2, "expert": 0, "score": 0.3}])
    got = {(r.layer, r.expert): (r.rank, r.selected, r.score) for r in rows}
    # The -inf score cannot be stored; the others keep the engine's ranks.
    assert got == {(1, 1): (1, False, 0.4), (2, 0): (2, True, 0.3), (1, 0): (3, False, 0.1)}
    # Without a ranking: score descending, then layer, then expert.
    rows = expert_scores({"layers": [0], "scores": [[0.2, 0.5, 0.2]]}, [])
    assert [(r.expert, r.rank) for r in rows] == [(0, 2), (1, 1), (2, 3)]


def test_param_changes_from_patch_regions():
    got = param_changes(
        [
            {
                "name": "m.layers.1.mlp.experts.gate_up_proj",
                "expert": 3,
                "shape": [32, 16],
                "sha256_before": "a",
                "sha256_after": "b",
            },
            {
                "name": "m.layers.1.mlp.gate.weight",
                "expert": None,
                "shape": [8, 32],
                "sha256_before": "c",
                "sha256_after": "d",
            },
        ]
    )
    assert [(c.name.split(".")[-1], c.slice, c.numel) for c in got] == [
        ("gate_up_proj", "[3]", 512),
        ("weight", "", 256),
    ]


def test_safe_payload_passes_the_audit_checks():
    raw = {
        "loss": float("nan"),
        "parts": {"forget": math.inf, "anchor": 0.5},
        "text": "never stored",
        "note": "x" * 2000,
        "selected": [{"layer": 1, "expert": 2}],
        "obj": object(),
    }
    safe = safe_payload(raw)
    check_payload(safe)  # raises UnsafePayload otherwise
    assert safe["loss"] is None and safe["parts"] == {"forget": None, "anchor": 0.5}
    assert "text" not in safe and len(safe["note"]) == 512 and safe["obj"] is None


def _raise(kind: str) -> None:
    if kind == "value":
        raise ValueError("forget: the corpus is empty")
    if kind == "memory":
        raise MemoryError("no room")
    raise RuntimeError("engine bug")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "fclass"),
    [("value", "user_input"), ("memory", "out_of_memory"), ("runtime", "internal")],
)
def test_classify_real_ray_task_errors(ray_cluster, kind, fclass):
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_raise)
    with pytest.raises(Exception) as info:
        ray.get(task.remote(kind))
    got = classify(info.value)
    assert (got.status, got.failure_class) == ("failed", fclass)
    assert len(got.message) <= 2000
    if kind == "value":
        assert got.message == "forget: the corpus is empty"


def _class(err: BaseException) -> str | None:
    out = classify(err)
    return out.failure_class or out.status


def test_classify_by_type_through_every_wrapper():
    import ray.exceptions as rex
    import torch
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    # Ray's own failures.
    assert _class(rex.WorkerCrashedError()) == "infrastructure"
    assert _class(rex.OutOfMemoryError("node low on memory")) == "out_of_memory"
    assert _class(rex.TaskCancelledError()) == "cancelled"  # a force-stop
    assert _class(ConnectionError("gcs down")) == "infrastructure"
    # The engine's, raised in the attempt's own process.
    assert _class(ValueError("bad spec")) == "user_input"
    assert _class(torch.OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert _class(KeyError("x")) == "internal"
    # Through a Ray Train run: a rank's ValueError / OOM keeps its class; anything else a
    # rank saw (a peer died, gloo lost its connection) is the run failing: infrastructure.
    assert _class(WorkerGroupError("w", {1: ValueError("no token")})) == "user_input"
    assert classify(WorkerGroupError("w", {1: ValueError("no token")})).message == "no token"
    assert _class(WorkerGroupError("w", {0: MemoryError()})) == "out_of_memory"
    peer_gone = WorkerGroupError("w", {0: RuntimeError("gloo: peer gone")})
    assert _class(peer_gone) == "infrastructure"
    assert _class(ControllerError(rex.ActorDiedError())) == "infrastructure"
    # `raise ... from`: the cause counts.
    try:
        try:
            raise ValueError("empty corpus")
        except ValueError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert _class(e) == "user_input"


def test_per_rank_events_are_stored_under_their_rank():
    # Events are unique per (attempt, step, kind): two ranks' rank_stopped at one step
    # would otherwise keep only the first.
    kinds = [stored_kind(JobEvent("rank_stopped", 7, {"rank": r, "step": 7})) for r in (0, 1)]
    assert kinds == ["rank_stopped[0]", "rank_stopped[1]"]
    assert stored_kind(JobEvent("step", 7, {"rank": 1, "loss": 0.5})) == "step"
    assert stored_kind(JobEvent("rank_started", 0, {"rank": True})) == "rank_started"
