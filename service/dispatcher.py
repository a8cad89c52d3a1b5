"""The dispatcher: claims queued jobs, runs each attempt on Ray, and alone writes what the
attempt produces into the database.

    loop:  reclaim_expired  ->  claim_next (lease)  ->  Executor.start(attempt)
           while it runs: drain its progress -> set_stage / record_event (one transaction
           per drain), heartbeat the lease (which also reports a cancel request),
           ask it to stop on cancel / timeout / lost lease, force-stop after a grace period
           when it ends: record expert map, evaluations, parameter changes, model hash and
           artifacts, then finish_job(succeeded | failed(class) | cancelled)

Where an attempt runs (`RayTaskExecutor`): one Ray *task* per attempt, plus one tiny Ray
actor per attempt (`_Channel`, 0 CPUs) that buffers progress messages and holds the stop
flag. The task runs one of two runners, by `spec.distributed.uses_ray_train`:
- one DDP worker: `workers.run.run_job` in the task itself, which holds 1 CPU;
- several workers or DeepSpeed: the task (0 CPUs) drives a Ray Train `TorchTrainer`
  through `workers.distributed.run_job_distributed`, whose `num_workers` workers take the
  CPUs. Its run name is the job id and its storage `<checkpoint_dir>/<job id>`, so a
  retried attempt resumes from the last checkpoint; the folder goes when the job ends.
Why a task and not an actor: a task holds its CPUs exactly while it runs and gives them
back when it returns or is killed, `ray.cancel(force=True)` kills its worker process as a
last resort, and the ways it can end map one-to-one onto the failure classes
(`RayTaskError` wrapping the engine's exception, `WorkerCrashedError`, `OutOfMemoryError`,
`TaskCancelledError`; a Ray Train worker that dies is the engine's `WorkerFailure`, class
infrastructure). A killed task takes its trainer along (the controller and workers are
owned by its process), but not the trainer's placement group, which keeps the CPUs
reserved: Ray Train's own clean-up asks Ray's dashboard, which the local Ray runs without.
So the run announces its placement group (`trainer_started` event) and the handle removes
it after a force-stop or a task that died. Ray's own task retries and Ray Train's in-run
restarts are off: retries are the dispatcher's, so each one is a new, recorded attempt.
The executor is a small interface (`Executor.start -> AttemptHandle` with drain / done /
outcome / request_stop / force_stop).

Workers never touch the database: the task only talks to its channel actor. Cancellation
is cooperative first (run_job's `should_stop` polls the channel's flag every step, and the
reporter also checks it at every stage boundary), then forced after `cancel_grace_s`.

Failure classes: `user_input` (a ValueError from the engine or the spec: never retried),
`infrastructure` (worker or node died, Ray errors, the dispatcher stopped: retried),
`out_of_memory` (retried), `timeout` (over `attempt_timeout_s`: not retried), `internal`
(any other exception from the engine, i.e. a bug: not retried). A dispatcher that dies
leaves a lease that expires; the next dispatcher's `reclaim_expired` makes the job
RETRYING (or FAILED when its attempts are used up), so nothing stays RUNNING forever.

Outputs live in the blob store: `<data_dir>/artifacts/<job_id>/attempt-<n>/` (the model
directory, expert_patch.safetensors, expert_map.json, spec.json, result.json, and the
dispatcher's model_index.json and model.tar). On a multi-node cluster `data_dir` must be
shared storage, since the worker writes there and the dispatcher reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.audit import FORBIDDEN_KEYS, MAX_STRING
from service.db import check_migrated, engine_for, make_session_factory, session_scope
from service.errors import IllegalTransition, LeaseLost
from service.jobs import ExpertScore, ParamChange, Stage
from service.settings import Settings, get_settings
from service.storage import BlobStore
from workers.events import TRAINER_STARTED
from workers.faults import injection_env
from workers.spec import JobSpec

log = logging.getLogger(__name__)

# workers.run.STAGES -> the service's stages. Loading is part of evaluating_before; the
# engine's final "done" marker has no stage of its own.
STAGE_MAP: dict[str, Stage] = {
    "loading": Stage.EVALUATING_BEFORE,
    "evaluating_before": Stage.EVALUATING_BEFORE,
    "attribution": Stage.ATTRIBUTION,
    "unlearning": Stage.UNLEARNING,
    "evaluating_after": Stage.EVALUATING_AFTER,
    "packaging": Stage.PACKAGING,
}

FailureClass = Literal["user_input", "infrastructure", "out_of_memory", "timeout", "internal"]
RETRYABLE: frozenset[str] = frozenset({"infrastructure", "out_of_memory"})
ATTEMPT_STARTED_KIND = "attempt_started"


# ----------------------------------------------------------------------------- executor


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended. `result` is run_job's result (succeeded only)."""

    status: Literal["succeeded", "failed", "cancelled"]
    result: dict[str, Any] | None = None
    failure_class: FailureClass | None = None
    message: str = ""


# A progress message from the attempt: ("stage", name) | ("event", kind, step, payload)
# | ("started", info).
Message = tuple[Any, ...]


class AttemptHandle(Protocol):
    def drain(self, final: bool = False) -> list[Message]:
        """Progress since the last drain, in order. Never blocks the loop unless `final`
        (after the attempt ended: everything it sent)."""
        ...

    def done(self) -> bool: ...  # never blocks

    def outcome(self) -> AttemptOutcome: ...  # once done() is True

    def request_stop(self) -> None: ...  # cooperative: the attempt stops at its next step

    def force_stop(self) -> None: ...  # kill it (frees its CPUs)

    def release(self) -> None: ...  # drop per-attempt resources (after the outcome)


class Executor(Protocol):
    def start(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        output_dir: Path,
        corpus_paths: Mapping[str, str],
    ) -> AttemptHandle:
        """Launch the attempt (ValueError: the spec cannot run here, e.g. too many CPUs)."""
        ...


class _StopRequested(Exception):
    """Raised inside the attempt at a stage boundary when a stop was requested."""


class _Channel:
    """Ray actor (0 CPUs) between one attempt and the dispatcher: a progress buffer and the
    stop flag. Calls from one caller run in submission order, so the buffer keeps order."""

    def __init__(self) -> None:
        self._items: list[Message] = []
        self._stop = False

    def put(self, item: Message) -> None:
        self._items.append(item)

    def drain(self) -> list[Message]:
        items, self._items = self._items, []
        return items

    def request_stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop

    def ping(self) -> bool:
        return True


class _ChannelReporter:
    """workers.run.Reporter that forwards to the channel (fire-and-forget, ordered)."""

    def __init__(self, channel: Any, poll_s: float = 0.2) -> None:
        self.channel = channel
        self.poll_s = poll_s
        self._checked = 0.0
        self._stop = False

    def should_stop(self) -> bool:
        # Polled every training step: ask the actor at most every poll_s seconds.
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.poll_s:
            import ray

            self._checked = now
            self._stop = bool(ray.get(self.channel.should_stop.remote()))
        return self._stop

    def stage(self, name: str) -> None:
        if name != "done":
            self._checked = 0.0  # always ask at a stage boundary
            if self.should_stop():
                raise _StopRequested(name)
        self.channel.put.remote(("stage", name))

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.channel.put.remote(("event", kind, int(step), payload))

    def flush(self) -> None:
        import ray

        ray.get(self.channel.ping.remote())  # ordered after every earlier put


@dataclass(frozen=True)
class AttemptPlan:
    """What one attempt's Ray task needs besides the spec: where it writes, which corpora,
    and, for Ray Train jobs, the run name (the job id: the same name resumes) and storage."""

    output_dir: str
    corpus_paths: dict[str, str]
    run_name: str
    checkpoint_dir: str
    injected_env: dict[str, str] = field(default_factory=dict)  # test-only (workers/faults)


def _attempt_main(spec_data: dict[str, Any], plan: AttemptPlan, channel: Any) -> dict[str, Any]:
    """Body of the Ray task: run the job (in this process, or on a Ray Train trainer that
    this task drives) and turn the engine's exceptions into an outcome (anything else
    propagates and Ray wraps it)."""
    reporter = _ChannelReporter(channel)
    spec = JobSpec.model_validate(spec_data)
    ray_train = spec.distributed.uses_ray_train
    channel.put.remote(
        (
            "started",
            {
                "pid": os.getpid(),
                "host": socket.gethostname()[:128],
                "num_workers": spec.distributed.num_workers,
                "runner": "ray_train" if ray_train else "process",
            },
        )
    )
    corpus_paths = plan.corpus_paths

    def resolve(corpus_id: str) -> Path:
        if corpus_id not in corpus_paths:
            raise ValueError(f"corpus {corpus_id} is not in the service's corpus store")
        return Path(corpus_paths[corpus_id])

    try:
        import torch

        from workers.run import JobCancelled, run_job

        try:
            if ray_train:
                from workers.distributed import WorkerFailure, run_job_distributed

                # The trainer's workers hold the CPUs; this task only drives them.
                os.environ.update(plan.injected_env)
                try:
                    result = run_job_distributed(
                        spec,
                        plan.output_dir,
                        reporter,
                        reporter.should_stop,
                        plan.checkpoint_dir,
                        resolve,
                        run_name=plan.run_name,
                    )
                except WorkerFailure as e:  # retried: the next attempt resumes
                    return {"status": "failed", "failure_class": "infrastructure",
                            "message": str(e)[:2000]}  # fmt: skip
                finally:
                    for k in plan.injected_env:  # this worker process is reused
                        os.environ.pop(k, None)
            else:
                torch.set_num_threads(spec.distributed.num_workers)  # the CPUs Ray gave us
                result = run_job(spec, plan.output_dir, reporter, resolve, reporter.should_stop)
            return {"status": "succeeded", "result": result}
        except (JobCancelled, _StopRequested) as e:
            return {"status": "cancelled", "message": str(e)}
        except ValueError as e:  # the engine's contract: user mistakes are ValueError
            return {"status": "failed", "failure_class": "user_input", "message": str(e)}
        except (MemoryError, torch.OutOfMemoryError) as e:
            return {"status": "failed", "failure_class": "out_of_memory", "message": str(e)}
    finally:
        try:
            reporter.flush()
        except Exception:  # noqa: BLE001 - the channel may be gone; the outcome still counts
            pass


def classify_exception(err: BaseException) -> tuple[FailureClass, str]:
    """Failure class of an exception raised by `ray.get` on an attempt (or by Ray itself)."""
    import ray.exceptions as rex

    msg = f"{type(err).__name__}: {err}"[:2000]
    if isinstance(err, rex.OutOfMemoryError):
        return "out_of_memory", msg
    if isinstance(err, rex.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, MemoryError):
            return "out_of_memory", msg
        if cause is not None and type(cause).__name__ == "OutOfMemoryError":
            return "out_of_memory", msg
        if isinstance(cause, ValueError):
            return "user_input", f"{cause}"[:2000]
        if cause is not None and not isinstance(cause, rex.RayError):
            return "internal", f"{type(cause).__name__}: {cause}"[:2000]
        return "infrastructure", msg
    if isinstance(err, rex.RayError | ConnectionError | OSError):
        # worker / node / raylet died, object lost, actor died, cancelled, GCS trouble
        return "infrastructure", msg
    return "internal", msg


class RayTaskHandle:
    def __init__(self, ref: Any, channel: Any) -> None:
        self.ref = ref
        self.channel = channel
        self._pending: Any = None  # an outstanding channel.drain() call
        self.placement_group: str | None = None  # of a Ray Train run, once it started

    def drain(self, final: bool = False) -> list[Message]:
        # Never wait for the channel in the loop (its actor may still be starting, which
        # takes seconds on a busy node): one drain call stays outstanding and is collected
        # once ready, so heartbeats are never held up.
        import ray

        out: list[Message] = []
        for _ in range(2 if final else 1):  # final: the outstanding call, then the rest
            if self._pending is None:
                self._pending = self.channel.drain.remote()
            if not final and not ray.wait([self._pending], timeout=0)[0]:
                break
            ref, self._pending = self._pending, None
            try:
                out.extend(ray.get(ref, timeout=30))
            except ray.exceptions.RayError as e:
                log.warning("progress channel unavailable: %s", type(e).__name__)
                break
        for m in out:
            if m[0] == "event" and m[1] == TRAINER_STARTED:
                self.placement_group = m[3].get("placement_group")
        return out

    def done(self) -> bool:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def outcome(self) -> AttemptOutcome:
        import ray

        try:
            out = ray.get(self.ref)
        except Exception as e:  # noqa: BLE001 - classified, never re-raised
            if isinstance(e, ray.exceptions.TaskCancelledError):
                return AttemptOutcome("cancelled", message="the attempt was force-stopped")
            fclass, msg = classify_exception(e)
            return AttemptOutcome("failed", failure_class=fclass, message=msg)
        if out["status"] == "succeeded":
            return AttemptOutcome("succeeded", result=out["result"])
        if out["status"] == "cancelled":
            return AttemptOutcome("cancelled", message=out.get("message", ""))
        return AttemptOutcome("failed", failure_class=out["failure_class"], message=out["message"])

    def request_stop(self) -> None:
        import ray

        try:
            self.channel.request_stop.remote()
        except ray.exceptions.RayError:
            pass

    def force_stop(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)
        self._free_placement_group()

    def _free_placement_group(self) -> None:
        """A Ray Train run's workers die with the task that drives it, but nothing else
        would give back the CPUs their placement group reserves (module docstring)."""
        if not self.placement_group:
            return
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        try:
            remove_placement_group(
                PlacementGroup(PlacementGroupID.from_hex(self.placement_group))
            )
        except Exception as e:  # noqa: BLE001 - already removed by Ray Train
            log.debug("placement group %s: %s", self.placement_group, e)
        self.placement_group = None

    def release(self) -> None:
        import ray

        # Also after a task that died by itself (its process killed, its node lost).
        self._free_placement_group()
        try:
            ray.kill(self.channel)
        except Exception:  # noqa: BLE001 - already gone
            pass


class RayTaskExecutor:
    """One Ray task per attempt (see the module docstring for why). `checkpoint_dir`: the
    Ray Train storage of multi-worker jobs (one folder per job id)."""

    def __init__(self, checkpoint_dir: Path) -> None:
        import ray

        self.checkpoint_dir = checkpoint_dir
        self._task = ray.remote(max_retries=0)(_attempt_main)
        self._channel_cls = ray.remote(num_cpus=0, max_restarts=0)(_Channel)

    def start(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        output_dir: Path,
        corpus_paths: Mapping[str, str],
    ) -> RayTaskHandle:
        import ray

        workers = spec.distributed.num_workers
        total = ray.cluster_resources().get("CPU", 0)
        if workers > total:
            raise ValueError(
                f"distributed.num_workers={workers} needs {workers} CPUs; the Ray cluster "
                f"has {total:g}"
            )
        plan = AttemptPlan(
            output_dir=str(output_dir),
            corpus_paths=dict(corpus_paths),
            run_name=job_id,
            checkpoint_dir=str(self.checkpoint_dir),
            injected_env=injection_env(),
        )
        channel = self._channel_cls.remote()
        # A Ray Train job's task only drives the trainer, whose workers take the CPUs.
        num_cpus = 0 if spec.distributed.uses_ray_train else workers
        ref = self._task.options(
            num_cpus=num_cpus, name=f"moe-unlearn-{job_id[:8]}-a{attempt}"
        ).remote(spec.resolved(), plan, channel)
        return RayTaskHandle(ref, channel)


# ----------------------------------------------------------------------------- Ray start


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's temp folder: the setting, else <data_dir>/ray when short enough (Ray puts unix
    sockets there: paths over ~107 bytes fail), else /tmp/moeu-ray-<hash of the data dir>:
    the same folder every time for one data dir, so restarts do not pile up folders."""
    if settings.ray_temp_dir is not None:
        return Path(settings.ray_temp_dir).expanduser().resolve()
    under_data = Path(settings.data_dir).expanduser().resolve() / "ray"
    if len(str(under_data)) <= 48:
        return under_data
    digest = hashlib.sha256(str(under_data).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"moeu-ray-{digest}"


def checkpoint_root(settings: Settings) -> Path:
    """Where Ray Train jobs keep checkpoints: `<root>/<job id>/` (the setting, else
    `<data_dir>/checkpoints`); absolute, since Ray Train resolves it on the workers."""
    root = settings.checkpoint_dir or Path(settings.data_dir) / "checkpoints"
    return Path(root).expanduser().resolve()


_WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "TORCH_EXTENSIONS_DIR",
    "MOE_UNLEARN_CACHE",
)


def init_ray(settings: Settings) -> bool:
    """Connect to `settings.ray_address`, or start a private local Ray with
    `ray_num_cpus` CPUs. Returns True if this call initialised Ray (the caller must then
    `ray.shutdown()`); False if Ray was already initialised in this process."""
    import ray

    if ray.is_initialized():
        return False
    if settings.ray_address:
        # Workers on a cluster do not inherit this process's environment: pass on the
        # variables that keep them offline and find the shared caches.
        env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
        ray.init(
            address=settings.ray_address,
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=False,
        )
    else:
        tmp = ray_temp_dir(settings)
        tmp.mkdir(parents=True, exist_ok=True)
        # "local": always a new private instance, never someone else's cluster.
        ray.init(
            address="local",
            num_cpus=settings.ray_num_cpus,
            _temp_dir=str(tmp),
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


# ----------------------------------------------------------------------------- helpers


def _safe_payload(value: Any, depth: int = 0) -> Any:
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
            str(k)[:128]: _safe_payload(v, depth + 1)
            for k, v in value.items()
            if str(k).lower() not in FORBIDDEN_KEYS
        }
    if isinstance(value, list | tuple):
        return [_safe_payload(v, depth + 1) for v in value[:1000]]
    try:
        return _safe_payload(float(value), depth + 1)  # numpy / torch scalars
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
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


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


# ----------------------------------------------------------------------------- dispatcher


@dataclass
class _Active:
    job_id: str
    attempt: int
    spec: JobSpec
    handle: AttemptHandle
    output_dir: Path
    started: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    stage: Stage | None = None
    stop_reason: Literal["cancel", "timeout", "lease_lost", "shutdown"] | None = None
    stop_sent_at: float | None = None
    forced: bool = False


@dataclass
class DispatcherStats:
    claimed: int = 0  # attempts started (a retried job is claimed again)
    finished: dict[str, int] = field(default_factory=dict)  # state after an attempt -> count
    reclaimed: int = 0  # expired leases taken back (RETRYING / FAILED / CANCELLED)

    @property
    def ended(self) -> int:
        """Jobs this dispatcher brought to a terminal state."""
        return sum(self.finished.get(s, 0) for s in jobs.TERMINAL)


class Dispatcher:
    """The loop of one dispatcher process (see the module docstring). `owner` names its
    leases; several dispatchers can run against one database."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        executor: Executor,
        owner: str | None = None,
        store: BlobStore | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.executor = executor
        self.owner = (
            owner
            or f"dispatcher-{socket.gethostname()[:40]}-{os.getpid()}-" + (uuid.uuid4().hex[:8])
        )
        self.store = store or BlobStore.from_settings(settings)
        self.checkpoint_root = checkpoint_root(settings)
        self.active: list[_Active] = []
        self.stats = DispatcherStats()

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        once: bool = False,
        max_jobs: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> DispatcherStats:
        """Until `stop_event` is set; with `once`, until nothing is queued or running;
        with `max_jobs`, until this dispatcher has brought that many jobs to a terminal
        state (a retried attempt does not count)."""
        try:
            while not (stop_event is not None and stop_event.is_set()):
                self._reclaim()
                queue_empty = False  # True only when a claim found nothing to run
                while len(self.active) < self.settings.dispatcher_concurrency and (
                    max_jobs is None or self.stats.ended + len(self.active) < max_jobs
                ):
                    try:
                        started = self._claim_and_start()
                    except DBAPIError:
                        if once:
                            raise
                        log.exception("claiming a job failed (database unavailable?)")
                        break
                    if not started:
                        queue_empty = True
                        break
                for a in list(self.active):
                    if self._service(a):
                        self.active.remove(a)
                if not self.active:
                    if max_jobs is not None and self.stats.ended >= max_jobs:
                        break
                    if once and queue_empty:
                        break
                if stop_event is not None:
                    stop_event.wait(self.settings.dispatcher_poll_s)
                else:
                    time.sleep(self.settings.dispatcher_poll_s)
        finally:
            self._shutdown_active()
        return self.stats

    def _reclaim(self) -> None:
        try:
            with session_scope(self.factory) as s:
                expired = jobs.reclaim_expired(s, actor=self.owner)
                got = [(j.id, j.attempt, j.state) for j in expired]
        except Exception:  # noqa: BLE001 - a DB hiccup must not kill the loop
            log.exception("reclaim_expired failed")
            return
        for job_id, attempt, state in got:
            log.info("reclaimed job %s (attempt %s) -> %s", job_id, attempt, state)
            self._drop_checkpoints_if_over(job_id, state)
        self.stats.reclaimed += len(got)

    # -- starting an attempt ---------------------------------------------------------------

    def _claim_and_start(self) -> bool:
        with session_scope(self.factory) as s:
            job = jobs.claim_next(s, self.owner, self.settings.lease_seconds)
            if job is None:
                return False
            job_id, attempt, spec_data = job.id, job.attempt, dict(job.spec)
        self.stats.claimed += 1
        log.info("claimed job %s attempt %s", job_id, attempt)
        try:
            spec = JobSpec.model_validate(spec_data)
            corpus_paths = self._corpus_paths(spec)
            out = self.store.artifact_dir(job_id) / f"attempt-{attempt}"
            if out.exists():  # left by a crashed run of this very attempt number
                shutil.rmtree(out)
            out.mkdir(parents=True)
            handle = self.executor.start(job_id, attempt, spec, out, corpus_paths)
        except ValueError as e:
            self._finish_failed(job_id, "user_input", str(e))
            return True
        except Exception as e:  # noqa: BLE001 - Ray unavailable, disk full...
            fclass, msg = classify_exception(e)
            self._finish_failed(job_id, fclass, msg)
            return True
        self.active.append(_Active(job_id, attempt, spec, handle, out))
        return True

    def _corpus_paths(self, spec: JobSpec) -> dict[str, str]:
        paths: dict[str, str] = {}
        for name in ("forget", "retain"):
            ref = getattr(spec, name)
            if ref is None or ref.corpus_id is None:
                continue
            p = self.store.corpus_path(ref.corpus_id)
            if not p.is_file():
                raise ValueError(f"{name}.corpus_id: corpus {ref.corpus_id} is not in the store")
            paths[ref.corpus_id] = str(p)
        return paths

    # -- one running attempt ---------------------------------------------------------------

    def _service(self, a: _Active) -> bool:
        """Move one attempt along; True when it has ended (and was finished in the DB)."""
        now = time.monotonic()
        if a.stop_reason != "lease_lost" and now - a.last_heartbeat >= self.settings.heartbeat_s:
            self._heartbeat(a)
        self._write_progress(a, a.handle.drain())
        timeout = self.settings.attempt_timeout_s
        if timeout is not None and a.stop_reason is None and now - a.started > timeout:
            self._stop(a, "timeout")
        if (
            a.stop_sent_at is not None
            and not a.forced
            and now - a.stop_sent_at > self.settings.cancel_grace_s
        ):
            log.warning(
                "job %s did not stop in %ss: force-stopping", a.job_id, now - a.stop_sent_at
            )
            a.forced = True
            a.handle.force_stop()
        if not a.handle.done():
            return False
        outcome = a.handle.outcome()
        self._write_progress(a, a.handle.drain(final=True))  # what it sent before it ended
        a.handle.release()
        self._finish(a, outcome)
        return True

    def _stop(
        self, a: _Active, reason: Literal["cancel", "timeout", "lease_lost", "shutdown"]
    ) -> None:
        if a.stop_reason is None:
            a.stop_reason = reason
            a.stop_sent_at = time.monotonic()
            log.info("stopping job %s attempt %s (%s)", a.job_id, a.attempt, reason)
            a.handle.request_stop()

    def _heartbeat(self, a: _Active) -> None:
        try:
            with session_scope(self.factory) as s:
                cancel = jobs.heartbeat(s, a.job_id, self.owner, self.settings.lease_seconds)
            a.last_heartbeat = time.monotonic()
            if cancel:
                self._stop(a, "cancel")
        except LeaseLost:
            log.warning("lost the lease of job %s: stopping its attempt", a.job_id)
            a.stop_reason = None
            self._stop(a, "lease_lost")
        except Exception:  # noqa: BLE001 - retried at the next poll; the lease has slack
            log.exception("heartbeat of job %s failed", a.job_id)

    def _write_progress(self, a: _Active, msgs: list[Message]) -> None:
        if not msgs or a.stop_reason == "lease_lost":
            return
        try:
            with session_scope(self.factory) as s:
                for m in msgs:
                    self._write_one(s, a, m)
        except LeaseLost:
            self._stop(a, "lease_lost")
        except Exception:  # noqa: BLE001 - progress is best effort; results are not
            log.exception("writing progress of job %s failed", a.job_id)

    def _write_one(self, s: Session, a: _Active, m: Message) -> None:
        kind = m[0]
        if kind == "stage":
            target = STAGE_MAP.get(str(m[1]))
            if target is None or target == a.stage:
                return
            try:  # refused before any write, so the transaction stays usable
                jobs.set_stage(s, a.job_id, self.owner, target)
                a.stage = target
            except IllegalTransition as e:
                log.warning("job %s: stage %s refused: %s", a.job_id, target, e.reason)
        elif kind == "event":
            _, ekind, step, payload = m
            payload = _safe_payload(payload)
            jobs.record_event(s, a.job_id, self.owner, step, str(ekind)[:64], payload)
            if ekind == "evaluation" and payload.get("phase") == "before":
                scores = {k: v for k, v in payload.items() if k != "phase"}
                jobs.record_evaluations(s, a.job_id, self.owner, "before", flatten_scores(scores))
        elif kind == "started":
            jobs.record_event(s, a.job_id, self.owner, 0, ATTEMPT_STARTED_KIND, _safe_payload(m[1]))

    # -- ending an attempt -----------------------------------------------------------------

    def _finish(self, a: _Active, outcome: AttemptOutcome) -> None:
        reason = a.stop_reason
        if reason == "lease_lost":
            log.warning("job %s attempt %s ended after losing its lease", a.job_id, a.attempt)
            self._count("lease_lost")
            return
        if outcome.status == "succeeded":
            try:
                self._record_success(a, outcome.result or {})
            except (LeaseLost, IllegalTransition) as e:
                log.warning("job %s: could not record the success: %s", a.job_id, e)
            except Exception as e:  # noqa: BLE001 - unreadable outputs: the job failed
                log.exception("recording the results of job %s failed", a.job_id)
                self._finish_failed(a.job_id, "internal", f"recording results failed: {e}")
            return
        if reason == "cancel":
            # Cancelled cooperatively, force-stopped, or killed while stopping: all CANCELLED.
            self._finish_plain(a.job_id, "cancelled")
            return
        if reason == "timeout":
            self._finish_failed(
                a.job_id,
                "timeout",
                f"attempt {a.attempt} exceeded attempt_timeout_s={self.settings.attempt_timeout_s}",
            )
            return
        if reason == "shutdown":
            self._finish_failed(a.job_id, "infrastructure", "the dispatcher stopped")
            return
        if outcome.status == "cancelled":  # stopped without our asking: treat as a crash
            self._finish_failed(a.job_id, "infrastructure", outcome.message or "stopped")
            return
        self._finish_failed(a.job_id, outcome.failure_class or "internal", outcome.message)

    def _count(self, state: str) -> None:
        self.stats.finished[state] = self.stats.finished.get(state, 0) + 1

    def _ended(self, job_id: str, state: str) -> None:
        """An attempt ended with the job in `state` (committed): count it, and drop the
        checkpoints of a job that is over for good (a RETRYING job resumes from them)."""
        self._count(state)
        self._drop_checkpoints_if_over(job_id, state)

    def _drop_checkpoints_if_over(self, job_id: str, state: str) -> None:
        if state in jobs.TERMINAL:
            shutil.rmtree(self.checkpoint_root / job_id, ignore_errors=True)

    def _finish_plain(self, job_id: str, outcome: Literal["succeeded", "cancelled"]) -> None:
        try:
            with session_scope(self.factory) as s:
                state = jobs.finish_job(s, job_id, self.owner, outcome).state
        except (LeaseLost, IllegalTransition) as e:
            log.warning("job %s: could not finish as %s: %s", job_id, outcome, e)
            return
        self._ended(job_id, state)

    def _finish_failed(self, job_id: str, fclass: str, message: str) -> None:
        try:
            with session_scope(self.factory) as s:
                job = jobs.finish_job(
                    s,
                    job_id,
                    self.owner,
                    "failed",
                    failure_class=fclass,
                    failure_message=message,
                    retryable=fclass in RETRYABLE,
                )
                state = job.state
        except (LeaseLost, IllegalTransition) as e:
            log.warning("job %s: could not record the failure: %s", job_id, e)
            return
        log.info("job %s failed (%s) -> %s", job_id, fclass, state)
        self._ended(job_id, state)

    def _record_success(self, a: _Active, result: dict[str, Any]) -> None:
        out = a.output_dir
        # Read and hash everything before the transaction: the row lock is held briefly.
        emap = json.loads((out / "expert_map.json").read_text())
        files: list[tuple[str, Path]] = [
            ("expert_patch", out / "expert_patch.safetensors"),
            ("expert_map", out / "expert_map.json"),
            ("spec", out / "spec.json"),
            ("result", out / "result.json"),
        ]
        model_dir = out / "model"
        if model_dir.is_dir():
            files += package_model(model_dir, out, self.settings.model_tar_max_bytes)
        hashed = [(kind, p, *file_sha256(p)) for kind, p in files if p.is_file()]
        scores = expert_scores(emap, result.get("selected") or emap.get("selected") or [])
        after = dict(result.get("after") or {})
        for name in ("forget", "retain"):
            ov = _number(result.get(f"routing_overlap_{name}"))
            if ov is not None:
                after.setdefault(name, {})
                if isinstance(after[name], Mapping):
                    after[name] = {**after[name], "routing_overlap": ov}
        with session_scope(self.factory) as s:
            if a.stage != Stage.PACKAGING:
                jobs.set_stage(s, a.job_id, self.owner, Stage.PACKAGING)
                a.stage = Stage.PACKAGING
            jobs.record_model(
                s,
                a.job_id,
                self.owner,
                str(result.get("model", a.spec.model)),
                str(result.get("base_model_sha256", "")),
            )
            jobs.record_event(
                s,
                a.job_id,
                self.owner,
                int(result.get("steps", 0)),
                "result",
                _safe_payload(
                    {
                        "unlearned_model_sha256": result.get("unlearned_model_sha256"),
                        "steps": result.get("steps"),
                        "stopped_by": result.get("stopped_by"),
                        "trainable_parameters": result.get("trainable_parameters"),
                        "tunable_ratio": result.get("tunable_ratio"),
                        "timings_s": result.get("timings_s"),
                    }
                ),
            )
            jobs.record_expert_map(s, a.job_id, self.owner, scores, str(emap.get("method", "")))
            jobs.record_evaluations(
                s, a.job_id, self.owner, "before", flatten_scores(result.get("before") or {})
            )
            jobs.record_evaluations(s, a.job_id, self.owner, "after", flatten_scores(after))
            jobs.record_param_changes(
                s, a.job_id, self.owner, param_changes(result.get("changed") or [])
            )
            for kind, p, sha, size in hashed:
                jobs.record_artifact(
                    s,
                    a.job_id,
                    self.owner,
                    kind=kind,
                    name=p.name,
                    location=str(p),
                    sha256=sha,
                    size=size,
                )
            state = jobs.finish_job(s, a.job_id, self.owner, "succeeded").state
        self._ended(a.job_id, state)

    def _shutdown_active(self) -> None:
        """The dispatcher is stopping: stop its attempts and hand their jobs back
        (RETRYING, class infrastructure) instead of waiting for their leases to expire."""
        for a in self.active:
            self._stop(a, "shutdown")
        deadline = time.monotonic() + self.settings.cancel_grace_s
        for a in self.active:
            while not a.handle.done() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not a.handle.done():
                a.handle.force_stop()
            try:
                outcome = a.handle.outcome() if a.handle.done() else AttemptOutcome("cancelled")
            except Exception:  # noqa: BLE001
                outcome = AttemptOutcome("cancelled")
            a.handle.release()
            if outcome.status == "succeeded":
                a.stop_reason = None  # it finished anyway: keep the work
            self._finish(a, outcome)
        self.active.clear()


# ----------------------------------------------------------------------------- entry


def run_dispatcher(
    settings: Settings | None = None,
    once: bool = False,
    max_jobs: int | None = None,
    stop_event: threading.Event | None = None,
    executor_factory: Callable[[], Executor] | None = None,
    handle_signals: bool = False,
) -> DispatcherStats:
    """What `moe-unlearn dispatcher [--once] [--max-jobs N]` runs: check the database is
    migrated, start (or join) Ray, run the loop, and always shut down what it started.

    once: exit when nothing is queued or running; max_jobs: exit after this dispatcher
    ended that many jobs; stop_event: exit (handing running jobs back as RETRYING) when
    set. handle_signals (the CLI; main thread only): SIGINT and SIGTERM set the stop event
    (installed after ray.init, which replaces the SIGTERM handler with sys.exit).
    Returns what it did (`DispatcherStats`)."""
    settings = settings or get_settings()
    engine = engine_for(settings)
    owns_ray = False
    try:
        check_migrated(engine)
        owns_ray = init_ray(settings)
        if handle_signals and threading.current_thread() is threading.main_thread():
            import signal

            stop_event = stop_event or threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop_event.set())
        executor = (
            executor_factory() if executor_factory else RayTaskExecutor(checkpoint_root(settings))
        )
        d = Dispatcher(settings, make_session_factory(engine), executor)
        return d.run(once=once, max_jobs=max_jobs, stop_event=stop_event)
    finally:
        engine.dispose()
        if owns_ray:
            import ray

            ray.shutdown()


__all__ = [
    "AttemptHandle",
    "AttemptOutcome",
    "Dispatcher",
    "DispatcherStats",
    "Executor",
    "RayTaskExecutor",
    "classify_exception",
    "init_ray",
    "run_dispatcher",
]
