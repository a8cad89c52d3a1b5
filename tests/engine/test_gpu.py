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


def test_the_activation_cache_lives_on_the_gpu_and_spills_to_the_host(tmp_path):
    """Up to its cap the cache is GPU memory; past it, host chunk files copied to the GPU at
    lookup; both equal the CPU cache of the same model."""
    from tests.engine.test_activation_cache import N_LAYERS, rand_corpus
    from workers.activation_cache import ActivationCache
    from workers.moe import get_adapter
    from workers.moe.tiny import tiny_model
    from workers.scope import apply_scope

    target = 2
    forget = rand_corpus(9, seed=31)
    caches = []
    for device in ("cpu", "cuda"):  # the same model, placed before its scope is applied
        model = tiny_model("mixtral", seed=3, num_hidden_layers=N_LAYERS).to(device)
        scope = apply_scope(model, get_adapter(model), "seuf", [(target, 1)])
        cap = 1 << 40
        if caches:  # a budget of one chunk: the first build batch on the GPU, the rest spill
            cap = sum(len(forget.samples[i].input_ids) for i in range(4)) * caches[0].width * 4
        caches.append(ActivationCache.build(
            model, scope.adapter, target, forget, batch_size=4, max_bytes=cap, spill_dir=tmp_path
        ))  # fmt: skip
    on_cpu, mixed = caches
    chunk0 = sum(len(forget.samples[i].input_ids) for i in range(4)) * on_cpu.width * 4
    assert mixed.device.type == "cuda" and mixed.memory_bytes == chunk0
    assert mixed.disk_bytes == on_cpu.memory_bytes - chunk0
    batch = forget.collate([8, 1, 4, 2])
    want = on_cpu.lookup(batch["input_ids"], batch["attention_mask"])
    got = mixed.lookup(batch["input_ids"], batch["attention_mask"])
    assert want is not None and got is not None and got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)
    mixed.close()
