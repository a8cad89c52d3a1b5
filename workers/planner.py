"""Per-worker peak-memory estimate of a job, from the model's config.json and the spec alone.

No torch: the API calls it at submit time, `moe-unlearn plan SPEC` prints it. It answers
"will one worker of this job fit?" and, when not, what would make it fit.

The estimate is the sum of the parts a worker holds at its peak:
- weights: every parameter in the load dtype (ZeRO-3: a 1/W shard plus the largest layer
  gathered for its forward; with output.model full, rank 0 gathers the trained model whole
  after training, so one whole copy);
- trainable state: float32 master copy (when the load dtype is not float32), float32
  gradient and AdamW's two moments for the trainable parameters (ZeRO-1 shards the moments,
  ZeRO-2 also the gradients, over W workers); DDP keeps one more gradient copy in its buckets;
- activations kept for the backward pass: the layers that run with gradients (SEUF with the
  activation cache: the target layer and the ones above it; the target is only known after
  attribution, so the lowest MoE layer is assumed), per token of a step's batches
  (forget + retain);
- logits: float32 logits and their gradient at every position of a step (an upper bound:
  the engine computes the LM head at scored positions only);
- the activation cache (its in-memory cap) and RMU's reference activations;
- evaluation: the forward of one evaluation batch with its float32 logits (it runs on the
  trained model, never a second copy, and not at the same time as training);
- rank 0's copies of the regions unlearning may change, taken before training (and after
  it under ZeRO-3 with output.model patch): the trainable parameters, every one under
  scope full;
- a fixed overhead (allocator and runtime: CUDA context on a GPU).
The constants are per-token byte factors measured on the real-shape models of
bench/real_shape.py; `planner_over_measured` in bench/results/real_shape.json says how close
the sum came.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.model_shape import ModelShape
from workers.spec import JobSpec

RETAIN_ROUTING_MAX_BYTES = 256 * 2**20  # the retain routing loss's reference cap
GiB = 2**30
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# Saved activations per token and decoder layer, in units of the load dtype's bytes:
# attention (q, k, v, output, norms: ~ATTN_WIDTHS x hidden), the routed experts (gate, up,
# activation, product for each of the top-k experts), the shared experts likewise.
ATTN_WIDTHS = 10
FFN_WIDTHS = 4
RUNTIME_OVERHEAD = {"cpu": int(0.25 * GiB), "cuda": int(1.0 * GiB)}

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Capacity:
    """What one worker can use: bytes of memory on its device, and what the cluster has."""

    per_worker_bytes: int
    device: Device
    source: str  # where the numbers come from (this machine, the Ray cluster, a setting)
    cpus: float = 0.0
    gpus: float = 0.0


@dataclass(frozen=True)
class MemoryPlan:
    family: str
    device: Device
    dtype: str
    workers: int
    total_params: int
    trainable_params: int
    parts: dict[str, int] = field(default_factory=dict)  # bytes per worker
    capacity: Capacity | None = None
    # num_experts auto with fallback full: the same job with every parameter trained (what
    # it runs when no small expert set qualifies). The job is planned at its parameter
    # budget; where this fallback does not fit, the worker stops instead of falling back.
    full_fallback: MemoryPlan | None = None

    @property
    def per_worker_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.per_worker_bytes <= self.capacity.per_worker_bytes

    def line(self) -> str:
        """One line with the numbers; when it does not fit, also a way out."""
        need = f"needs {self.per_worker_bytes / GiB:.1f} GiB per worker"
        if self.capacity is None:
            return need
        have = f"workers have {self.capacity.per_worker_bytes / GiB:.1f} GiB"
        if self.fits:
            return f"{need}, {have} ({self.capacity.source}): fits{self.fallback_note()}"
        return f"{need}, {have} ({self.capacity.source}): {self.advice()}"

    def fallback_note(self) -> str:
        fb = self.full_fallback
        if fb is None or fb.fits:
            return ""
        return (
            f" (if no small expert set qualifies, its full-parameter fallback needs "
            f"{fb.per_worker_bytes / GiB:.1f} GiB per worker: the job stops instead)"
        )

    def advice(self) -> str:
        tips: list[str] = []
        if self.dtype == "float32":
            tips.append("use training.dtype bfloat16")
        if self.full_fallback is not None:
            tips.append("a smaller seuf.parameter_budget or a fixed seuf.num_experts")
        elif self.trainable_params > self.total_params // 10:
            tips.append("use scope seuf (only the selected experts train)")
        if self.workers > 1 or self.parts.get("weights", 0) > self.per_worker_bytes // 2:
            for w in (2, 4, 8, 16):
                if w > self.workers:
                    tips.append(
                        f"distributed.backend deepspeed with zero_stage 3, {w} workers and "
                        "output.model patch"
                    )
                    break
        tips.append("a smaller training.batch_size or max_length")
        return ", or ".join(tips)

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "device": self.device,
            "dtype": self.dtype,
            "workers": self.workers,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "parts_gib": {k: round(v / GiB, 3) for k, v in self.parts.items()},
            "per_worker_gib": round(self.per_worker_bytes / GiB, 3),
            "capacity_gib": (
                None if self.capacity is None else round(self.capacity.per_worker_bytes / GiB, 3)
            ),
            "capacity_source": None if self.capacity is None else self.capacity.source,
            "fits": self.fits,
            "full_fallback_gib": (
                None
                if self.full_fallback is None
                else round(self.full_fallback.per_worker_bytes / GiB, 3)
            ),
            "full_fallback_fits": None if self.full_fallback is None else self.full_fallback.fits,
            "line": self.line(),
        }


def trainable_params(shape: ModelShape, spec: JobSpec) -> int:
    """Parameters that train under the spec's scope (an upper bound for SEUF: each selected
    expert may sit in its own layer, with its own router)."""
    if spec.scope == "full":
        return shape.total_params
    m = spec.seuf.num_experts
    if m == "auto":
        # auto: within the parameter budget (its full fallback is planned on its own).
        return int(spec.seuf.parameter_budget * shape.total_params)
    if spec.seuf.selection == "per_layer":
        m = len(shape.moe_layers)
    elif spec.seuf.selection == "manual":
        m = len(spec.seuf.experts)
    routers = min(m, len(shape.moe_layers)) * shape.router_params
    if spec.scope == "experts":
        return m * shape.expert_params
    if spec.scope == "router":
        return routers
    return m * shape.expert_params + routers


def resolve_device(requested: str, capacity: Capacity | None) -> Device:
    if requested in ("cpu", "cuda"):
        return requested  # type: ignore[return-value]
    return "cuda" if capacity is not None and capacity.gpus > 0 else "cpu"


def device_for_resources(requested: str, resources: Mapping[str, Any]) -> Device:
    """`distributed.device` decided before placement from what the Ray cluster advertises
    (`ray.cluster_resources()`): auto is cuda when it has GPUs, so the job asks Ray for them
    (and an autoscaler adds GPU nodes for it); cuda on a cluster without GPUs is refused."""
    gpus = float(resources.get("GPU", 0) or 0)
    if requested == "cuda" and gpus <= 0:
        raise ValueError("distributed.device is cuda but the Ray cluster advertises no GPU")
    if requested in ("cpu", "cuda"):
        return requested  # type: ignore[return-value]
    return "cuda" if gpus > 0 else "cpu"


def placed_spec(spec: JobSpec, resources: Mapping[str, Any]) -> JobSpec:
    """The spec checked against the Ray cluster (`ray.cluster_resources()`) before placement,
    with its device decided: one CPU per worker, and one GPU per worker on cuda. A
    ValueError (a user error) names what is missing."""
    n = spec.distributed.num_workers
    total = float(resources.get("CPU", 0) or 0)
    if n > total:
        raise ValueError(
            f"distributed.num_workers={n} needs {n} CPUs; the Ray cluster has {total:g}"
        )
    device = device_for_resources(spec.distributed.device, resources)
    gpus = float(resources.get("GPU", 0) or 0)
    if device == "cuda" and n > gpus:
        raise ValueError(
            f"distributed.num_workers={n} on cuda needs {n} GPUs; the Ray cluster has {gpus:g}"
        )
    return with_device(spec, device)


def with_device(spec: JobSpec, device: Device) -> JobSpec:
    """The spec with `distributed.device` made concrete."""
    dist = spec.distributed.model_copy(update={"device": device})
    return spec.model_copy(update={"distributed": dist})


def resolve_dtype(requested: str, device: Device) -> str:
    if requested != "auto":
        return requested
    return "bfloat16" if device == "cuda" else "float32"


def estimate(shape: ModelShape, spec: JobSpec, capacity: Capacity | None = None) -> MemoryPlan:
    """The per-worker peak-memory plan of `spec` on a model of `shape`."""
    device = resolve_device(spec.distributed.device, capacity)
    dtype = resolve_dtype(spec.training.dtype, device)
    b = DTYPE_BYTES[dtype]
    w = spec.distributed.num_workers
    zero = spec.distributed.zero_stage if spec.distributed.backend == "deepspeed" else 0
    total = shape.total_params
    train = trainable_params(shape, spec)

    if zero == 3:  # loaded sharded (workers/runners/deepspeed.py): never whole before training
        weights = math.ceil(total * b / w) + shape.largest_layer_params * b
        if spec.output.model == "full":
            # ...but rank 0 gathers the trained model whole to evaluate and write it (with
            # output.model patch the ranks do that in lockstep: nothing is gathered)
            weights = max(weights, total * b)
    else:
        weights = total * b
    master = train * 4 if b != 4 else 0
    grads = train * 4
    moments = train * 8
    if zero >= 1:
        moments = math.ceil(moments / w)
    if zero >= 2:
        grads = math.ceil(grads / w)
        master = math.ceil(master / w)
    buckets = train * 4 if (spec.distributed.backend == "ddp" and w > 1) else 0

    # A step's batches: forget, plus retain when the objective reads it.
    n_batches = 2 if spec.retain is not None else 1
    tokens = spec.training.batch_size * spec.training.max_length * n_batches
    if spec.scope == "full" or not spec.training.activation_cache:
        grad_layers = shape.num_layers
    else:
        grad_layers = shape.num_layers - min(shape.moe_layers, default=0)
    h = shape.hidden_size
    ffn = shape.top_k * shape.expert_intermediate + shape.shared_intermediate
    attn_scores = shape.num_heads * spec.training.max_length  # eager attention probabilities
    per_token_layer = (ATTN_WIDTHS * h + FFN_WIDTHS * ffn + attn_scores) * b
    if spec.training.gradient_checkpointing:
        # Each layer keeps only its input; one layer's activations are recomputed at a time.
        activations = tokens * (h * b * grad_layers + per_token_layer)
    else:
        activations = tokens * per_token_layer * grad_layers
    logits = tokens * shape.vocab_size * 4 * 2

    cache = 0
    if spec.scope != "full" and spec.training.activation_cache:
        cache = spec.training.activation_cache_max_mb * 2**20
        records = [r.max_records for r in (spec.forget, spec.retain) if r is not None]
        if records and all(n is not None for n in records):
            # Bounded corpora: the hidden states of every sample, if less than the cap.
            cache = min(cache, sum(records) * spec.training.max_length * h * b)
    reference = 0
    if spec.algorithm == "rmu" and spec.retain is not None:
        # h_ref of the retain batches at the steered layer, kept for the run (capped like the
        # cache: the engine precomputes them once).
        reference = min(cache or 256 * 2**20, 256 * 2**20)
    if spec.retain_routing_weight() > 0:
        # The retain routing loss's targets: K int8/int16 indices + K float16 per token and
        # MoE layer, capped (workers/retain_routing.py); bounded corpora need less.
        per_token = len(shape.moe_layers) * shape.top_k * 4
        rr = RETAIN_ROUTING_MAX_BYTES
        if spec.retain is not None and spec.retain.max_records is not None:
            rr = min(rr, spec.retain.max_records * spec.training.max_length * per_token)
        reference += rr

    ev = spec.evaluation
    if spec.model == "demo" or ev.tasks or ev.forget_tasks:
        # Question sets / lm-eval tasks: evaluation batches with logits at every position.
        eval_tokens = ev.batch_size * spec.training.max_length
    else:  # only the forget / retain NLL, in training-size batches
        eval_tokens = spec.training.batch_size * spec.training.max_length
    evaluation = eval_tokens * (shape.vocab_size * 4 * 2 + per_token_layer)

    # Rank 0's copies of the regions unlearning may change (workers.job.snapshot_regions),
    # in the load dtype: before training, and under ZeRO-3 with output.model patch after it
    # too (read from the partitions as baking would leave them). Scope full: every weight.
    snapshots = train * b * (2 if zero == 3 and spec.output.model == "patch" else 1)

    parts = {
        "weights": weights,
        "region_snapshots": snapshots,
        "trainable_state": master + grads + moments + buckets,
        # Training, evaluation and the robustness checks do not overlap: the largest.
        "activations": max(activations + logits, evaluation + robustness_extra(spec)),
        "activation_cache": cache,
        "reference": reference,
        "overhead": RUNTIME_OVERHEAD[device],
    }
    return MemoryPlan(
        family=shape.family,
        device=device,
        dtype=dtype,
        workers=w,
        total_params=total,
        trainable_params=train,
        parts=parts,
        capacity=capacity,
        full_fallback=(
            estimate(shape, spec.model_copy(update={"scope": "full"}), capacity)
            if spec.scope != "full"
            and spec.seuf.num_experts == "auto"
            and spec.seuf.fallback == "full"
            else None
        ),
    )


def robustness_extra(spec: JobSpec) -> int:
    """The quantisation check (workers/robustness.py) spills each module's weights to a
    temporary file while they are quantised in place: only its float32 temporaries (a few
    chunks of 2**22 values) come on top of an evaluation-size forward."""
    if not any(c.check == "quantization" for c in spec.evaluation.robustness):
        return 0
    return 4 * 2**22 * 4


# --- what the workers have -----------------------------------------------------------------


def _local_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _local_gpu_memory_bytes() -> list[int]:
    """Memory of each local NVIDIA GPU (nvidia-smi; empty where there is none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(float(x)) * 2**20 for x in out.split() if x.strip()]


def local_capacity(device: str, workers: int) -> Capacity:
    """This machine: its RAM shared by the workers (CPU), or its smallest GPU (CUDA)."""
    gpus = _local_gpu_memory_bytes()
    cpus = float(os.cpu_count() or 1)
    if device == "cuda" or (device == "auto" and gpus):
        if not gpus:
            return Capacity(0, "cuda", "this machine has no GPU", cpus=cpus, gpus=0)
        return Capacity(min(gpus), "cuda", "this machine's GPU", cpus=cpus, gpus=len(gpus))
    per = _local_memory_bytes() // max(1, min(workers, int(cpus)))
    return Capacity(per, "cpu", "this machine's memory", cpus=cpus, gpus=float(len(gpus)))


def ray_capacity(
    nodes: list[Mapping[str, Any]], device: str, workers: int, gpu_memory_bytes: int | None
) -> Capacity:
    """The Ray cluster (`ray.nodes()`): the largest node's memory shared by the workers it
    can hold (CPU), or one GPU's memory (CUDA; Ray does not advertise it, so it comes from
    `gpu_memory_bytes`, e.g. the MOE_UNLEARN_GPU_MEMORY_GIB setting)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    cpus = sum(float(r.get("CPU", 0)) for r in alive)
    gpus = sum(float(r.get("GPU", 0)) for r in alive)
    if device == "cuda" or (device == "auto" and gpus > 0):
        if gpus == 0:
            return Capacity(0, "cuda", "the Ray cluster has no GPU", cpus=cpus, gpus=0)
        if gpu_memory_bytes is None:
            gpu_memory_bytes = 0
            source = "GPU memory unknown: set MOE_UNLEARN_GPU_MEMORY_GIB"
        else:
            source = "the Ray cluster's GPUs"
        return Capacity(gpu_memory_bytes, "cuda", source, cpus=cpus, gpus=gpus)
    best = 0
    for r in alive:
        mem = float(r.get("memory", 0))
        slots = max(1, min(workers, int(float(r.get("CPU", 1)))))
        best = max(best, int(mem // slots))
    return Capacity(best, "cpu", "the Ray cluster's largest node", cpus=cpus, gpus=gpus)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a local model directory (a user error when missing or unreadable)."""
    p = Path(model_dir) / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model's config.json: {e}") from e
    if not isinstance(data, dict):
        raise ValueError("the model's config.json is not a JSON object")
    return data
