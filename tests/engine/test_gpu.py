"""The one pipeline on a GPU (marked `gpu`: skipped only where CUDA is absent; the same code
paths run on CPU in tests/engine/test_precision.py and tests/planner/test_devices.py)."""

from pathlib import Path

import pytest
import torch

from tests.engine._tiny_dir import make_tiny_model_dir
from workers.run import run_job
from workers.spec import JobSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _spec(d: Path, device: str, dtype: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": str(d / "model"),
            "algorithm": "gdiff",
            "forget": {"path": str(d / "forget.jsonl")},
            "retain": {"path": str(d / "retain.jsonl")},
            "distributed": {"device": device},
            "seuf": {"num_experts": 1},  # a random model: auto would fall back to full
            "training": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "dtype": dtype},
        }
    )


def test_a_job_on_cuda_matches_the_cpu_job(model_dir, tmp_path):
    gpu = run_job(_spec(model_dir, "auto", "auto"), tmp_path / "gpu")  # auto: cuda, bfloat16
    assert gpu.precision is not None and gpu.precision["device"].startswith("cuda")
    assert gpu.precision["dtype"] == "bfloat16" and gpu.precision["written_dtype"] == "float32"
    cpu = run_job(_spec(model_dir, "cpu", "bfloat16"), tmp_path / "cpu")
    assert [(s["layer"], s["expert"]) for s in gpu.selected] == [
        (s["layer"], s["expert"]) for s in cpu.selected
    ]
    assert gpu.after["forget_nll"] > gpu.before["forget_nll"]
    assert abs(gpu.after["forget_nll"] - cpu.after["forget_nll"]) <= 0.05 * cpu.after["forget_nll"]


def test_the_model_and_batches_live_on_the_gpu(model_dir):
    from workers.job import load_job

    spec = _spec(model_dir, "cuda", "bfloat16")
    job = load_job(spec)
    assert {p.device.type for p in job.model.parameters()} == {"cuda"}
    assert {p.dtype for p in job.model.parameters()} == {torch.bfloat16}
    corpus = job.tokenized(job.forget_records, "answer")
    assert {t.device.type for t in corpus.collate([0, 1]).values()} == {"cuda"}
