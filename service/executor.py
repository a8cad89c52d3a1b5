"""Where an attempt runs: one Ray task per attempt, its progress channel, the clean-up of a
killed Ray Train run's placement group, and Ray's start-up.

`RayTaskExecutor.start` launches one Ray *task* per attempt, plus one
`workers.progress.ProgressChannel` actor (0 CPUs) that buffers the attempt's typed progress
messages and holds the stop flag. The task runs one of two runners, by
`spec.distributed.uses_ray_train`:
- one worker: `workers.run.run_job` in the task itself, which holds the CPUs;
- several workers or DeepSpeed: the task (0 CPUs) drives a Ray Train `TorchTrainer`
  through `workers.runners.ray_train.run_job_distributed`, whose workers take the CPUs. Its run
  name is the job id and its storage `<checkpoint_dir>/<job id>`, so a retried attempt
  resumes from the last checkpoint; the dispatcher drops the folder when the job ends.
Why a task and not an actor: a task holds its CPUs exactly while it runs and gives them
back when it returns or is killed, `ray.cancel(force=True)` kills its worker process as a
last resort, and every way it can end is an exception that `service.failures.classify`
maps onto a failure class. A killed task takes its trainer along (the controller and
workers are owned by its process), but not the trainer's placement group, which keeps the
CPUs reserved: Ray Train's own clean-up asks Ray's dashboard, which the local Ray runs
without. So the run announces its placement group (`trainer_started` event) and the handle
removes it after a force-stop or a task that died. Ray's own task retries and Ray Train's
in-run restarts are off: retries are the dispatcher's, so each one is a recorded attempt.

Workers never touch the database: the task only talks to its channel. Cancellation is
cooperative first (the pipeline polls the channel's flag every step and at every stage
boundary), then forced by the dispatcher after `cancel_grace_s`.

Test seams (workers/faults.py, unset in production): the variables it names are forwarded
from the dispatcher's environment into the attempt, in `AttemptPlan.seam_env`, and nowhere
else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from service.failures import AttemptOutcome, classify
from service.settings import Settings
from workers.events import TRAINER_STARTED
from workers.faults import injection_env
from workers.planner import device_for_resources, with_device
from workers.progress import AttemptStarted, ChannelReporter, JobEvent, Message, start_channel
from workers.spec import JobSpec

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class AttemptPlan:
    """What one attempt's Ray task needs besides the spec: where it writes, which corpora,
    and, for Ray Train jobs, the run name (the job id: the same name resumes) and storage."""

    output_dir: str
    corpus_paths: dict[str, str]
    run_name: str
    checkpoint_dir: str
    seam_env: dict[str, str] = field(default_factory=dict)  # TEST-ONLY (workers/faults.py)


def _attempt_main(spec_data: dict[str, Any], plan: AttemptPlan, channel: Any) -> AttemptOutcome:
    """Body of the Ray task: run the job (in this process, or on a Ray Train trainer that
    this task drives); every exception becomes an outcome through `classify`."""
    from workers.faults import apply_env

    reporter = ChannelReporter(channel)
    spec = JobSpec.model_validate(spec_data)
    ray_train = spec.distributed.uses_ray_train
    channel.put.remote(
        AttemptStarted(
            pid=os.getpid(),
            host=socket.gethostname()[:128],
            num_workers=spec.distributed.num_workers,
            runner="ray_train" if ray_train else "process",
        )
    )

    def resolve(corpus_id: str) -> Path:
        if corpus_id not in plan.corpus_paths:
            raise ValueError(f"corpus {corpus_id} is not in the service's corpus store")
        return Path(plan.corpus_paths[corpus_id])

    apply_env(plan.seam_env)  # this worker process is reused: exactly this attempt's seams
    try:
        from workers.run import JobCancelled, run_job

        try:
            if ray_train:
                from workers.runners.ray_train import run_job_distributed

                # The trainer's workers hold the CPUs; this task only drives them.
                result = run_job_distributed(
                    spec,
                    plan.output_dir,
                    reporter,
                    reporter.should_stop,
                    plan.checkpoint_dir,
                    resolve,
                    run_name=plan.run_name,
                )
            else:
                import torch

                torch.set_num_threads(spec.distributed.num_workers)  # the CPUs Ray gave us
                result = run_job(spec, plan.output_dir, reporter, resolve, reporter.should_stop)
        except JobCancelled as e:
            return AttemptOutcome("cancelled", message=str(e))
        return AttemptOutcome("succeeded", result=result)
    except Exception as e:  # noqa: BLE001 - every failure is classified, in one place
        return classify(e)
    finally:
        apply_env({})
        try:
            reporter.flush()
        except Exception:  # noqa: BLE001 - the channel may be gone; the outcome still counts
            pass


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
            if isinstance(m, JobEvent) and m.kind == TRAINER_STARTED:
                self.placement_group = m.payload.get("placement_group")
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
            return classify(e)
        if not isinstance(out, AttemptOutcome):
            return AttemptOutcome(
                "failed", failure_class="internal", message=f"bad outcome: {type(out)}"
            )
        return out

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
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(self.placement_group)))
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
        resources = ray.cluster_resources()
        total = resources.get("CPU", 0)
        if workers > total:
            raise ValueError(
                f"distributed.num_workers={workers} needs {workers} CPUs; the Ray cluster "
                f"has {total:g}"
            )
        # `auto` decided before placement, so that a GPU job asks Ray for its GPUs.
        device = device_for_resources(spec.distributed.device, resources)
        spec = with_device(spec, device)
        plan = AttemptPlan(
            output_dir=str(output_dir),
            corpus_paths=dict(corpus_paths),
            run_name=job_id,
            checkpoint_dir=str(self.checkpoint_dir),
            seam_env=injection_env(),
        )
        channel = start_channel()
        # A Ray Train job's task only drives the trainer, whose workers take the CPUs.
        num_cpus = 0 if spec.distributed.uses_ray_train else workers
        num_gpus = 1 if device == "cuda" and not spec.distributed.uses_ray_train else 0
        ref = self._task.options(
            num_cpus=num_cpus, num_gpus=num_gpus, name=f"moe-unlearn-{job_id[:8]}-a{attempt}"
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


__all__ = [
    "AttemptHandle",
    "AttemptPlan",
    "Executor",
    "RayTaskExecutor",
    "RayTaskHandle",
    "checkpoint_root",
    "init_ray",
    "ray_temp_dir",
]
