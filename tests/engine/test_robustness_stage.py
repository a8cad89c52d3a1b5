"""The robustness stage of the one pipeline (workers/robustness_stage.py) on a tiny model
directory: a job names a never-trained holdout corpus and membership inference runs on it;
a holdout that cannot be read is `not_run` with the reason (the job still succeeds); the
checks are turned off with `evaluation.robustness: []`; the relearning attack's two halves
share no record; a spec file's relative holdout path resolves against the spec's folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from tests.engine._tiny_dir import WORDS, make_tiny_model_dir
from workers.job import load_job
from workers.robustness_stage import forget_batches
from workers.run import run_job
from workers.spec import JobSpec, load_spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    rng = random.Random(1)  # the forget distribution, never trained on
    with open(d / "holdout.jsonl", "w") as f:
        for _ in range(40):
            rec = {"prompt": " ".join(rng.sample(WORDS[:60], 5)), "answer": " " + rng.choice(WORDS)}
            f.write(json.dumps(rec) + "\n")
    return d


def _spec(d: Path, **evaluation) -> JobSpec:
    return JobSpec.model_validate({
        "model": str(d / "model"), "algorithm": "gdiff",
        "forget": {"path": str(d / "forget.jsonl")}, "retain": {"path": str(d / "retain.jsonl")},
        "objective": {"loss_tokens": "answer"}, "seuf": {"num_experts": 1},
        "training": {"max_steps": 4, "batch_size": 8, "lr": 3e-3},
        "evaluation": evaluation,
    })


def test_a_named_holdout_runs_membership_inference(model_dir, tmp_path):
    checks = [{"check": "membership_inference", "max_batches": 2,
               "holdout": {"path": str(model_dir / "holdout.jsonl")}},
              {"check": "quantization", "max_batches": 2}]
    res = run_job(_spec(model_dir, robustness=checks), tmp_path / "a")
    mia, quant = res.robustness
    assert mia["check"] == "membership_inference" and mia["verdict"] in ("pass", "fail")
    assert mia["metrics"]["members"] == 16 and mia["metrics"]["nonmembers"] == 16
    assert 0.0 <= mia["metrics"]["auc_loss"] <= 1.0
    assert {"auc_loss_original", "auc_min_k_pp_original"} <= set(mia["metrics"])
    assert quant["check"] == "quantization" and quant["verdict"] in ("pass", "fail", "not_run")
    on_disk = json.loads((tmp_path / "a" / "result.json").read_text())
    assert on_disk["robustness"] == res.robustness

    checks[0]["holdout"] = {"path": str(model_dir / "missing.jsonl")}
    res = run_job(_spec(model_dir, robustness=checks[:1]), tmp_path / "b")
    (mia,) = res.robustness
    assert mia["verdict"] == "not_run"
    assert mia["reason"].startswith("holdout could not be read")
    assert "missing.jsonl" in mia["reason"]

    res = run_job(_spec(model_dir, robustness=[]), tmp_path / "c")
    assert res.robustness == [] and res.steps == 4


def test_the_attack_halves_share_no_record(model_dir):
    job = load_job(_spec(model_dir))
    batches = forget_batches(job, per_block=2)  # 40 records >= 2 x 16: first and last 16
    assert len(batches) == 4
    rows = [tuple(r.tolist()) for b in batches for r in b["input_ids"]]
    assert len(rows) == 32
    assert not set(rows[:16]) & set(rows[16:])
    assert len(forget_batches(job, per_block=4)) == 5  # 40 < 2 x 32: every record once


def test_spec_files_resolve_a_relative_holdout_path(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": "org/some-moe", "forget": {"path": "f.jsonl"}, "algorithm": "npo",
        "evaluation": {"robustness": [{"check": "membership_inference",
                                       "holdout": {"path": "h.jsonl"}}]},
    }))
    spec = load_spec(tmp_path / "spec.yaml")
    refs = dict(spec.corpus_refs())
    assert list(refs) == ["forget", "evaluation.robustness[0].holdout"]
    assert refs["evaluation.robustness[0].holdout"].path == str((tmp_path / "h.jsonl").resolve())
