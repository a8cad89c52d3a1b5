"""One unlearning job on a Ray Train V2 `TorchTrainer` with `spec.distributed.num_workers`
CPU workers (gloo): the stages of workers/run.py, split across ranks.

    every rank   load the model and corpora (rank 0 first: the demo world is built once)
    rank 0       evaluate before (others wait at a barrier)
    all ranks    attribution, sharded: rank r scores calibration batches r, r+W, ...; the
                 per-layer mass / frequency sums and the sequence / token counts are summed
                 with all_reduce, then every rank builds the same ExpertMap (equal to the
                 single-process map up to float64 summation order) and selects the same
                 experts
    all ranks    SEUF training, data parallel: each rank takes its share of every global
                 batch (rows r, r+W, ... of BatchStream.batch(step)); backend "ddp" (torch
                 DDP, gloo) or "deepspeed" (ZeRO 1/2/3 from workers/deepspeed_configs/, a client
                 torch AdamW over the trainable tensors only)
    rank 0       evaluate after and package (ZeRO-3: the trained tensors are gathered on
                 every rank, then rank 0 copies them into a freshly loaded plain model)

Checkpoints: every `distributed.checkpoint_every` steps through `ray.train.report` under
`<storage_path>/<run_name>`; a later call with the same (run_name, storage_path) (the
dispatcher's next attempt of the same job) resumes from the last checkpoint. Batches are a
pure function of the step, so a resumed run trains exactly as an uninterrupted one.

Progress: a 0-CPU actor (`ProgressSink`) that rank 0 writes ("stage", name) and
("event", kind, step, payload) messages to (the dispatcher's message format); the driver
drains it from a thread and forwards to the Reporter. The first event, `trainer_started`,
names the run's placement group: a caller that has to kill the run removes it (Ray Train's
own clean-up of a killed run asks Ray's dashboard, which is often off).

Cancellation: the driver polls `should_stop()` and sets the sink's flag; rank 0 reads it
every step and the flag is all-reduced, so every rank stops after the same step; then
`JobCancelled`.

Activation cache (training.activation_cache): per rank, with DDP and ZeRO-1/2; off under
ZeRO-3 (its per-layer parameter gathering with skipped layers is untested).

How the service calls it: from a Ray task (num_cpus=0: the trainer's workers take the
CPUs) with `run_job_distributed(spec, out_dir, reporter, reporter.should_stop,
storage_path=<shared checkpoints dir>, corpus_resolver, run_name=<job id>)`; map
ValueError -> user input, MemoryError -> out of memory, WorkerFailure -> infrastructure
(retry: the next attempt resumes), JobCancelled -> cancelled.

TEST-ONLY failure injection (workers/faults.py): with MOE_UNLEARN_FAIL_AT_STEP=k and
MOE_UNLEARN_FAIL_MARKER=path set in the DRIVER's environment, the last rank kills its own
process after step k, the first time only. Never set them in production.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.attribution import ExpertMap, _accumulate, diagnose, resolve_method
from workers.attribution import rank as rank_experts
from workers.data import Batch, BatchStream
from workers.deepspeed_configs import load_deepspeed_config
from workers.events import RESUMED, TRAINER_STARTED
from workers.faults import FAIL_AT_ENV, FAIL_MARKER_ENV, kill_self_once
from workers.moe.base import MoEAdapter
from workers.run import (
    OVERLAP_SAMPLES,
    CorpusResolver,
    JobCancelled,
    LoadedJob,
    Reporter,
    SilentReporter,
    _scalars,
    _snapshot,
    _stop_check,
    _tokenized,
    attribution_batches,
    evaluate,
    load_job,
    write_outputs,
)
from workers.spec import JobSpec

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
    lost node, injected failure, a bug). Retryable as infrastructure: the next attempt with
    the same run name resumes from the last checkpoint."""


class ProgressSink:
    """0-CPU Ray actor between the ranks and the driver: ordered progress messages, the
    cancel flag, and how the run ended (set by rank 0)."""

    def __init__(self) -> None:
        self._items: list[tuple[Any, ...]] = []
        self._cancel = False
        self._outcome: dict[str, Any] = {}

    def put(self, item: tuple[Any, ...]) -> None:
        self._items.append(item)

    def drain(self) -> list[tuple[Any, ...]]:
        items, self._items = self._items, []
        return items

    def cancel(self) -> None:
        self._cancel = True

    def is_cancelled(self) -> bool:
        return self._cancel

    def set_outcome(self, outcome: dict[str, Any]) -> None:
        self._outcome = outcome

    def outcome(self) -> dict[str, Any]:
        return self._outcome


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
) -> dict[str, Any]:
    """Run one job on `spec.distributed.num_workers` Ray Train workers; returns run_job's
    result dict (+ "distributed": num_workers, backend, zero_stage, resumed_from_step,
    rank0_param_elements = parameter elements rank 0 held while training).

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
    dist_opts = spec.distributed
    n = dist_opts.num_workers
    total = ray.cluster_resources().get("CPU", 0)
    if n > total:
        raise ValueError(
            f"distributed.num_workers={n} needs {n} CPUs; the Ray cluster has {total:g}"
        )
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
    fail_at = os.environ.get(FAIL_AT_ENV)
    sink = ray.remote(num_cpus=0, max_restarts=0)(ProgressSink).remote()
    config = {
        "spec": spec.resolved(),
        "output_dir": str(out_dir),
        "corpus_paths": corpus_paths,
        "sink": sink,
        "env": env,
        "fail_at": int(fail_at) if fail_at else None,
        "fail_marker": os.environ.get(FAIL_MARKER_ENV),
    }
    # Read from this process's environment and passed on to the controller (a value the
    # operator set wins).
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=False),
        # Long: ranks wait at a barrier while rank 0 evaluates (lm-eval tasks can take hours).
        torch_config=TorchConfig(backend="gloo", timeout_s=BARRIER_TIMEOUT_S),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )

    stop_pump = threading.Event()

    def forward(messages: list[tuple[Any, ...]]) -> None:
        for m in messages:
            try:
                if m[0] == "stage":
                    rep.stage(m[1])
                elif m[0] == "event":
                    rep.event(m[1], m[2], m[3])
            except Exception:  # noqa: BLE001 - a reporter may raise to ask for a stop
                sink.cancel.remote()

    def pump() -> None:
        while True:
            try:
                forward(ray.get(sink.drain.remote()))
            except ray.exceptions.RayError:  # the sink is gone: the run is ending anyway
                return
            if should_stop is not None:
                try:
                    stop = should_stop()
                except Exception:  # noqa: BLE001 - same as above
                    stop = True
                if stop:
                    sink.cancel.remote()
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
        forward(ray.get(sink.drain.remote()))
        outcome = ray.get(sink.outcome.remote())
        ray.kill(sink)
    if isinstance(error, KeyboardInterrupt | SystemExit):
        raise error
    if error is not None:
        user = _user_error(error)
        if user is not None:
            raise user from error
        raise WorkerFailure(f"{type(error).__name__}: {error}"[:4000]) from error
    if outcome.get("status") == "cancelled":
        raise JobCancelled(int(outcome.get("step", 0)))
    if outcome.get("status") != "succeeded":
        raise WorkerFailure(f"the workers ended without a result: {outcome}")
    return json.loads((out_dir / "result.json").read_text())


def _user_error(error: BaseException) -> BaseException | None:
    """A ValueError / MemoryError raised by a worker, dug out of Ray Train's wrappers (so
    the caller's failure classes see the engine's own exception type)."""
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
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return MemoryError(str(e))
        for attr in ("cause", "__cause__", "controller_failure"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return None


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


def budget_prefix(batches: Sequence[Batch], token_budget: int) -> list[Batch]:
    """The batches single-process attribution reads: up to and including the one whose
    non-pad tokens bring the running count to `token_budget` (see attribution._accumulate)."""
    out, tokens = [], 0
    for b in batches:
        out.append(b)
        tokens += int(b["attention_mask"].sum())
        if tokens >= token_budget:
            break
    return out


def attribute_sharded(
    model: nn.Module,
    adapter: MoEAdapter,
    forget_batches: Sequence[Batch],
    retain_batches: Sequence[Batch] | None,
    *,
    method: str,
    token_budget: int,
    rank: int,
    world: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> ExpertMap:
    """workers.attribution.attribute(..., at_loss_positions=True) with the calibration
    batches split across ranks and the accumulators summed by `all_reduce_sum` (in place
    on a float64 tensor). Every rank returns the same map."""
    m = resolve_method(method, retain_batches is not None)
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    layers = adapter.moe_layer_indices()

    def side(batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        mine = budget_prefix(batches, token_budget)[rank::world]
        acc = _accumulate(model, adapter, mine, layers, 2**62, True)
        counts = torch.tensor([acc.sequences, acc.tokens], dtype=torch.float64)
        flat = torch.cat([acc.mass.flatten(), acc.freq.flatten(), counts])
        flat = all_reduce_sum(flat)
        k = acc.mass.numel()
        mass = flat[:k].view_as(acc.mass)
        freq = flat[k : 2 * k].view_as(acc.freq)
        return mass, freq, int(flat[2 * k]), int(flat[2 * k + 1])

    f_mass, f_freq, f_seq, f_tokens = side(forget_batches)
    if f_seq == 0:
        raise ValueError("the forget batches hold no usable tokens (empty, or no loss positions)")
    f_mass, f_freq = f_mass / f_seq, f_freq / f_seq
    r_mass: torch.Tensor | None = None
    r_tokens = 0
    if retain_batches is not None:
        r_sum, _, r_seq, r_tokens = side(retain_batches)
        if r_seq == 0:
            raise ValueError("the retain batches hold no usable tokens")
        r_mass = r_sum / r_seq
    if m == "affinity":
        scores = f_mass
    elif m == "frequency":
        scores = f_freq
    else:
        assert r_mass is not None
        scores = f_mass - r_mass
    emap = ExpertMap(
        method=m,
        layers=layers,
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        scores=scores.tolist(),
        forget_mass=f_mass.tolist(),
        forget_frequency=f_freq.tolist(),
        retain_mass=None if r_mass is None else r_mass.tolist(),
        tokens=f_tokens,
        sequences=f_seq,
        retain_tokens=r_tokens,
        positions="loss",
    )
    emap.ranking = rank_experts(emap)
    emap.diagnostics = diagnose(emap)
    return emap


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(stage: int, micro_batch: int, world: int, grad_clip: float) -> dict[str, Any]:
    """The shipped workers/deepspeed_configs/zero{2,3}.json (stage 1: zero2.json), with
    the batch sizes and clipping of this job made concrete."""
    cfg = load_deepspeed_config(stage)  # package data: workers/deepspeed_configs/
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch * world
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["zero_allow_untested_optimizer"] = True  # the client torch AdamW: nothing to compile
    return cfg


# --------------------------------------------------------------------------- worker side


class _Rank0:
    """Progress from rank 0 only (the others are silent), plus stage timings."""

    def __init__(self, sink: Any, rank: int) -> None:
        self.sink, self.rank = sink, rank
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings:
            self.timings[list(self.timings)[-1]] = round(now - self._clock, 3)
        self._clock = now
        self.timings[name] = 0.0
        if self.rank == 0 and name != "done":
            self.sink.put.remote(("stage", name))

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if self.rank == 0:
            self.sink.put.remote(("event", kind, int(step), payload))


def _train_fn(cfg: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    for k, v in cfg["env"].items():
        os.environ.setdefault(k, v)
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sink = cfg["sink"]
    try:
        outcome = _run_rank(cfg, rank, world, sink)
    except BaseException as e:
        if rank == 0:
            sink.set_outcome.remote({"status": "failed", "message": f"{type(e).__name__}: {e}"})
        raise
    if rank == 0:
        ray.get(sink.set_outcome.remote(outcome))


def _run_rank(cfg: dict[str, Any], rank: int, world: int, sink: Any) -> dict[str, Any]:
    import ray
    import ray.train
    import torch.distributed as dist

    from workers.activation_cache import build_for_training
    from workers.patch import state_sha256
    from workers.routing import collect_topk, routing_overlap
    from workers.scope import apply_scope
    from workers.selection import select_experts

    torch.set_num_threads(1)  # one CPU per worker (Ray's accounting)
    spec = JobSpec.model_validate(cfg["spec"])
    tr, dopts = spec.training, spec.distributed
    out_dir = Path(cfg["output_dir"])
    paths: dict[str, str] = cfg["corpus_paths"]
    rep = _Rank0(sink, rank)

    def resolve(corpus_id: str) -> Path:
        return Path(paths[corpus_id])

    def sum_(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    pg = ray.util.get_current_placement_group()  # announced: see the module docstring
    rep.event(
        TRAINER_STARTED, 0, {"num_workers": world, "placement_group": pg.id.hex() if pg else None}
    )
    rep.stage("loading")
    job: LoadedJob | None = None
    if rank == 0:
        job = load_job(spec, resolve)  # first: a demo world is built (and cached) once
    dist.barrier()
    if job is None:
        job = load_job(spec, resolve)
    model, adapter = job.model, job.adapter
    forget_train = _tokenized(job, job.forget_records, spec.objective.loss_tokens)
    retain_train = (
        _tokenized(job, job.retain_records, spec.objective.loss_tokens)
        if job.retain_records is not None
        else None
    )
    base_sha = state_sha256(model.state_dict()) if rank == 0 else ""

    rep.stage("evaluating_before")
    before: dict[str, Any] = {}
    if rank == 0:
        before = evaluate(job, forget_train, retain_train)
        rep.event("evaluation", 0, {"phase": "before", **_scalars(before)})
    n_probe = max(1, OVERLAP_SAMPLES // tr.batch_size)
    probe_forget = forget_train.in_order(tr.batch_size)[:n_probe]
    probe_retain = retain_train.in_order(tr.batch_size)[:n_probe] if retain_train else None
    topk_forget = collect_topk(model, adapter, probe_forget)  # every rank measures overlap
    topk_retain = collect_topk(model, adapter, probe_retain) if rank == 0 and probe_retain else None
    dist.barrier()

    rep.stage("attribution")
    f_batches, r_batches = attribution_batches(job)
    with torch.no_grad():
        emap = attribute_sharded(
            model,
            adapter,
            f_batches,
            r_batches,
            method=spec.seuf.attribution,
            token_budget=spec.seuf.token_budget,
            rank=rank,
            world=world,
            all_reduce_sum=sum_,
        )
    selected = select_experts(emap, spec.seuf) if spec.scope != "full" else []
    pairs = [(s.layer, s.expert) for s in selected]
    rep.event(
        "experts_selected", 0, {"method": emap.method, "selected": [s._asdict() for s in selected]}
    )

    rep.stage("unlearning")
    from workers.objectives import objective_from_spec, prepare_reference

    layers = adapter.moe_layers()
    scope = apply_scope(model, adapter, spec.scope, pairs)
    probe_adapter = scope.adapter or adapter
    touched = sorted({r.name for r in scope.regions})
    before_state = _snapshot(model, touched) if rank == 0 else {}
    counts = (scope.trainable_params, scope.total_params, scope.ratio)  # before ZeRO-3 shards
    expert_dims = scope.expert_dims()
    named = scope.named_trainable()
    params = [p for _, p in named]
    objective = objective_from_spec(spec, adapter, pairs, layers=layers)
    prepare_reference(objective, model, forget_train, retain_train, seed=tr.seed)
    stop_check = _stop_check(job, forget_train)

    deepspeed_stage = dopts.zero_stage if dopts.backend == "deepspeed" else 0
    cache, cache_info = None, None
    # ZeRO-3 gathers each layer's shards as its forward runs: skipping layers is untested.
    if tr.activation_cache and deepspeed_stage != 3:
        corpora = [c for c in (forget_train, retain_train) if c is not None]
        cache, plan = build_for_training(
            model,
            probe_adapter,
            objective,
            corpora,
            batch_size=tr.batch_size,
            max_bytes=tr.activation_cache_max_mb * 2**20,
            spill_dir=None,  # the cache makes (and removes) its own temp folder
        )
        if cache is not None:
            cache_info = {
                "layer": plan.layer,
                "samples": plan.cached_samples,
                "memory_bytes": plan.memory_bytes,
                "disk_bytes": plan.disk_bytes,
            }

    opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    engine: Any = None
    if deepspeed_stage:
        import deepspeed

        from workers.scope import deepspeed_config_for

        if deepspeed_stage == 3:
            model.enable_input_require_grads()  # frozen base: backward fails without it
        ds_cfg = deepspeed_config_for(
            scope,
            deepspeed_config(deepspeed_stage, max(1, tr.batch_size // world), world, tr.grad_clip),
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_cfg, dist_init_required=False
        )
        wrapped: nn.Module = engine
    else:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)  # gloo; frozen tensors are not synced

    # Parameter elements this rank holds (ZeRO-3: its shards, about 1/world of the model).
    local_numel = sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())
    start = _resume(ray.train.get_checkpoint(), engine, opt, named, pairs)
    if start:
        rep.event(RESUMED, start, {"from_step": start})

    fs = ShardedStream(BatchStream(forget_train, tr.batch_size, tr.seed), rank, world)
    rs = (
        ShardedStream(BatchStream(retain_train, tr.batch_size, tr.seed + 1), rank, world)
        if retain_train is not None
        else None
    )
    uses_retain = objective.definition.uses_retain and rs is not None
    targets = {
        "forget_accuracy": tr.stop.forget_accuracy_target,
        "forget_loss": tr.stop.forget_loss_target,
    }
    codes = ["", "forget_accuracy", "forget_loss", "non_finite_loss", "callback"]
    from contextlib import nullcontext

    from workers.objectives import Batches
    from workers.train import _target_reached, lr_factor

    step, stopped_by, overlap = start, "max_steps", None
    while step < tr.max_steps:
        if cfg["fail_at"] is not None and step == cfg["fail_at"] and rank == world - 1:
            kill_self_once(Path(cfg["fail_marker"] or out_dir / ".injected-failure"), step)
        batches = Batches(fs.batch(step), rs.batch(step) if uses_retain else None)  # type: ignore[union-attr]
        cached = cache.active(model, probe_adapter) if cache is not None else nullcontext()
        wrapped.train()
        with cached:
            outputs = objective.forward(wrapped, batches)
        loss, parts = objective(outputs, batches)
        # Every rank must agree before the (collective) backward.
        finite = torch.tensor([0 if torch.isfinite(loss) else 1], dtype=torch.int64)
        dist.all_reduce(finite, op=dist.ReduceOp.MAX)
        if int(finite[0]):
            stopped_by = "non_finite_loss"
            break
        lr = tr.lr * lr_factor(step, tr)
        for g in opt.param_groups:
            g["lr"] = lr
        if engine is not None:
            engine.backward(loss)
            engine.step()
            gn = engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = tr.grad_clip if tr.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            opt.step()
        step += 1

        inner = model  # plain forward (no DDP buffer sync); ZeRO-3 hooks still gather
        if step % tr.stop.eval_every == 0 or step == tr.max_steps:
            overlap = routing_overlap(inner, probe_adapter, probe_forget, topk_forget)
        checked: dict[str, float] = {}
        if stop_check is not None and step % tr.stop.eval_every == 0:
            checked = dict(stop_check(inner))
        flags = torch.zeros(2, dtype=torch.int64)
        if rank == 0:
            reached = _target_reached(checked, targets) if checked else None
            flags[0] = codes.index(reached) if reached else 0
            flags[1] = int(bool(ray.get(sink.is_cancelled.remote())))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # rank 0 decides for everyone
        if flags[1]:
            stopped_by = "callback"
        elif flags[0]:
            stopped_by = codes[int(flags[0])]
        rep.event(
            "step",
            step,
            {
                "step": step,
                "loss": float(loss.detach()),
                "parts": parts,
                "lr": lr,
                "grad_norm": grad_norm,
                "overlap": overlap,
                "metrics": checked,
                "rank_batch": len(batches.forget["index"]),
            },
        )
        if step % dopts.checkpoint_every == 0 and step < tr.max_steps and stopped_by == "max_steps":
            _checkpoint(engine, opt, named, pairs, step, rank)
        if stopped_by != "max_steps":
            break
    model.eval()
    if cache is not None:
        cache_info = {**(cache_info or {}), "hits": cache.stats.hits, "misses": cache.stats.misses}
        cache.close()

    if stopped_by == "callback":
        return {"status": "cancelled", "step": step}

    # The trained tensors, whole, on every rank (ZeRO-3: gathered, a collective).
    if deepspeed_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            trained = {n: p.detach().clone() for n, p in named}
    else:
        trained = {n: p.detach().clone() for n, p in named}
    if rank != 0:
        return {"status": "done"}

    if deepspeed_stage == 3:
        # The engine's model holds empty shards: continue on a fresh plain copy.
        job.model = _fresh_model(job.model_ref)
        job.adapter = _adapter_of(job.model)
        scope = apply_scope(job.model, job.adapter, spec.scope, pairs)
        fresh = dict(scope.named_trainable())
        with torch.no_grad():
            for n, t in trained.items():
                fresh[n].copy_(t)
    scope.bake()
    model, adapter = job.model, job.adapter
    model.eval()

    rep.stage("evaluating_after")
    after = evaluate(job, forget_train, retain_train)
    rep.event("evaluation", step, {"phase": "after", **_scalars(after)})
    overlap_forget = routing_overlap(model, adapter, probe_forget, topk_forget)
    overlap_retain = (
        routing_overlap(model, adapter, probe_retain, topk_retain)
        if probe_retain and topk_retain is not None
        else None
    )

    rep.stage("packaging")

    def close_timings() -> dict[str, float]:
        rep.stage("done")
        rep.timings.pop("done")
        return rep.timings

    res = write_outputs(
        job,
        out_dir,
        emap=emap,
        selected=selected,
        before=before,
        after=after,
        overlap_forget=overlap_forget,
        overlap_retain=overlap_retain,
        before_state=before_state,
        expert_dims=expert_dims,
        base_sha=base_sha,
        counts=counts,
        steps=step,
        stopped_by=stopped_by,
        cache_info=cache_info,
        close_timings=close_timings,
    )
    res["distributed"] = {
        "num_workers": world,
        "backend": dopts.backend,
        "zero_stage": deepspeed_stage or None,
        "resumed_from_step": start,
        "rank0_param_elements": local_numel,
    }
    (out_dir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return {"status": "succeeded", "step": step}


def _fresh_model(model_ref: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32).eval()


def _adapter_of(model: nn.Module) -> MoEAdapter:
    from workers.moe import get_adapter

    return get_adapter(model)


def _checkpoint(
    engine: Any,
    opt: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    pairs: list[tuple[int, int]],
    step: int,
    rank: int,
) -> None:
    """ray.train.report with a checkpoint, on every rank (it is a barrier)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="moeu-ckpt-") as d:
        meta = {"step": step, "selected": [list(p) for p in pairs]}
        has = rank == 0
        if engine is not None:
            # Collective: each rank writes its own shard files; Ray merges the rank folders.
            engine.save_checkpoint(
                str(Path(d) / "ds"), tag="ckpt", client_state=meta, exclude_frozen_parameters=True
            )
            latest = Path(d) / "ds" / "latest"
            if rank != 0 and latest.exists():
                latest.unlink()  # rank 0 writes it; avoid a clash in the merged folder
            has = True
        elif rank == 0:
            state = {
                "trainable": {n: p.detach().clone() for n, p in named},
                "optimizer": opt.state_dict(),
                **meta,
            }
            torch.save(state, Path(d) / "state.pt")
        if rank == 0:
            (Path(d) / "meta.json").write_text(json.dumps(meta))
        ckpt = ray.train.Checkpoint.from_directory(d) if has else None
        ray.train.report({"step": step}, checkpoint=ckpt)


def _resume(
    ckpt: Any,
    engine: Any,
    opt: torch.optim.Optimizer,
    named: list[tuple[str, nn.Parameter]],
    pairs: list[tuple[int, int]],
) -> int:
    """Load the last checkpoint of this run (if any); returns the step to start at."""
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        meta = json.loads((Path(d) / "meta.json").read_text())
        if [tuple(p) for p in meta["selected"]] != pairs:
            raise RuntimeError(
                f"checkpoint selected {meta['selected']} but this attempt selected {pairs}"
            )
        if engine is not None:
            _, client = engine.load_checkpoint(
                str(Path(d) / "ds"), tag="ckpt", load_module_strict=False
            )
            return int(client["step"])
        state = torch.load(Path(d) / "state.pt", weights_only=False)
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["trainable"][n])
        opt.load_state_dict(state["optimizer"])
        return int(state["step"])


__all__ = [
    "ProgressSink",
    "WorkerFailure",
    "attribute_sharded",
    "budget_prefix",
    "deepspeed_config",
    "run_job_distributed",
    "shard_rows",
]
