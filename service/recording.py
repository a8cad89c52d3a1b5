"""What an attempt produces -> database rows. The dispatcher alone writes them; workers
never touch the database.

- `record_progress`: one progress message (workers.progress: StageStarted, JobEvent,
  AttemptStarted) -> a stage change or an event row (and the "before" evaluation rows as
  soon as they are known).
- `record_success`: the outputs of a finished attempt -> the model's identity, a `result`
  event, the expert map, the evaluations before and after, the robustness checks
  (service.proof), the changed parameters and every artifact with its SHA-256, then
  SUCCEEDED (or FAILED, class target_not_met, when the result says the forget target was
  not met: its outputs, the best state reached, are kept); all in one transaction, with
  every file read and hashed before it (the job's row lock is held briefly).

Outputs live in the blob store: `<data_dir>/artifacts/<job_id>/attempt-<n>/` (the model
directory, expert_patch.safetensors, expert_map.json, spec.json, result.json, and the
dispatcher's model_index.json and model.tar; a patch-only job, `output.model: patch`, has
base_model.json instead of the model directory, model_index.json and model.tar). On a
multi-node cluster `data_dir` must be shared storage, since the worker writes there and the
dispatcher reads it.

What a client downloads names no server path (service.redact): a JSON artifact that holds
one (result.json's `model` and `output_dir`, base_model.json's and spec.json's `model`: the
runner's directory) is served from a copy in `client/` that names the model as the client
did (`demo`, a registered id, a hub id, `job:<id>`) and the output as `job:<id>`; its
SHA-256 is the copy's. The worker's own files stay as written: a later `job:<id>` loads
from them (base_model.json's path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import jobs, proof, routing_scores
from service.audit import FORBIDDEN_KEYS, MAX_STRING
from service.errors import IllegalTransition
from service.jobs import ExpertScore, ParamChange, Stage
from service.redact import scrub_json
from workers.events import RANK_STARTED, RANK_STOPPED
from workers.model_source import BASE_REF_FILE
from workers.progress import AttemptStarted, JobEvent, Message, StageStarted
from workers.results import JobResult

log = logging.getLogger(__name__)

# The engine's stages -> the service's. Loading is part of evaluating_before; the engine's
# final "done" marker has no stage of its own.
STAGE_MAP: dict[str, Stage] = {
    "loading": Stage.EVALUATING_BEFORE,
    "evaluating_before": Stage.EVALUATING_BEFORE,
    "attribution": Stage.ATTRIBUTION,
    "unlearning": Stage.UNLEARNING,
    "evaluating_after": Stage.EVALUATING_AFTER,
    "robustness": Stage.EVALUATING_AFTER,  # the checks run on the evaluated model
    "packaging": Stage.PACKAGING,
}
ATTEMPT_STARTED_KIND = "attempt_started"
PER_RANK = frozenset({RANK_STARTED, RANK_STOPPED})
# What the `result` event keeps of the engine's JobResult: the certificate reads what ran
# from it (scope, selection, training settings and precision after an auto fallback may
# differ from the spec's) and what was written (output_model, the resolved revision).
RESULT_SUMMARY = (
    "unlearned_model_sha256",
    "steps",
    "stopped_by",
    "target_met",
    "trainable_parameters",
    "tunable_ratio",
    "timings_s",
    "scope",
    "selection",
    "training_used",
    "precision",
    "model_revision",
    "output_model",
)


def record_progress(
    s: Session, job_id: str, owner: str, m: Message, stage: Stage | None
) -> Stage | None:
    """Write one progress message; returns the job's stage afterwards. A stage the state
    machine refuses is logged and skipped (refused before any write, so the transaction
    stays usable); LeaseLost propagates."""
    if isinstance(m, StageStarted):
        target = STAGE_MAP.get(m.name)
        if target is None or target == stage:
            return stage
        try:
            jobs.set_stage(s, job_id, owner, target)
            return target
        except IllegalTransition as e:
            log.warning("job %s: stage %s refused: %s", job_id, target, e.reason)
            return stage
    if isinstance(m, JobEvent):
        payload = safe_payload(m.payload)
        jobs.record_event(s, job_id, owner, m.step, stored_kind(m), payload)
        if m.kind == "evaluation" and payload.get("phase") == "before":
            scores = {k: v for k, v in payload.items() if k != "phase"}
            jobs.record_evaluations(s, job_id, owner, "before", flatten_scores(scores))
    elif isinstance(m, AttemptStarted):
        info = safe_payload(dataclasses.asdict(m))
        jobs.record_event(s, job_id, owner, 0, ATTEMPT_STARTED_KIND, info)
    return stage


def stored_kind(m: JobEvent) -> str:
    """The kind an event is stored under. Events are unique per (attempt, step, kind), so a
    per-rank event (rank_started, rank_stopped: one from every rank) carries its rank in
    the kind: `rank_stopped[1]`."""
    rank = m.payload.get("rank")
    if m.kind in PER_RANK and isinstance(rank, int) and not isinstance(rank, bool):
        return f"{m.kind}[{rank}]"[:64]
    return m.kind[:64]


@dataclasses.dataclass(frozen=True)
class Outputs:
    """A finished attempt's outputs, read and hashed before the transaction that records
    them (so the job's row lock is held briefly). `model`: the model as the client named
    it (the stored spec's `model`), what the records show."""

    result: JobResult
    expert_map: dict[str, Any]
    artifacts: list[tuple[str, Path, str, int]]  # (kind, path, sha256, size)
    model: str


CLIENT_DIR = "client"  # the served copies of JSON artifacts that named a server path
JSON_KINDS = frozenset({"expert_map", "spec", "result", "base_model", "model_index"})


def read_outputs(
    result: JobResult, output_dir: Path, model_tar_max_bytes: int, *, model: str, job_id: str
) -> Outputs:
    """Package the model directory (model_index.json, model.tar when small enough) and hash
    every artifact of the attempt, a JSON one as served (`served_copy`). `model`: the
    stored spec's `model` (the client's name for it); `job_id`: the job."""
    files: list[tuple[str, Path]] = [
        ("expert_patch", output_dir / "expert_patch.safetensors"),
        ("expert_map", output_dir / "expert_map.json"),
        ("spec", output_dir / "spec.json"),
        ("result", output_dir / "result.json"),
        ("base_model", output_dir / BASE_REF_FILE),  # output.model patch: instead of model/
    ]
    emap = json.loads((output_dir / "expert_map.json").read_text())
    model_dir = output_dir / "model"
    if model_dir.is_dir():
        files += package_model(model_dir, output_dir, model_tar_max_bytes)
    # The runner's model and output directories -> the client's names for them.
    known = {result.model: model, str(output_dir.resolve()): f"job:{job_id}",
             result.output_dir: f"job:{job_id}"}  # fmt: skip
    served = [
        (kind, served_copy(kind, p, model, job_id, known) if kind in JSON_KINDS else p)
        for kind, p in files
        if p.is_file()
    ]
    hashed = [(kind, p, *file_sha256(p)) for kind, p in served]
    return Outputs(result, emap, hashed, model)


def served_copy(kind: str, path: Path, model: str, job_id: str, known: Mapping[str, str]) -> Path:
    """The file a client downloads for a JSON artifact: `path` itself when it names no
    server path, else a copy under `client/` in which the model is named as the client
    named it, the output as `job:<id>`, and any other path is `<server path>`."""
    data = json.loads(path.read_text(encoding="utf-8"))
    view = scrub_json(data, known)
    if isinstance(view, dict):
        if kind in ("result", "spec", "base_model") and "model" in view:
            view["model"] = model
        if kind == "result" and "output_dir" in view:
            view["output_dir"] = f"job:{job_id}"
    if view == data:
        return path
    dest = path.parent / CLIENT_DIR / path.name
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(view, indent=1), encoding="utf-8")
    return dest


def record_success(s: Session, job_id: str, owner: str, out: Outputs, stage: Stage | None) -> str:
    """Write a finished attempt's records and mark the job SUCCEEDED (FAILED, class
    target_not_met, when its forget target was not met); returns its state."""
    result, emap = out.result, out.expert_map
    scores = expert_scores(emap, result.selected or emap.get("selected") or [])
    after = dict(result.after)
    for name, overlaps in routing_scores.result_scores(result).items():
        after.setdefault(name, {})
        if isinstance(after[name], Mapping):
            after[name] = {**after[name], **overlaps}
    if stage != Stage.PACKAGING:
        jobs.set_stage(s, job_id, owner, Stage.PACKAGING)
    # the client's name for the model: result.model is where the runner loaded it from
    jobs.record_model(s, job_id, owner, out.model, result.base_model_sha256, result.model_revision)
    summary = {k: getattr(result, k) for k in RESULT_SUMMARY}
    jobs.record_event(s, job_id, owner, result.steps, jobs.RESULT_KIND, safe_payload(summary))
    jobs.record_expert_map(s, job_id, owner, scores, str(emap.get("method", "")))
    jobs.record_evaluations(s, job_id, owner, "before", flatten_scores(result.before))
    jobs.record_evaluations(s, job_id, owner, "after", flatten_scores(after))
    # evaluations with phase robustness (issue 15); [] when the spec turned them off
    proof.record_robustness(s, job_id, owner, result.robustness)
    jobs.record_param_changes(s, job_id, owner, param_changes(result.changed))
    for kind, p, sha, size in out.artifacts:
        jobs.record_artifact(
            s, job_id, owner, kind=kind, name=p.name, location=str(p), sha256=sha, size=size
        )
    if result.target_met is False:
        return jobs.finish_job(
            s, job_id, owner, "failed", failure_class="target_not_met",
            failure_message=target_message(result),
        ).state  # fmt: skip
    return jobs.finish_job(s, job_id, owner, "succeeded").state


def target_message(result: JobResult) -> str:
    """Why a finished job failed: its forget target was not met (stopped by what, after
    how many steps, and the forget score it reached)."""
    after = result.after
    score = ", ".join(
        f"{k} {after[k]:.4g}" for k in ("forget_accuracy", "forget_nll")
        if isinstance(after.get(k), int | float)
    )  # fmt: skip
    return (
        f"the forget target was not met (stopped by {result.stopped_by} after {result.steps} "
        f"steps; {score or 'no forget score'}): the deletion is incomplete; the best state "
        "reached is kept as the job's artifacts"
    )


def safe_payload(value: Any, depth: int = 0) -> Any:
    """An event payload the audit checks accept: finite numbers (NaN/inf -> None), short
    strings, no text-like keys, plain JSON types."""
    if depth > 8:
        return None
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value[:MAX_STRING]
    if isinstance(value, Mapping):
        return {
            str(k)[:128]: safe_payload(v, depth + 1)
            for k, v in value.items()
            if str(k).lower() not in FORBIDDEN_KEYS
        }
    if isinstance(value, list | tuple):
        return [safe_payload(v, depth + 1) for v in value[:1000]]
    try:
        return safe_payload(float(value), depth + 1)  # numpy / torch scalars
    except (TypeError, ValueError):
        return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def flatten_scores(scores: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """run_job's before/after dict -> results[task][metric] for `record_evaluations`.

    Top-level numbers `<task>_<metric>` (forget_accuracy, retain_nll, ...) split at the
    first underscore; `tasks` (lm-eval: name -> score or metrics) become one task each;
    other nested dicts (per_topic...) become task = key, metric = dotted path."""
    out: dict[str, dict[str, float]] = {}

    def put(task: str, metric: str, v: Any) -> None:
        f = _number(v)
        if f is not None:
            out.setdefault(task, {})[metric] = f

    def leaves(prefix: str, d: Mapping[str, Any]) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                items.extend(leaves(path, v))
            else:
                items.append((path, v))
        return items

    for key, value in scores.items():
        if isinstance(value, Mapping):
            if key == "tasks":
                for name, v in value.items():
                    if isinstance(v, Mapping):
                        for metric, x in leaves("", v):
                            put(str(name), metric, x)
                    else:
                        put(str(name), "score", v)
            else:
                for metric, x in leaves("", value):
                    put(str(key), metric, x)
            continue
        task, _, metric = str(key).partition("_")
        if not metric:
            task, metric = "summary", str(key)
        put(task, metric, value)
    return out


def expert_scores(emap: Mapping[str, Any], selected: list[Mapping[str, Any]]) -> list[ExpertScore]:
    """Every scored (layer, expert) of expert_map.json with its rank (1 = best, the
    engine's ranking order) and whether run_job selected it."""
    layers = [int(x) for x in emap["layers"]]
    scores = emap["scores"]
    pairs = [
        (layer, e, scores[r][e]) for r, layer in enumerate(layers) for e in range(len(scores[r]))
    ]
    ranking = emap.get("ranking") or []
    order = [(int(s["layer"]), int(s["expert"])) for s in ranking]
    if len(order) != len(pairs):  # no (complete) ranking: the engine's order rule
        order = [(l_, e) for l_, e, _ in sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))]
    rank_of = {pair: i + 1 for i, pair in enumerate(order)}
    chosen = {(int(s["layer"]), int(s["expert"])) for s in selected}
    out = []
    for layer, e, score in pairs:
        if _number(score) is None:
            continue  # a non-finite score cannot be stored; its rank still counts
        out.append(ExpertScore(layer, e, float(score), rank_of[(layer, e)], (layer, e) in chosen))
    return out


def param_changes(changed: list[Mapping[str, Any]]) -> list[ParamChange]:
    """result["changed"] (the expert patch's regions) -> ParamChange rows."""
    out = []
    for r in changed:
        shape = [int(x) for x in r.get("shape", [])]
        numel = math.prod(shape) if shape else 0
        expert = r.get("expert")
        out.append(
            ParamChange(
                name=str(r["name"]),
                slice="" if expert is None else f"[{int(expert)}]",
                sha256_before=str(r["sha256_before"]),
                sha256_after=str(r["sha256_after"]),
                numel=numel,
            )
        )
    return out


def file_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size in bytes) of a file, read in chunks."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return digest, f.tell()


def package_model(model_dir: Path, dest: Path, max_tar_bytes: int) -> list[tuple[str, Path]]:
    """model_index.json (every file with size and SHA-256) and, when the directory is at
    most `max_tar_bytes`, model.tar (uncompressed: weights do not compress). Returns
    (kind, path) pairs."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    index = []
    for p in files:
        sha, size = file_sha256(p)
        index.append({"path": p.relative_to(model_dir).as_posix(), "size": size, "sha256": sha})
    out: list[tuple[str, Path]] = []
    idx_path = dest / "model_index.json"
    idx_path.write_text(json.dumps({"files": index}, indent=1))
    out.append(("model_index", idx_path))
    if sum(f["size"] for f in index) <= max_tar_bytes:
        tar_path = dest / "model.tar"
        tmp = dest / ".model.tar.tmp"
        with tarfile.open(tmp, "w") as tar:
            for p in files:
                tar.add(p, arcname=f"model/{p.relative_to(model_dir).as_posix()}")
        os.replace(tmp, tar_path)
        out.append(("model", tar_path))
    return out


__all__ = [
    "ATTEMPT_STARTED_KIND",
    "CLIENT_DIR",
    "STAGE_MAP",
    "expert_scores",
    "file_sha256",
    "flatten_scores",
    "Outputs",
    "package_model",
    "param_changes",
    "read_outputs",
    "record_progress",
    "record_success",
    "safe_payload",
    "served_copy",
    "stored_kind",
    "target_message",
]
