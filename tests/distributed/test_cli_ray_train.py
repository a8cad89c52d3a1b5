"""`moe-unlearn run` with two workers: a real process that starts its own private local Ray,
runs the job on Ray Train (DDP, 2 CPU workers) and leaves no checkpoint behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.engine._tiny_dir import make_tiny_model_dir

pytestmark = pytest.mark.slow


def test_run_with_two_workers_uses_ray_train(tmp_path: Path) -> None:
    d = make_tiny_model_dir(tmp_path)
    (d / "spec.yaml").write_text(
        f"model: {d / 'model'}\nalgorithm: gdiff\nforget: {{path: forget.jsonl}}\n"
        "retain: {path: retain.jsonl}\ntraining: {max_steps: 4, batch_size: 8, lr: 0.003}\n"
        "distributed: {num_workers: 2, checkpoint_every: 2}\n"
        "seuf: {num_experts: 1}\n"  # a random model: auto would fall back to full
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    r = subprocess.run(
        [sys.executable, "-c", "from api.cli import main; main()",
         "run", "spec.yaml", "--json", "--output-dir", "out"],
        cwd=d, env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["distributed"]["num_workers"] == 2 and res["steps"] == 4
    assert res["after"]["forget_nll"] > res["before"]["forget_nll"]
    out = d / "out"
    assert not (out / "checkpoints").exists()
    (layer, expert) = (res["selected"][0]["layer"], res["selected"][0]["expert"])
    base = AutoModelForCausalLM.from_pretrained(d / "model").state_dict()
    new = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    changed = sorted(k for k in base if not base[k].equal(new[k]))
    prefix = f"model.layers.{layer}.mlp."
    assert changed == [prefix + "experts.down_proj", prefix + "experts.gate_up_proj",
                       prefix + "gate.weight"]  # fmt: skip
    name = prefix + "experts.down_proj"
    others = [e for e in range(base[name].shape[0]) if e != expert]
    assert base[name][others].equal(new[name][others])
