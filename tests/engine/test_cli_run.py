"""`moe-unlearn run` and `moe-unlearn patch` as a user runs them: a real process, a spec
file, JSON on stdout; spec errors are one line on stderr and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine._tiny_dir import make_tiny_model_dir
from workers.patch import state_sha256

CLI = [sys.executable, "-c", "from api.cli import main; main()"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MOE_UNLEARN_DEBUG": "0"}
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = make_tiny_model_dir(tmp_path_factory.mktemp("cli"))
    (d / "spec.yaml").write_text(
        "model: model\nalgorithm: npo\nforget: {path: forget.jsonl}\n"
        "retain: {path: retain.jsonl}\ntraining: {max_steps: 4, batch_size: 8, lr: 0.003}\n"
        "seuf: {num_experts: 1}\n"  # a random model: auto would fall back to full
    )
    return d


@pytest.mark.slow
def test_run_json_then_patch_apply_and_revert(tiny):
    spec = tiny / "spec.yaml"
    spec.write_text(spec.read_text().replace("model: model", f"model: {tiny / 'model'}"))
    r = _cli("run", str(spec), "--json", "--output-dir", "out", cwd=tiny)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("selected", "before", "after", "routing_overlap_forget", "trainable_parameters",
                "total_parameters", "steps", "output_dir"):
        assert key in res
    assert res["steps"] == 4 and len(res["selected"]) == 1
    assert "unlearning" in r.stderr  # progress goes to stderr, JSON alone to stdout

    out = Path(res["output_dir"])
    r = _cli("patch", "apply", "--model", str(tiny / "model"), "--patch",
             str(out / "expert_patch.safetensors"), "--out", "patched", cwd=tiny)
    assert r.returncode == 0, r.stderr
    patched = AutoModelForCausalLM.from_pretrained(tiny / "patched").state_dict()
    assert state_sha256(patched) == res["unlearned_model_sha256"]
    r = _cli("patch", "revert", "--model", str(tiny / "patched"), "--patch",
             str(out / "expert_patch.safetensors"), "--out", "restored", cwd=tiny)
    assert r.returncode == 0, r.stderr
    restored = AutoModelForCausalLM.from_pretrained(tiny / "restored").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny / "model").state_dict()
    assert all(torch.equal(restored[k], base[k]) for k in base)
    # Applying to a model that is not the patch's base is refused, with exit code 2.
    r = _cli("patch", "apply", "--model", str(tiny / "patched"), "--patch",
             str(out / "expert_patch.safetensors"), "--out", "twice", cwd=tiny)
    assert r.returncode == 2 and "does not match" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("algorithm: gx\nforget: {path: forget.jsonl}\n", "algorithm"),
        ("algorithm: ga\nforget: {path: missing.jsonl}\n", "not found"),
        ("algorithm: ga\nforget: {path: notjson.jsonl}\n", "line 1"),
        ("algorithm: ga\nforget: {path: empty.jsonl}\n", "empty"),
        ("algorithm: ga\nforget: {path: forget.jsonl}\n"
         "seuf: {selection: manual, experts: [{layer: 0, expert: 99}]}\n", "expert"),
        ("algorithm: ga\nforget: {path: forget.jsonl}\nseuf: {selection: in_layer, layer: 42}\n",
         "layer"),
        ("algorithm: ga\nforget: {path: forget.jsonl}\ntraining: {max_steps: -3}\n", "max_steps"),
    ],
)
def test_spec_errors_are_one_line_and_exit_2(tiny, body, needle):
    (tiny / "notjson.jsonl").write_text('{"text": "a"\n')
    (tiny / "empty.jsonl").write_text("\n")
    spec = tiny / "bad.yaml"
    spec.write_text(f"model: {tiny / 'model'}\n" + body)
    r = _cli("run", str(spec), "--output-dir", "bad-out", cwd=tiny)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("moe-unlearn: error")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_the_table_carries_the_robustness_verdicts() -> None:
    """`moe-unlearn run` prints what the certificate will say: each check's verdict, and
    the reason when it did not pass."""
    from rich.console import Console

    from api.cli_engine import before_after_table

    res = {
        "algorithm": "gdiff", "scope": "seuf", "before": {"forget_accuracy": 1.0},
        "after": {"forget_accuracy": 0.3}, "routing_overlap_forget": 0.5,
        "trainable_parameters": 10, "total_parameters": 1000, "tunable_ratio": 0.01,
        "selected": [{"layer": 0, "expert": 2}], "steps": 9, "stopped_by": "forget_accuracy",
        "robustness": [
            {"check": "router_restore", "verdict": "fail", "reason": "recovery 0.53 > 0.2"},
            {"check": "quantization", "verdict": "pass", "reason": "ignored when passing"},
        ],
    }  # fmt: skip
    console = Console(width=200, record=True)
    console.print(before_after_table(res))
    text = console.export_text()
    assert "robustness: router_restore" in text and "fail (recovery 0.53 > 0.2)" in text
    assert "robustness: quantization" in text and "ignored when passing" not in text
