"""The Ray Train runner: one job on a Ray Train V2 `TorchTrainer` with
`spec.distributed.num_workers` CPU workers (gloo), every rank running the one pipeline
(workers/pipeline.py) with a `RayTrainRunner` strategy:

    barrier / reduce_sum / agree   torch.distributed collectives (gloo)
    shard                          rank r takes rows r, r+W, ... of every global batch
    engine                         torch DDP, or DeepSpeed ZeRO 1/2/3 (runners/deepspeed.py)
    save / restore                 every `distributed.checkpoint_every` steps through
                                   `ray.train.report` under `<storage_path>/<run_name>`; a
                                   later call with the same (run_name, storage_path) (the
                                   dispatcher's next attempt) resumes from the last one.
                                   Batches are a pure function of the step, so a resumed run
                                   trains exactly as an uninterrupted one.

Progress: a workers.progress.ProgressChannel actor that the ranks write to; the driver
drains it from a thread and forwards to its Reporter, and reads rank 0's RunOutcome at the
end. The first event, `trainer_started`, names the run's placement group: a caller that has
to kill the run removes it (Ray Train's own clean-up of a killed run asks Ray's dashboard,
which is often off). Cancellation: the driver polls `should_stop()` and sets the channel's
flag; rank 0 reads it every step and at every stage boundary and every rank stops after the
same step; then JobCancelled.

How the service calls it: from a Ray task (num_cpus=0: the trainer's workers take the
CPUs) with `run_job_distributed(spec, out_dir, reporter, should_stop, storage_path=<shared
checkpoints dir>, corpus_resolver, run_name=<job id>)`; ValueError -> user input,
MemoryError -> out of memory, WorkerFailure -> infrastructure (retry: the next attempt
resumes), JobCancelled -> cancelled. Test seams: workers/faults.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workers import faults
from workers.data import Batch, BatchStream
from workers.devices import out_of_memory_with_plan, resolve_device
from workers.events import TRAINER_STARTED
from workers.job import CorpusResolver, JobCancelled, LoadedJob, Reporter, SilentReporter
from workers.planner import placed_spec
from workers.progress import ChannelReporter, JobEvent, RunOutcome, StageStarted, start_channel
from workers.results import DistributedInfo, JobResult
from workers.runners.base import Engine, PlainEngine, Runner, Training
from workers.spec import DistributedOptions, JobSpec

if TYPE_CHECKING:
    from workers.scope import TrainableScope
    from workers.train import BatchSource

DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/moe-unlearn/torch_extensions"
BARRIER_TIMEOUT_S = 6 * 3600
# How often Ray Train's controller polls the workers (its default: 2 s). A checkpoint's
# report() waits until the controller has taken the previous one, and the end of a run is
# noticed at a poll, so the default cost ~1.5 s per checkpoint (measured: 20 steps with a
# checkpoint every 2 took 15.8 s instead of 0.5 s). A poll is one small call per worker.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.2"
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_EXTENSIONS_DIR")


class WorkerFailure(RuntimeError):
    """A training worker died or raised something that is not a user error (worker crash,
    lost node, a bug). Retryable as infrastructure: the next attempt with the same run name
    resumes from the last checkpoint."""


# --------------------------------------------------------------------------- sharding


def shard_rows(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s rows of a global batch: rows rank, rank+world, ...; a rank left with
    none (a short last batch of an epoch) takes one row again so every rank steps."""
    rows = list(indices)[rank::world]
    return rows or [list(indices)[rank % len(indices)]]


class ShardedStream:
    """A BatchStream's global batch at `step`, restricted to this rank's rows."""

    def __init__(self, stream: BatchStream, rank: int, world: int) -> None:
        self.stream, self.rank, self.world = stream, rank, world

    def batch(self, step: int) -> Batch:
        rows = shard_rows(self.stream.indices(step), self.rank, self.world)
        return self.stream.corpus.collate(rows)


# --------------------------------------------------------------------------- strategy


class RayTrainRunner(Runner):
    """The workers/runners/base.py Runner of one Ray Train rank."""

    def __init__(self, rank: int, world: int, options: DistributedOptions) -> None:
        self.rank, self.world = rank, world
        self.backend = options.backend
        self.zero_stage = options.zero_stage if options.backend == "deepspeed" else 0
        self.checkpoint_every = options.checkpoint_every
        self.own_master_weights = self.zero_stage > 0  # DeepSpeed's bf16 optimizer keeps them
        # Collectives' tensors live here (NCCL reduces CUDA tensors only).
        self.device = resolve_device(options.device)
        # ZeRO-3 gathers each layer's shards as its forward runs: skipping layers is untested.
        self.supports_activation_cache = self.zero_stage != 3
        # ZeRO-3 loads sharded: every stage before training runs on every rank
        self.lockstep = self.zero_stage == 3
        self._numel_per_rank: list[int] = [0] * world
        self._loaded_per_rank: list[int] = []
        self._load_cfg: dict[str, Any] | None = None
        self._fetch: Any = None  # the fetch hooks' engine, until the training engine
        self._sharded_load = False  # loaded under zero.Init (not a patch output's base)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @contextlib.contextmanager
    def loading(self, spec: JobSpec) -> Iterator[None]:
        if not self.lockstep:
            yield
            return
        from workers.devices import resolve_dtype
        from workers.model_source import is_patch_output
        from workers.runners.deepspeed import sharded_load_config, sharded_loading

        tr = spec.training
        dtype = resolve_dtype(tr.dtype, self.device)
        micro = max(1, tr.batch_size // self.world)
        self._load_cfg = sharded_load_config(micro, self.world, tr.grad_clip, dtype)
        if is_patch_output(Path(spec.model)):  # its base is patched as a state dict: whole
            yield
            return
        self._sharded_load = True
        with sharded_loading(self._load_cfg):
            yield

    def loaded(self, model: nn.Module) -> None:
        """Under ZeRO-3: what each rank holds after the load, and the fetch hooks (a model
        loaded whole, such as a patch-only output's base, is partitioned by them here)."""
        if not self.lockstep:
            return
        from workers.runners.deepspeed import open_fetch_hooks

        assert self._load_cfg is not None, "loaded() without loading()"
        held = sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())
        self._loaded_per_rank = self._all_gather_int(held)
        self._fetch = open_fetch_hooks(model, self._load_cfg)

    def agree(self, flags: list[int]) -> list[int]:
        import torch.distributed as dist

        t = torch.tensor(flags, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(x) for x in t]

    def shard(self, source: BatchSource) -> BatchSource:
        assert isinstance(source, BatchStream), "Ray Train shards a BatchStream"
        return ShardedStream(source, self.rank, self.world)

    def engine(self, training: Training) -> Engine:
        model = training.model
        engine: Engine
        if self._fetch is not None:
            from workers.runners.deepspeed import close_fetch_hooks

            close_fetch_hooks(self._fetch)
            self._fetch = None
        if self.zero_stage:
            from workers.runners.deepspeed import make_engine

            engine = make_engine(training, self.zero_stage, self.world)
        else:
            from torch.nn.parallel import DistributedDataParallel

            # gloo on CPU, NCCL on CUDA; frozen tensors are not synced
            ids = [self.device.index] if self.device.type == "cuda" else None
            engine = PlainEngine(DistributedDataParallel(model, device_ids=ids), training)
        # Parameter elements each rank holds (ZeRO-3: its shards, about 1/world of the model).
        local = sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())
        self._numel_per_rank = self._all_gather_int(local)
        return engine

    def _all_gather_int(self, value: int) -> list[int]:
        import torch.distributed as dist

        out = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=self.device))
        return [int(t) for t in out]

    def save(self, engine: Engine, state: dict[str, Any]) -> None:
        """ray.train.report with a checkpoint, on every rank (it is a barrier)."""
        import ray.train

        step = int(state["step"])
        with tempfile.TemporaryDirectory(prefix="moeu-ckpt-") as d:
            folder = Path(d)
            has = self.rank == 0
            if isinstance(engine, PlainEngine):
                if self.rank == 0:
                    named = engine.training.named
                    trainable = {n: p.detach().clone() for n, p in named}
                    torch.save({**state, "trainable": trainable}, folder / "state.pt")
            else:
                client = {k: v for k, v in state.items() if k != "optimizer"}
                engine.save(folder, client, self.rank)  # type: ignore[attr-defined]
                has = True
            faults.checkpoint_seam(self.rank, step)
            ckpt = ray.train.Checkpoint.from_directory(d) if has else None
            ray.train.report({"step": step}, checkpoint=ckpt)

    def restore(self, engine: Engine) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            if not isinstance(engine, PlainEngine):
                return engine.load(Path(d))  # type: ignore[attr-defined]
            state = torch.load(Path(d) / "state.pt", weights_only=False)
            with torch.no_grad():
                for n, p in engine.training.named:
                    p.copy_(state["trainable"][n])
            engine.training.opt.load_state_dict(state["optimizer"])
            return state

    def finish_training(
        self, job: LoadedJob, scope: TrainableScope, pairs: list[tuple[int, int]]
    ) -> TrainableScope | None:
        if self.zero_stage == 3:
            from workers.runners.deepspeed import gathered_onto_main, with_trained_slices

            plain, slices = gathered_onto_main(job.model, self.is_main)  # every rank
            if plain is None:
                return None
            job.model = plain  # the sharded model's storage is freed: one whole model
            # the scope that ran (after an auto fallback: full), not the spec's
            job.adapter, scope = with_trained_slices(plain, scope.scope, pairs, slices)
            return scope
        return scope if self.is_main else None

    def info(self, resumed_from: int) -> DistributedInfo:
        return DistributedInfo(
            num_workers=self.world,
            backend=self.backend,
            zero_stage=self.zero_stage or None,
            resumed_from_step=resumed_from,
            rank0_param_elements=self._numel_per_rank[0],
            param_elements_per_rank=list(self._numel_per_rank),
            sharded_load=self._sharded_load,
            load_param_elements_per_rank=list(self._loaded_per_rank),
        )


# --------------------------------------------------------------------------- worker side


def _train_fn(cfg: dict[str, Any]) -> None:
    """Body of every Ray Train worker: the one pipeline with this rank's strategy."""
    faults.apply_env(cfg["seams"])
    for k, v in cfg["env"].items():
        os.environ.setdefault(k, v)
    import ray.train

    from workers.pipeline import run_pipeline

    torch.set_num_threads(1)  # one CPU per worker (Ray's accounting)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    channel = cfg["channel"]
    rep = ChannelReporter(channel)
    spec = JobSpec.model_validate(cfg["spec"])
    paths: dict[str, str] = cfg["corpus_paths"]
    if rank == 0:
        pg = ray.util.get_current_placement_group()  # announced: see the module docstring
        pg_id = pg.id.hex() if pg else None
        rep.event(TRAINER_STARTED, 0, {"num_workers": world, "placement_group": pg_id})
    try:
        with out_of_memory_with_plan(spec):
            res = run_pipeline(
                spec,
                cfg["output_dir"],
                RayTrainRunner(rank, world, spec.distributed),
                rep,
                lambda corpus_id: Path(paths[corpus_id]),
                rep.should_stop if rank == 0 else None,
            )
        outcome = RunOutcome("succeeded", res.steps if res is not None else 0)
    except JobCancelled as e:
        outcome = RunOutcome("cancelled", e.step)
    except BaseException as e:
        if rank == 0:
            channel.set_outcome.remote(RunOutcome("failed", message=f"{type(e).__name__}: {e}"))
        raise
    if rank == 0:
        ray.get(channel.set_outcome.remote(outcome))
    else:
        rep.flush()  # its rank events reach the channel before the run ends


# --------------------------------------------------------------------------- driver side


def run_job_distributed(
    spec: JobSpec,
    output_dir: str | Path,
    reporter: Reporter | None,
    should_stop: Callable[[], bool] | None,
    storage_path: str | Path,
    corpus_resolver: CorpusResolver | None = None,
    *,
    run_name: str | None = None,
    max_failures: int = 0,
    poll_s: float = 0.2,
) -> JobResult:
    """Run one job on `spec.distributed.num_workers` Ray Train workers; returns the same
    JobResult as workers.run.run_job, with `distributed` filled.

    Needs `ray.init()` done by the caller. run_name: the job id (checkpoints live under
    storage_path/run_name; the same name resumes, so never reuse one for another job);
    None = a fresh name. max_failures: Ray Train's in-run restarts (0: a worker failure
    raises WorkerFailure and the caller's next attempt resumes). Raises ValueError for
    user errors (also when raised on a worker), JobCancelled, WorkerFailure."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("run_job_distributed needs ray.init() first")
    spec = placed_spec(spec, ray.cluster_resources())  # every rank sees the decision
    n, cuda = spec.distributed.num_workers, spec.distributed.device == "cuda"
    # corpus_id -> local path, resolved here: workers get a plain mapping.
    corpus_paths: dict[str, str] = {}
    for ref in (spec.forget, spec.retain):
        if ref is not None and ref.corpus_id is not None:
            if corpus_resolver is None:
                raise ValueError("corpus_id needs the service's corpus store (use a path instead)")
            corpus_paths[ref.corpus_id] = str(corpus_resolver(ref.corpus_id))
    out_dir = Path(output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = str(storage_path)
    if "://" not in storage:  # a local / shared-filesystem path (else a URI, e.g. s3://)
        local = Path(storage).expanduser().resolve()
        local.mkdir(parents=True, exist_ok=True)
        storage = str(local)
    name = run_name or f"moe-unlearn-{uuid.uuid4().hex[:12]}"
    rep = reporter or SilentReporter()

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(DEFAULT_TORCH_EXTENSIONS_DIR))
    env.setdefault("HF_HUB_OFFLINE", "1")
    channel = start_channel()
    config = {
        "spec": spec.resolved(),
        "output_dir": str(out_dir),
        "corpus_paths": corpus_paths,
        "channel": channel,
        "env": env,
        "seams": faults.injection_env(),
    }
    # Read from this process's environment and passed on to the controller (a value the
    # operator set wins).
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=n,
            use_gpu=cuda,
            resources_per_worker={"CPU": 1, "GPU": 1} if cuda else {"CPU": 1},
        ),
        # Long: ranks wait at a barrier while rank 0 evaluates (lm-eval tasks can take hours).
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo", timeout_s=BARRIER_TIMEOUT_S),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )

    stop_pump = threading.Event()

    def forward(messages: list[Any]) -> None:
        for m in messages:
            try:
                if isinstance(m, StageStarted):
                    rep.stage(m.name)
                elif isinstance(m, JobEvent):
                    rep.event(m.kind, m.step, m.payload)
            except Exception:  # noqa: BLE001 - a reporter may raise to ask for a stop
                channel.request_stop.remote()

    def pump() -> None:
        while True:
            try:
                forward(ray.get(channel.drain.remote()))
            except ray.exceptions.RayError:  # the channel is gone: the run is ending anyway
                return
            if should_stop is not None:
                try:
                    stop = should_stop()
                except Exception:  # noqa: BLE001 - same as above
                    stop = True
                if stop:
                    channel.request_stop.remote()
            if stop_pump.wait(poll_s):
                return

    thread = threading.Thread(target=pump, name=f"progress-{name}", daemon=True)
    thread.start()
    error: BaseException | None = None
    try:
        trainer.fit()
    except BaseException as e:  # noqa: BLE001 - SIGINT surfaces as SystemExit; re-raised below
        error = e
    finally:
        stop_pump.set()
        thread.join()
        forward(ray.get(channel.drain.remote()))
        outcome = ray.get(channel.outcome.remote())
        ray.kill(channel)
    if isinstance(error, KeyboardInterrupt | SystemExit):
        raise error
    if error is not None:
        user = _user_error(error)
        if user is not None:
            raise user from error
        raise WorkerFailure(f"{type(error).__name__}: {error}"[:4000]) from error
    if outcome is not None and outcome.status == "cancelled":
        raise JobCancelled(outcome.step)
    if outcome is None or outcome.status != "succeeded":
        raise WorkerFailure(f"the workers ended without a result: {outcome}")
    return JobResult.read(out_dir)


def _user_error(error: BaseException) -> BaseException | None:
    """A ValueError / MemoryError raised by a worker, dug out of Ray Train's wrappers (so
    the caller's failure classes see the engine's own exception type)."""
    from ray.exceptions import OutOfMemoryError

    failures = getattr(error, "worker_failures", None) or {}
    seen: list[BaseException] = []
    todo: list[BaseException] = [*failures.values(), error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, ValueError):
            return ValueError(str(e))
        if isinstance(e, MemoryError | torch.OutOfMemoryError | OutOfMemoryError):
            return MemoryError(str(e))
        for attr in ("cause", "__cause__", "controller_failure"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return None


__all__ = [
    "CONTROLLER_POLL_ENV",
    "CONTROLLER_POLL_S",
    "RayTrainRunner",
    "WorkerFailure",
    "run_job_distributed",
    "shard_rows",
]
