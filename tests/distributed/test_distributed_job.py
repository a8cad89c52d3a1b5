"""Jobs on real Ray Train workers (2 CPU workers, gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3,
and a worker SIGKILLed from outside while it writes a checkpoint, which the next attempt
resumes from the last complete one. Compared against the single-process `run_job` on the
same tiny model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine._tiny_dir import make_tiny_model_dir
from workers.faults import CHECKPOINT_SEAM_ENV
from workers.run import JobCancelled, run_job
from workers.runners.ray_train import WorkerFailure, run_job_distributed
from workers.spec import JobSpec

pytestmark = pytest.mark.slow

# The DeepSpeed CPU op compiled once per machine (20-50 s); later runs reuse it.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/moe-unlearn/torch_extensions")
)
STEPS = 6
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_session(ray_cluster):
    # The session's shared local Ray (tests/conftest.py): ray.init runs once per process.
    yield
    print("\nmeasured seconds:", {k: round(v, 1) for k, v in TIMES.items()})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _spec(d: Path, **dist: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": str(d / "model"),
            "algorithm": "gdiff",
            "forget": {"path": str(d / "forget.jsonl")},
            "retain": {"path": str(d / "retain.jsonl")},
            "training": {"max_steps": STEPS, "batch_size": 8, "lr": 3e-3},
            # One expert (a random model: auto would fall back to full), no projection (the
            # one-process run would project, Ray Train ranks cannot yet: not the same job).
            "seuf": {"num_experts": 1, "router_projection": "none"},
            "distributed": {"num_workers": 2, **dist},
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.items: list[tuple[str, Any, int]] = []
        self.payloads: dict[str, list[dict]] = {}

    def stage(self, name: str) -> None:
        self.items.append(("stage", name, 0))

    def event(self, kind: str, step: int, payload: dict) -> None:
        self.items.append(("event", kind, step))
        self.payloads.setdefault(kind, []).append(payload)


def _run(tag: str, spec: JobSpec, out: Path, run_name: str, rec: Recorder | None = None) -> dict:
    t0 = time.perf_counter()
    res = run_job_distributed(spec, out, rec, None, out.parent / "ckpt", run_name=run_name)
    TIMES[tag] = time.perf_counter() - t0
    return res


def _state(out: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(out / "model").state_dict()


def _assert_only_selected_changed(base: dict, new: dict, layer: int, expert: int) -> None:
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


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("single") / "out"
    t0 = time.perf_counter()
    res = run_job(_spec(model_dir), out)
    TIMES["single-process run_job"] = time.perf_counter() - t0
    return res, out


@pytest.fixture(scope="module")
def ddp(ray_session, model_dir, tmp_path_factory) -> tuple[dict, Path, Recorder]:
    out = tmp_path_factory.mktemp("ddp") / "out"
    rec = Recorder()
    return _run("ddp", _spec(model_dir), out, "job-ddp", rec), out, rec


def test_ddp_job_matches_single_process_attribution_and_changes_only_the_slice(
    ddp, single, model_dir
):
    res, out, rec = ddp
    ref, ref_out = single
    assert res.steps == STEPS and res.stopped_by == "max_steps"
    info = res.distributed
    assert (info.num_workers, info.backend, info.zero_stage) == (2, "ddp", None)
    assert info.resumed_from_step == 0
    # DDP: every rank holds the whole model (+ the trainable copies of the slices).
    slice_elements = res.trainable_parameters - 8 * 32  # minus the router [8, 32]
    assert info.rank0_param_elements == res.total_parameters + slice_elements
    # Sharded attribution (2 ranks, all_reduce of the sums) == single-process attribution.
    emap = json.loads((out / "expert_map.json").read_text())
    emap_ref = json.loads((ref_out / "expert_map.json").read_text())
    assert emap["method"] == emap_ref["method"] == "contrastive"
    for key in ("tokens", "sequences", "retain_tokens", "layers"):
        assert emap[key] == emap_ref[key], key
    # Selection counts are exact; gate masses agree to float32 round-off (the workers run
    # one intra-op thread, this process several: float32 matmuls differ in the last bits).
    torch.testing.assert_close(
        torch.tensor(emap["forget_frequency"], dtype=torch.float64),
        torch.tensor(emap_ref["forget_frequency"], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    for key in ("scores", "forget_mass", "retain_mass"):
        torch.testing.assert_close(
            torch.tensor(emap[key], dtype=torch.float64),
            torch.tensor(emap_ref[key], dtype=torch.float64),
            rtol=0,
            atol=1e-7,
            msg=key,
        )
    assert res.selected == ref.selected and len(res.selected) == 1
    (sel,) = res.selected
    base = AutoModelForCausalLM.from_pretrained(model_dir / "model").state_dict()
    _assert_only_selected_changed(base, _state(out), sel["layer"], sel["expert"])
    assert res.after["forget_nll"] > res.before["forget_nll"]
    # rank 0 evaluated the same model the same way (float32 round-off: thread counts differ)
    assert res.before == pytest.approx(ref.before, rel=1e-6)
    assert res.trainable_parameters == ref.trainable_parameters
    # rank 0 ran the robustness stage on the trained model, as the one process did
    assert [c["check"] for c in res.robustness] == [c["check"] for c in ref.robustness]
    assert len(res.robustness) == 4
    # Progress reached the reporter through the sink actor, in order.
    stages = [n for k, n, _ in rec.items if k == "stage"]
    assert stages == [
        "loading",
        "evaluating_before",
        "attribution",
        "unlearning",
        "evaluating_after",
        "robustness",
        "packaging",
    ]
    assert [s for k, n, s in rec.items if k == "event" and n == "step"] == list(range(1, STEPS + 1))
    # Every rank announced itself (its rank and the PID a test may SIGKILL).
    started = rec.payloads["rank_started"]
    assert sorted(p["rank"] for p in started) == [0, 1]
    assert len({p["pid"] for p in started}) == 2 and os.getpid() not in {p["pid"] for p in started}


def test_one_process_and_two_ray_train_workers_train_the_same_weights(ddp, single):
    """The one pipeline on both runners: the same selected expert, the same final weights.
    Tolerance: every record of the tiny corpus has the same number of tokens and loss
    positions, so the mean of the two ranks' 4-row losses (what DDP's gradient all-reduce
    averages) is mathematically the 8-row loss of one process; what remains is float32
    summation order (two half batches + an all-reduce vs one batch; one intra-op thread on
    the workers, several here), as in the ZeRO-vs-DDP comparison."""
    res, out, _ = ddp
    ref, ref_out = single
    assert res.selected == ref.selected and len(ref.selected) == 1
    assert (res.steps, res.stopped_by) == (ref.steps, ref.stopped_by) == (STEPS, "max_steps")
    new, want = _state(out), _state(ref_out)
    assert new.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(new[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert res.after["forget_nll"] == pytest.approx(ref.after["forget_nll"], rel=1e-4)
    assert [(c["name"], c["expert"]) for c in res.changed] == [
        (c["name"], c["expert"]) for c in ref.changed
    ]


@pytest.fixture(scope="module")
def zero3(ray_session, model_dir, tmp_path_factory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("zero3") / "out"
    spec = _spec(model_dir, backend="deepspeed", zero_stage=3)
    return _run("deepspeed zero3", spec, out, "job-zero3"), out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(stage, ddp, model_dir, tmp_path, request):
    res_ddp, out_ddp, _ = ddp
    if stage == 3:
        res, out = request.getfixturevalue("zero3")
    else:
        out = tmp_path / "out"
        spec = _spec(model_dir, backend="deepspeed", zero_stage=stage)
        res = _run(f"deepspeed zero{stage}", spec, out, f"job-zero{stage}")
    assert res.distributed.zero_stage == stage
    held = res.distributed.rank0_param_elements
    if stage == 3:  # really sharded: rank 0 held about half of the (unwired) model
        assert held < 0.6 * res.total_parameters
    else:
        assert held >= res.total_parameters
    assert res.selected == res_ddp.selected
    (sel,) = res.selected
    base = AutoModelForCausalLM.from_pretrained(model_dir / "model").state_dict()
    new = _state(out)
    _assert_only_selected_changed(base, new, sel["layer"], sel["expert"])
    # Same data split, same optimizer: the same weights up to float reduction order.
    ref = _state(out_ddp)
    for name in new:
        torch.testing.assert_close(new[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    assert res.after["forget_nll"] == pytest.approx(res_ddp.after["forget_nll"], rel=1e-4)
    assert [(c["name"], c["expert"]) for c in res.changed] == [
        (c["name"], c["expert"]) for c in res_ddp.changed
    ]


def test_zero3_ranks_hold_only_their_partition_and_train_the_one_process_weights(
    zero3, single, model_dir
):
    """ZeRO-3: the model loads sharded (each rank holds its partition of every parameter,
    ceil(numel / 2) elements of each, from the load on: never the whole model before
    training); while training each rank holds exactly its partition of every parameter
    (the wired slices included), and rank 0, having
    gathered the trained model parameter by parameter into one plain model, evaluates and
    writes the weights the one process trains (the tolerance of the DDP comparison)."""
    res, out = zero3
    ref, ref_out = single
    info = res.distributed
    base = AutoModelForCausalLM.from_pretrained(model_dir / "model")
    (sel,) = res.selected
    prefix = f"model.layers.{sel['layer']}.mlp.experts."
    slices = [getattr(base.get_submodule(prefix[:-1]), n)[sel["expert"]] for n in
              ("gate_up_proj", "down_proj")]  # fmt: skip
    held = [-(-p.numel() // 2) for p in [*base.parameters(), *slices]]
    loaded = sum(-(-p.numel() // 2) for p in base.parameters())
    assert info.sharded_load and info.load_param_elements_per_rank == [loaded, loaded]
    assert loaded < 0.51 * sum(p.numel() for p in base.parameters())
    assert info.param_elements_per_rank == [sum(held), sum(held)]
    assert info.rank0_param_elements == sum(held)
    whole = res.total_parameters + sum(p.numel() for p in slices)
    assert whole / 2 <= sum(held) < 0.51 * whole  # half of it, to the padding
    assert res.selected == ref.selected and (res.steps, ref.steps) == (STEPS, STEPS)
    new, want = _state(out), _state(ref_out)
    assert new.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(new[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # rank 0 evaluated the gathered model: the one process's scores before and after
    assert res.before == pytest.approx(ref.before, rel=1e-6)
    assert res.after["forget_nll"] == pytest.approx(ref.after["forget_nll"], rel=1e-4)
    assert [c["check"] for c in res.robustness] == [c["check"] for c in ref.robustness]
    assert json.loads((out / "result.json").read_text())["distributed"][
        "param_elements_per_rank"
    ] == [sum(held), sum(held)]


def test_zero3_patch_output_is_never_gathered_on_one_rank(zero3, model_dir, tmp_path):
    """ZeRO-3 with output.model patch: the ranks evaluate and read the trained regions in
    lockstep, so no rank ever holds the whole model after training either (the robustness
    checks, which need a whole copy, say why they did not run). The output is the same
    job's: the patch applied to the base reloads (its recorded patched SHA-256 checked
    against the patched weights) to the weights, scores and changed regions of the
    gathered ZeRO-3 run."""
    from workers.job import open_model

    res_whole, out_whole = zero3
    spec = _spec(model_dir, backend="deepspeed", zero_stage=3)
    spec = JobSpec.model_validate(spec.resolved() | {"output": {"model": "patch"}})
    out = tmp_path / "out"
    res = _run("deepspeed zero3 patch", spec, out, "job-zero3-patch")
    assert not (out / "model").exists() and (out / "expert_patch.safetensors").is_file()
    assert res.distributed.sharded_load
    assert res.base_model_sha256 == res_whole.base_model_sha256
    patched, _, _ = open_model(str(out))  # raises unless base + patch hash as recorded
    want = _state(out_whole)
    got = patched.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [(c["name"], c["expert"]) for c in res.changed] == [
        (c["name"], c["expert"]) for c in res_whole.changed
    ]
    assert res.before == pytest.approx(res_whole.before, rel=1e-6)
    assert res.after["forget_nll"] == pytest.approx(res_whole.after["forget_nll"], rel=1e-4)
    assert res.routing_overlap_retain == pytest.approx(res_whole.routing_overlap_retain, abs=0.02)
    checks = [c["check"] for c in res.robustness]
    assert checks == [c["check"] for c in res_whole.robustness] and checks
    assert all(c["verdict"] == "not_run" and "partitioned" in c["reason"]
               for c in res.robustness)  # fmt: skip


def test_zero3_on_the_demo_world_scores_before_as_one_process(ray_session, small_world, tmp_path):
    """The demo world under ZeRO-3, loaded sharded: its zero-width shared expert (kept as a
    buffer) and lm-eval's question scoring, run on every rank in lockstep on the sharded
    model (lm-eval answers only where LOCAL_RANK is 0: workers.evaluate asks as rank 0).
    The scores before unlearning are the one process's evaluation of the same model."""
    from tests.small_world import SMALL_WORLD
    from workers.job import evaluate, load_job, scalars

    spec = JobSpec.model_validate(
        {
            "model": "demo",
            "world": SMALL_WORLD.model_dump(),
            "forget": {"demo": "forget"},
            "retain": {"demo": "retain"},
            "algorithm": "gdiff",
            "seuf": {"num_experts": 1, "router_projection": "none"},
            "training": {"max_steps": 2, "batch_size": 16},
            "evaluation": {"backend": "lm-eval", "robustness": []},
            "distributed": {"num_workers": 2, "backend": "deepspeed", "zero_stage": 3},
        }
    )
    res = _run("deepspeed zero3 demo world", spec, tmp_path / "out", "job-zero3-demo")
    assert res.distributed.sharded_load and res.steps == 2
    loaded = res.distributed.load_param_elements_per_rank
    assert len(loaded) == 2 and max(loaded) < 0.51 * res.total_parameters
    job = load_job(spec)  # one process, the whole model
    assert job.retain_records is not None
    want = evaluate(job, *job.training_corpora())
    assert set(res.before) == set(want) and res.before["per_topic"] == want["per_topic"]
    assert scalars(res.before) == pytest.approx(scalars(want), rel=1e-6)


def _kill_when_announced(seam: Path, rank: int, step: int, done: threading.Event) -> list[dict]:
    """Watch the checkpoint seam's file; SIGKILL `rank`'s process (from outside, as the
    kernel's OOM killer or a lost node would) once it announces the checkpoint of `step`."""
    killed: list[dict] = []

    def watch() -> None:
        while not done.is_set():
            lines = seam.read_text().splitlines() if seam.exists() else []
            hits = [a for a in map(json.loads, lines) if (a["rank"], a["step"]) == (rank, step)]
            if hits:
                os.kill(hits[0]["pid"], signal.SIGKILL)
                killed.append(hits[0])
                return
            done.wait(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_rank_killed_while_writing_a_checkpoint_resumes_from_the_last_one(
    ddp, model_dir, tmp_path, monkeypatch
):
    res_ddp, out_ddp, _ = ddp
    spec = _spec(model_dir, checkpoint_every=2)  # checkpoints after steps 2 and 4
    seam = tmp_path / "checkpoints-being-written.jsonl"
    # Every rank holds 10 s inside the seam: the kill lands while step 4's checkpoint is
    # being written, long before it could be reported.
    monkeypatch.setenv(CHECKPOINT_SEAM_ENV, f"{seam},10")
    done = threading.Event()
    killed = _kill_when_announced(seam, 1, 4, done)
    t0 = time.perf_counter()
    try:
        with pytest.raises(WorkerFailure):  # rank 1's process was SIGKILLed from outside
            run_job_distributed(
                spec, tmp_path / "a1", None, None, tmp_path / "ckpt", run_name="job-f"
            )
    finally:
        done.set()
    TIMES["failing attempt"] = time.perf_counter() - t0
    monkeypatch.delenv(CHECKPOINT_SEAM_ENV)
    assert [(k["rank"], k["step"]) for k in killed] == [(1, 4)]
    assert not (tmp_path / "a1" / "result.json").exists()
    # The seam announced both checkpoints from each rank's own process.
    announced = [json.loads(line) for line in seam.read_text().splitlines()]
    assert sorted((a["rank"], a["step"]) for a in announced) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert len({a["pid"] for a in announced}) == 2 and os.getpid() not in {
        a["pid"] for a in announced
    }
    # The dispatcher's next attempt: same run name and storage -> resumes from step 2 (the
    # checkpoint of step 4 was never completed).
    rec = Recorder()
    res = _run("resumed attempt", spec, tmp_path / "a2", "job-f", rec)
    assert res.distributed.resumed_from_step == 2
    assert ("event", "resumed", 2) in rec.items
    assert [s for k, n, s in rec.items if k == "event" and n == "step"] == [3, 4, 5, 6]
    assert res.steps == STEPS and res.selected == res_ddp.selected
    new, ref = _state(tmp_path / "a2"), _state(out_ddp)
    for name in new:
        torch.testing.assert_close(new[name], ref[name], rtol=0, atol=1e-6, msg=name)
    assert res.after["forget_nll"] == pytest.approx(res_ddp.after["forget_nll"], rel=1e-6)


def test_cancel_stops_every_rank_and_frees_the_cpus(ray_session, model_dir, tmp_path):
    import ray

    spec = JobSpec.model_validate(
        _spec(model_dir).resolved() | {"training": {"max_steps": 500, "batch_size": 8}}
    )
    rec = Recorder()
    asked: list[float] = []

    def should_stop() -> bool:  # the dispatcher's cancel request, after the first step
        if any(k == "event" and n == "step" for k, n, _ in rec.items):
            asked.append(time.perf_counter())
            return True
        return False

    t0 = time.perf_counter()
    with pytest.raises(JobCancelled) as e:
        run_job_distributed(spec, tmp_path / "out", rec, should_stop, tmp_path / "ckpt",
                            run_name="job-cancel")  # fmt: skip
    TIMES["cancelled run"] = time.perf_counter() - t0
    TIMES["cancel -> JobCancelled"] = time.perf_counter() - asked[0]
    assert 1 <= e.value.step < 500
    steps = [s for k, n, s in rec.items if k == "event" and n == "step"]
    assert steps == list(range(1, e.value.step + 1))
    # Every rank reports where it stopped, and all stopped after the same step.
    stopped = rec.payloads["rank_stopped"]
    assert sorted(p["rank"] for p in stopped) == [0, 1]
    assert {p["step"] for p in stopped} == {e.value.step}
    assert not (tmp_path / "out" / "result.json").exists()
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_user_error_on_the_workers_comes_back_as_value_error(ray_session, model_dir, tmp_path):
    # Raised inside the Ray Train workers; the dispatcher classifies ValueError as user input.
    spec = _spec(model_dir, num_workers=2)
    bad = JobSpec.model_validate(spec.resolved() | {"model": str(model_dir / "nope")})
    with pytest.raises(ValueError, match="could not be loaded"):
        run_job_distributed(bad, tmp_path / "out", None, None, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="num_workers=3 needs 3 CPUs"):
        run_job_distributed(_spec(model_dir, num_workers=3), tmp_path / "o", None, None, tmp_path)


def test_ddp_with_the_activation_cache_skips_the_frozen_layers(ray_session, model_dir, tmp_path):
    # A target in layer 2: each rank caches the hidden states entering layer 2 once and
    # every training forward (forget + retain) runs layer 2 and up only.
    spec = JobSpec.model_validate(
        _spec(model_dir).resolved()
        | {"seuf": {"selection": "manual", "experts": [{"layer": 2, "expert": 3}]}}
    )
    res = _run("ddp, activation cache", spec, tmp_path / "out", "job-cache")
    assert res.activation_cache["layer"] == 2
    assert res.activation_cache["hits"] == 2 * STEPS
    assert res.activation_cache["misses"] == 0
    base = AutoModelForCausalLM.from_pretrained(model_dir / "model").state_dict()
    _assert_only_selected_changed(base, _state(tmp_path / "out"), 2, 3)
    assert res.after["forget_nll"] > res.before["forget_nll"]
