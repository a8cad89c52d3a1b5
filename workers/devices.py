"""Where a job's worker computes and in which precision.

- device: `distributed.device` auto | cpu | cuda. The dispatcher decides `auto` before
  placement (from the Ray cluster's resources, so that a GPU job asks Ray for GPUs); a worker
  resolves whatever is left from what it sees.
- dtype: `training.dtype` auto | float32 | bfloat16 (auto: bfloat16 on CUDA, float32 on CPU).
  Weights load in it; the trainable tensors get float32 master copies (`MasterWeights`) that
  the optimizer steps, so updates smaller than bfloat16's resolution are not lost; losses are
  computed in float32 by the objectives; outputs are written in the model's own dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from workers.spec import JobSpec

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_facts() -> dict[str, str]:
    """The CPU's model and the kernels torch picked for it (e.g. AVX512 or AVX2). Training
    on another kind of CPU sums in another order, so the same seed builds other weights:
    recorded beside a world build and a bench result to tell which builds can compare."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                         "")  # fmt: skip
    except OSError:
        pass
    return {"cpu_model": model, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def resolve_device(requested: str) -> torch.device:
    """The worker's device: `cuda` needs CUDA (a clear error otherwise); `auto` takes it
    when present. On CUDA, the worker's own GPU (Ray sets CUDA_VISIBLE_DEVICES per worker)."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("distributed.device is cuda but this worker sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    if requested not in ("auto", "cpu"):
        raise ValueError(f"distributed.device must be auto, cpu or cuda (got {requested!r})")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"training.dtype must be auto, float32 or bfloat16 (got {requested!r})")
    return DTYPES[requested]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch (dict of tensors and other values) with its tensors on `device`."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class MasterWeights:
    """float32 master copies of trainable parameters held in a lower precision.

    The optimizer is built over `parameters()`. After backward, `grads_to_master()` moves
    the gradients up (float32); after the optimizer step, `master_to_model()` writes the
    values back down. Parameters already in float32 are used as they are (no copy)."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.model_params = list(params)
        self.master: list[nn.Parameter] = [
            p
            if p.dtype == torch.float32
            else nn.Parameter(p.detach().to(torch.float32).clone(), requires_grad=True)
            for p in self.model_params
        ]

    @property
    def copies(self) -> bool:
        """Whether any parameter has a separate float32 master."""
        return any(m is not p for m, p in zip(self.master, self.model_params, strict=True))

    def parameters(self) -> list[nn.Parameter]:
        return self.master

    def grads_to_master(self) -> None:
        for m, p in zip(self.master, self.model_params, strict=True):
            if m is p:
                continue
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for m, p in zip(self.master, self.model_params, strict=True):
            if m is not p:
                p.copy_(m.to(p.dtype))

    @torch.no_grad()
    def sync_from_model(self) -> None:
        """Masters re-read from the model (its tensors were set from outside, e.g. a
        checkpoint that held no masters)."""
        for m, p in zip(self.master, self.model_params, strict=True):
            if m is not p:
                m.copy_(p.to(torch.float32))

    def state_dict(self) -> list[torch.Tensor]:
        """The master values (for a checkpoint: a resumed run continues at full precision)."""
        return [m.detach().clone() for m in self.master]

    @torch.no_grad()
    def load_state_dict(self, values: list[torch.Tensor]) -> None:
        if len(values) != len(self.master):
            raise ValueError("master weights checkpoint does not match the trainable tensors")
        for m, v in zip(self.master, values, strict=True):
            m.copy_(v.to(m.device, m.dtype))
        self.master_to_model()


def plan_line(spec: JobSpec, model_dir: str | None = None) -> str:
    """The memory planner's one line for this job (why an out-of-memory error happened)."""
    from workers.model_shape import shape_from_config
    from workers.planner import estimate, read_config

    try:
        shape = shape_from_config(read_config(model_dir or spec.model))
        return "the planner estimated " + estimate(shape, spec).line()
    except Exception as e:  # noqa: BLE001 - never hide the out-of-memory error behind this
        return f"no planner estimate ({type(e).__name__}: {e})"


@contextmanager
def out_of_memory_with_plan(spec: JobSpec) -> Iterator[None]:
    """A device (or host) out-of-memory error re-raised as the same type with the planner's
    numbers, so the failure (class `out_of_memory`) says what the job was expected to need."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise torch.OutOfMemoryError(f"{e}; {plan_line(spec)}") from e
    except MemoryError as e:
        raise MemoryError(f"{e}; {plan_line(spec)}") from e
