"""Device and precision helpers: dtype/device resolution, and float32 master weights that keep
the small updates a bfloat16 parameter would lose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from workers.devices import MasterWeights, resolve_device, resolve_dtype


def test_auto_resolves_to_what_this_worker_has():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")


def _train(master: bool, steps: int = 50, lr: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    start = w.detach().clone()
    mw = MasterWeights([w]) if master else None
    opt = torch.optim.SGD(mw.parameters() if mw else [w], lr=lr)
    for _ in range(steps):
        loss = (w.float() * torch.linspace(0.5, 1.5, 64)).sum()  # constant gradient
        loss.backward()
        if mw:
            mw.grads_to_master()
        opt.step()
        opt.zero_grad()
        if mw:
            mw.master_to_model()
    return start, w.detach()


def test_master_weights_keep_updates_below_bfloat16_resolution():
    # Each SGD step moves 1.0 by ~1e-4, under bfloat16's spacing at 1.0 (2**-7): a bfloat16
    # parameter never moves; the float32 master accumulates 50 steps (~5e-3) and the model
    # copy follows once the sum crosses the spacing.
    start, plain = _train(master=False)
    assert torch.equal(plain, start)
    start, mastered = _train(master=True)
    assert (mastered.float() < start.float()).all()
    expected = 1.0 - 50 * 1e-4 * torch.linspace(0.5, 1.5, 64)
    assert torch.allclose(mastered.float(), expected, atol=2**-7)


def test_float32_parameters_are_not_copied_and_checkpoints_restore():
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    mw = MasterWeights([a, b])
    assert mw.parameters()[0] is a and mw.parameters()[1] is not b and mw.copies
    saved = [torch.full((3,), 0.123), torch.full((3,), 0.456)]
    mw.load_state_dict(saved)
    assert torch.equal(mw.state_dict()[1], saved[1])
    assert torch.equal(b.detach(), saved[1].to(torch.bfloat16))
    with pytest.raises(ValueError, match="does not match"):
        mw.load_state_dict(saved[:1])


def test_the_device_is_decided_from_the_ray_cluster_before_placement():
    from workers.planner import device_for_resources, with_device
    from workers.spec import JobSpec

    assert device_for_resources("auto", {"CPU": 8.0}) == "cpu"
    assert device_for_resources("auto", {"CPU": 8.0, "GPU": 2.0}) == "cuda"
    assert device_for_resources("cpu", {"CPU": 8.0, "GPU": 2.0}) == "cpu"
    assert device_for_resources("cuda", {"CPU": 8.0, "GPU": 1.0}) == "cuda"
    with pytest.raises(ValueError, match="advertises no GPU"):
        device_for_resources("cuda", {"CPU": 8.0})
    spec = JobSpec.model_validate({"forget": {"demo": "forget"}, "algorithm": "ga"})
    decided = with_device(spec, "cuda")
    assert decided.distributed.device == "cuda" and spec.distributed.device == "auto"
    assert decided.resolved() == {
        **spec.resolved(),
        "distributed": {**spec.resolved()["distributed"], "device": "cuda"},
    }


def test_collated_batches_go_to_the_corpus_device():
    from workers.data import Sample, TokenizedCorpus

    corpus = TokenizedCorpus([Sample([1, 2, 3], [False, True, True])], pad_id=0, device="cpu")
    batch = corpus.collate([0])
    assert {v.device.type for v in batch.values()} == {"cpu"}
    if torch.cuda.is_available():  # the same path on a GPU worker
        corpus.device = "cuda"
        assert {v.device.type for v in corpus.collate([0]).values()} == {"cuda"}


def test_an_out_of_memory_error_carries_the_planners_numbers(tmp_path):
    import json

    from workers.devices import out_of_memory_with_plan
    from workers.spec import JobSpec

    cfg = json.loads((Path(__file__).parents[2] / "bench/configs/olmoe-1b-7b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = JobSpec.model_validate(
        {"model": str(tmp_path), "forget": {"path": "f.jsonl"}, "algorithm": "ga"}
    )
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory.*needs [\d.]+ GiB"):
        with out_of_memory_with_plan(spec):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(MemoryError, match="no planner estimate"):
        with out_of_memory_with_plan(spec.model_copy(update={"model": str(tmp_path / "x")})):
            raise MemoryError("host")
