"""What a finished job returns (torch-free): `JobResult`, the same type from the one-process
runner and from a Ray Train run, and what `result.json` holds (`to_json` / `from_json`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class DistributedInfo:
    """How a Ray Train run ran. rank0_param_elements: parameter elements rank 0 held while
    training (ZeRO-3: its shards); param_elements_per_rank: the same for every rank, by
    rank ([] in results written before it was recorded). sharded_load: the model was
    loaded partitioned (ZeRO-3, under zero.Init); load_param_elements_per_rank: what each
    rank held right after its load then ([] when loaded whole)."""

    num_workers: int
    backend: str
    zero_stage: int | None
    resumed_from_step: int
    rank0_param_elements: int
    param_elements_per_rank: list[int] = field(default_factory=list)
    sharded_load: bool = False
    load_param_elements_per_rank: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class JobResult:
    """One job's outcome. `before` / `after`: workers.job.evaluate's scores; `selected`,
    `diagnostics`, `changed`: JSON rows (the expert map's and the patch's); `timings_s`:
    seconds per stage; `robustness`: one row per robustness check (workers.robustness
    CheckResult.to_json: check, verdict, threshold, metrics, reason), [] when turned off."""

    model: str
    base_model_sha256: str
    unlearned_model_sha256: str
    algorithm: str
    scope: str
    attribution: str
    selected: list[dict[str, Any]]
    diagnostics: list[dict[str, Any]]
    before: dict[str, Any]
    after: dict[str, Any]
    routing_overlap_forget: float | None
    routing_overlap_retain: float | None
    trainable_parameters: int
    total_parameters: int
    tunable_ratio: float
    steps: int
    stopped_by: str
    changed: list[dict[str, Any]]
    activation_cache: dict[str, Any] | None
    timings_s: dict[str, float]
    output_dir: str
    distributed: DistributedInfo | None = None
    robustness: list[dict[str, Any]] = field(default_factory=list)
    # Where and in which dtype it trained, and the dtype its outputs were written in.
    precision: dict[str, Any] | None = None
    # Issue 13: retain routing overlap per MoE layer (str(layer) -> overlap) and how the
    # experts were chosen (num_experts auto, fallback, warning; router projection).
    routing_overlap_retain_per_layer: dict[str, float] | None = None
    selection: dict[str, Any] | None = None
    # The bar: retain overlap averaged over the MoE layers from the target layer up.
    routing_overlap_retain_from_target: float | None = None
    # Issue 13: whether the forget target (training.stop) was met (None: no target set; a
    # job that did not meet it ends FAILED, class target_not_met, its outputs kept) and the
    # utility guard's record (workers.guard.UtilityGuard.to_json; None without the guard).
    target_met: bool | None = None
    guard: dict[str, Any] | None = None
    # Issue 12: the commit the base model resolved to (a hub id's revision, or a hub cache
    # snapshot's; None for a plain directory), and what was written: full (model/) or
    # patch (expert patch + base_model.json only).
    model_revision: str | None = None
    output_model: str = "full"
    # The training settings that ran: the spec's, or after num_experts auto fell back to
    # full parameters its capped lr and widened step budget (workers.seuf_plan).
    training_used: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.distributed is None:
            d.pop("distributed")  # result.json of a one-process run has no such key
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobResult:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        if d.get("distributed") is not None:
            d["distributed"] = DistributedInfo(**d["distributed"])
        return cls(**d)

    def write(self, out_dir: Path) -> None:
        (out_dir / RESULT_FILE).write_text(json.dumps(self.to_json(), indent=1, default=str))

    @classmethod
    def read(cls, out_dir: Path) -> JobResult:
        return cls.from_json(json.loads((out_dir / RESULT_FILE).read_text()))


def target_layer(scope: str, selected: list[Mapping[str, Any]]) -> int | None:
    """The lowest layer a job trained from: its lowest selected expert's layer; None when
    every layer trained (scope full, also after num_experts auto fell back to it)."""
    if scope == "full" or not selected:
        return None
    return min(int(s["layer"]) for s in selected)


def overlap_from_target(
    per_layer: Mapping[str, float] | None, target: int | None
) -> float | None:
    """Retain routing overlap averaged over the MoE layers at or above `target` (str(layer)
    -> overlap, as result.json stores it). The frozen layers below the target see the
    original inputs through the original router, so they score 1.0 for free and would
    flatter the mean; None target: every layer."""
    if not per_layer:
        return None
    vals = [v for k, v in per_layer.items() if target is None or int(k) >= target]
    return sum(vals) / len(vals) if vals else None


__all__ = ["RESULT_FILE", "DistributedInfo", "JobResult", "overlap_from_target", "target_layer"]
