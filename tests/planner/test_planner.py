"""The memory planner: each part follows its formula, the scope/dtype/ZeRO choices move the
parts they should, capacity comes from the Ray node list, and `moe-unlearn plan` exits 0 / 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from workers.model_shape import shape_from_config
from workers.planner import (
    Capacity,
    GiB,
    estimate,
    ray_capacity,
    robustness_extra,
    trainable_params,
)
from workers.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]
QWEN = json.loads((ROOT / "bench" / "configs" / "qwen1.5-moe-a2.7b.json").read_text())
QWEN2 = {**QWEN, "num_hidden_layers": 2}  # the real-shape bench's model


def spec(**over):
    data = {"model": "m", "forget": {"path": "f"}, "retain": {"path": "r"}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return JobSpec.model_validate(data)


def test_weights_and_trainable_state_follow_their_formulas():
    shape = shape_from_config(QWEN2)
    p = estimate(shape, spec(training__dtype="bfloat16", seuf__num_experts=1))
    t = shape.expert_params + shape.router_params
    assert p.trainable_params == t
    assert p.parts["weights"] == shape.total_params * 2
    # float32 master + float32 gradient + two AdamW moments
    assert p.parts["trainable_state"] == t * (4 + 4 + 8)
    full32 = estimate(shape, spec(scope="full", training__dtype="float32"))
    assert full32.parts["weights"] == shape.total_params * 4
    assert full32.parts["trainable_state"] == shape.total_params * (4 + 8)  # no master copy


def test_zero_stages_shard_what_they_say():
    shape = shape_from_config(QWEN2)
    base = dict(scope="full", training__dtype="bfloat16", distributed__num_workers=4)
    ddp = estimate(shape, spec(**base))
    z1 = estimate(shape, spec(**base, distributed__backend="deepspeed", distributed__zero_stage=1))
    z2 = estimate(shape, spec(**base, distributed__backend="deepspeed", distributed__zero_stage=2))
    z3 = estimate(shape, spec(**base, distributed__backend="deepspeed", distributed__zero_stage=3))
    z3p = estimate(shape, spec(**base, distributed__backend="deepspeed", distributed__zero_stage=3,
                               output__model="patch"))  # fmt: skip
    n = shape.total_params
    assert ddp.parts["trainable_state"] == n * (4 + 4 + 8 + 4)  # + DDP's gradient buckets
    assert z1.parts["trainable_state"] == n * (4 + 4) + n * 8 // 4
    assert z2.parts["trainable_state"] == n * 4 // 4 + n * 4 // 4 + n * 8 // 4
    # Loaded sharded; with output.model full rank 0 gathers the trained model whole at the
    # end (one copy), with patch nothing is gathered: a shard and one layer at a time.
    assert z3p.parts["weights"] == n * 2 // 4 + shape.largest_layer_params * 2
    assert z3.parts["weights"] == n * 2
    assert ddp.per_worker_bytes > z1.per_worker_bytes > z2.per_worker_bytes
    assert z2.per_worker_bytes >= z3.per_worker_bytes
    # Rank 0 keeps the regions before training (scope full: every weight), and with patch
    # output after it too: for full parameters that outweighs the gather it saves...
    assert z3.parts["region_snapshots"] == n * 2 and z3p.parts["region_snapshots"] == 2 * n * 2
    assert z3p.per_worker_bytes > z3.per_worker_bytes
    # ...for SEUF it does not.
    seuf = {**base, "scope": "seuf", "seuf__num_experts": 1}
    s3 = estimate(shape, spec(**seuf, distributed__backend="deepspeed", distributed__zero_stage=3))
    s3p = estimate(shape, spec(**seuf, distributed__backend="deepspeed", distributed__zero_stage=3,
                               output__model="patch"))  # fmt: skip
    assert s3p.per_worker_bytes < s3.per_worker_bytes


def test_seuf_in_bfloat16_fits_24_gib_where_full_float32_does_not():
    """The issue's acceptance: the real-shape Qwen1.5-MoE job on a 24 GiB machine."""
    shape = shape_from_config(QWEN2)
    cap = Capacity(24 * GiB, "cpu", "a 24 GiB machine")
    full = estimate(shape, spec(scope="full", training__dtype="float32"), cap)
    seuf = estimate(shape, spec(training__dtype="bfloat16"), cap)
    assert not full.fits and seuf.fits
    line = full.line()
    assert "GiB per worker" in line and "24.0 GiB" in line and "bfloat16" in line
    # The default (num_experts auto, fallback full) is planned at its parameter budget; its
    # full-parameter fallback does not fit here, and the line says the job would stop.
    assert seuf.trainable_params == int(0.1 * shape.total_params)
    assert seuf.full_fallback is not None and not seuf.full_fallback.fits
    assert "the job stops instead" in seuf.line()
    one = estimate(shape, spec(training__dtype="bfloat16", seuf__num_experts=1), cap)
    assert one.fits and one.full_fallback is None and "stops" not in one.line()


def test_auto_device_and_dtype_follow_the_capacity():
    shape = shape_from_config(QWEN2)
    gpu = Capacity(80 * GiB, "cuda", "cluster", gpus=8)
    cpu = Capacity(24 * GiB, "cpu", "machine")
    assert (estimate(shape, spec(), gpu).device, estimate(shape, spec(), gpu).dtype) == (
        "cuda",
        "bfloat16",
    )
    assert (estimate(shape, spec(), cpu).device, estimate(shape, spec(), cpu).dtype) == (
        "cpu",
        "float32",
    )


def test_scopes_count_what_trains():
    shape = shape_from_config(QWEN2)
    e, r = shape.expert_params, shape.router_params
    assert trainable_params(shape, spec(scope="experts", seuf__num_experts=3)) == 3 * e
    assert trainable_params(shape, spec(scope="router", seuf__num_experts=1)) == r
    assert trainable_params(shape, spec(seuf__num_experts=3)) == 3 * e + 2 * r  # 2 MoE layers
    assert trainable_params(shape, spec(seuf__selection="per_layer")) == 2 * e + 2 * r


def test_ray_capacity_from_the_node_list():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "memory": 64 * GiB}},
        {"Alive": True, "Resources": {"CPU": 4.0, "memory": 32 * GiB, "GPU": 2.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "memory": 512 * GiB}},
    ]
    cpu = ray_capacity(nodes, "cpu", workers=4, gpu_memory_bytes=None)
    assert cpu.per_worker_bytes == 16 * GiB and cpu.cpus == 12 and cpu.gpus == 2
    gpu = ray_capacity(nodes, "auto", workers=2, gpu_memory_bytes=80 * GiB)
    assert gpu.device == "cuda" and gpu.per_worker_bytes == 80 * GiB
    unknown = ray_capacity(nodes, "cuda", workers=2, gpu_memory_bytes=None)
    assert unknown.per_worker_bytes == 0 and "MOE_UNLEARN_GPU_MEMORY_GIB" in unknown.source
    none = ray_capacity(nodes[:1], "cuda", workers=1, gpu_memory_bytes=80 * GiB)
    assert none.per_worker_bytes == 0 and "no GPU" in none.source


def _plan(tmp_path, body):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(QWEN2))
    (tmp_path / "f.txt").write_text("a fact\n")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"model: {tmp_path / 'm'}\nforget: {{path: f.txt}}\nretain: {{path: f.txt}}\n" + body
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(spec_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_plan_command_exit_codes(tmp_path):
    """On this machine (24 GiB): the full float32 job is refused with one line of numbers,
    the SEUF bfloat16 job is accepted."""
    refused = _plan(tmp_path, "scope: full\ntraining: {dtype: float32}\n")
    assert refused.returncode == 2, refused.stderr
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and "GiB per worker" in err[0] and "this machine" in err[0]
    ok = _plan(tmp_path, "training: {dtype: bfloat16}\n")
    assert ok.returncode == 0, ok.stderr
    assert "fits" in ok.stdout


def test_plan_command_refuses_an_unsupported_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "f.txt").write_text("x\n")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"model: {tmp_path / 'm'}\nforget: {{path: f.txt}}\nalgorithm: ga\n")
    r = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(spec_file)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "not a supported MoE family" in r.stderr


def test_auto_selection_and_the_robustness_check_are_planned():
    """num_experts auto plans for its budget, and its full fallback on its own (every
    parameter); the quantisation check's float32 temporaries count when it runs, on top of
    its evaluation forward (the weights it quantises are spilled to disk, never copied)."""
    shape = shape_from_config(QWEN2)
    auto = spec(seuf__num_experts="auto")  # fallback: full
    assert trainable_params(shape, auto) == int(0.1 * shape.total_params)
    fb = estimate(shape, auto).full_fallback
    assert fb is not None and fb.trainable_params == shape.total_params
    budget = spec(seuf__num_experts="auto", seuf__fallback="stop", seuf__parameter_budget=0.05)
    assert trainable_params(shape, budget) == int(0.05 * shape.total_params)
    assert estimate(shape, budget).full_fallback is None
    on = estimate(shape, spec(training__dtype="bfloat16"))
    off = estimate(shape, spec(training__dtype="bfloat16", evaluation__robustness=[]))
    on_spec = spec(training__dtype="bfloat16")
    copy = robustness_extra(on_spec)
    assert copy == 64 * 2**20
    assert robustness_extra(spec(evaluation__robustness=[])) == 0
    grown = on.parts["activations"] - off.parts["activations"]
    assert 0 <= grown <= copy and on.per_worker_bytes - off.per_worker_bytes == grown
