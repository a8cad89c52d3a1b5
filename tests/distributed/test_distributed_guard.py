"""The utility guard on two Ray Train workers (DDP, gloo): rank 0's verdict is agreed by
both ranks, both snapshot and put back the same state, and the job ends as the
one-process run of the same spec does (same stop, same restored step, same weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine._tiny_dir import make_tiny_model_dir
from workers.run import run_job
from workers.runners.ray_train import run_job_distributed
from workers.spec import JobSpec

pytestmark = pytest.mark.slow


def _spec(d: Path, workers: int) -> JobSpec:
    # GA at lr 0.05 on the tiny model raises the retain NLL by 0.11%, 0.24%, 0.32% in its
    # first 3 steps (measured): a 0.28% tolerance stops it at step 3 and puts back step 2.
    return JobSpec.model_validate(
        {
            "model": str(d / "model"),
            "algorithm": "ga",
            "forget": {"path": str(d / "forget.jsonl")},
            "retain": {"path": str(d / "retain.jsonl")},
            "training": {
                "max_steps": 8, "batch_size": 8, "lr": 0.05,
                "stop": {"forget_loss_target": 900.0, "eval_every": 1,
                         "utility_drop_tolerance": 0.0028},
            },
            "evaluation": {"robustness": []},
            # What the NLL figures above were measured with (no retain routing loss: it holds
            # the retain NLL back); no projection, so that one process and Ray Train ranks
            # run the same job.
            "seuf": {"num_experts": 1, "router_projection": "none", "retain_routing_weight": 0},
            "distributed": {"num_workers": workers},
        }
    )  # fmt: skip


def test_two_workers_stop_and_restore_as_one_process(ray_cluster, tmp_path: Path) -> None:
    d = make_tiny_model_dir(tmp_path / "tiny")
    one = run_job(_spec(d, 1), tmp_path / "one")
    two = run_job_distributed(_spec(d, 2), tmp_path / "two", None, None, tmp_path / "ckpt",
                              run_name="guard-ddp")  # fmt: skip
    for res in (one, two):
        assert (res.stopped_by, res.steps) == ("utility_guard", 3), res.guard
        assert res.guard is not None and res.guard["restored_step"] == 2
        assert res.target_met is False
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
