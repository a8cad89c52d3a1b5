"""Routing overlap as stored scores (issue 13): what the recorder writes to the evaluations
table and how the API, the certificate and the console read it back.

Rows (phase `after`, task `forget` or `retain`):
- `routing_overlap`: mean over MoE layers of |TopK_orig ∩ TopK_now| / K (forget, retain);
- `routing_overlap_from_target` (retain): the same mean over the MoE layers from the
  target layer up (`workers.results.overlap_from_target`: frozen layers below it score 1.0
  for free), the figure the issue's acceptance bar (>= 0.95) is about;
- `routing_overlap_per_layer.<layer>` (retain): one row per MoE layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from workers.results import JobResult

OVERLAP = "routing_overlap"
FROM_TARGET = "routing_overlap_from_target"
PER_LAYER = "routing_overlap_per_layer"


class Row(Protocol):
    phase: str
    task: str
    metric: str
    value: float


def is_routing_metric(metric: str) -> bool:
    return metric in (OVERLAP, FROM_TARGET) or metric.startswith(PER_LAYER + ".")


def result_scores(result: JobResult) -> dict[str, dict[str, Any]]:
    """task -> {metric: value} of a finished job's routing overlaps, merged into its after
    scores (the recorder's flatten_scores makes `routing_overlap_per_layer.<layer>` of the
    per-layer dict, and drops missing or non-finite values)."""
    return {
        "forget": {OVERLAP: result.routing_overlap_forget},
        "retain": {
            OVERLAP: result.routing_overlap_retain,
            FROM_TARGET: result.routing_overlap_retain_from_target,
            PER_LAYER: dict(result.routing_overlap_retain_per_layer or {}),
        },
    }


def summary(rows: Iterable[Row]) -> dict[str, Any] | None:
    """The routing overlaps of a job's evaluation rows: {forget, retain, retain_from_target,
    retain_per_layer: {layer: overlap}} (phase after); None when it has none (a job that
    has not finished, or ran before they were recorded)."""
    out: dict[str, Any] = {"forget": None, "retain": None, "retain_from_target": None,
                           "retain_per_layer": {}}
    found = False
    for r in rows:
        if r.phase != "after" or not is_routing_metric(r.metric):
            continue
        found = True
        if r.metric == OVERLAP and r.task in ("forget", "retain"):
            out[r.task] = r.value
        elif r.task == "retain" and r.metric == FROM_TARGET:
            out["retain_from_target"] = r.value
        elif r.task == "retain":
            out["retain_per_layer"][r.metric.removeprefix(PER_LAYER + ".")] = r.value
    if not found:
        return None
    layers = out["retain_per_layer"]
    out["retain_per_layer"] = {k: layers[k] for k in sorted(layers, key=_layer_key)}
    return out


def _layer_key(k: str) -> tuple[int, str]:
    return (int(k), k) if k.isdigit() else (1 << 30, k)


__all__ = ["FROM_TARGET", "OVERLAP", "PER_LAYER", "is_routing_metric", "result_scores", "summary"]
