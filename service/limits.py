"""Load limits for remote clients (issue 14): per-key request rate, per-tenant open event
streams and unfinished jobs, and the submit-time check that a job fits the cluster.

The rate and stream counters live in the API process (each replica counts its own: with
N replicas a tenant gets N times the limits; the queue limit is in the database and
global). Refusals raise `Throttled` (HTTP 429 with `Retry-After`) or `SpecRejected` (422).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import ServiceError, SpecRejected
from service.settings import Settings
from service.tables import Job
from workers.spec import JobSpec

UNFINISHED = ("QUEUED", "RUNNING", "CANCELLING", "RETRYING")


class Throttled(ServiceError):
    """Too many requests, streams or queued jobs: HTTP 429 with `Retry-After`."""

    def __init__(self, field: str, reason: str, retry_after: int) -> None:
        super().__init__(field, reason)
        self.retry_after = max(1, int(retry_after))


class RateLimiter:
    """A token bucket per API key: `rate` requests per second sustained, `burst` at once.
    Keys are evicted least-recently-used beyond `max_keys` (memory stays bounded)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> None:
        """Spend one token of `key`, or raise `Throttled` with the seconds until one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / self.rate)
                raise Throttled(
                    "Authorization", f"over the rate of {self.rate:g} requests/s for this key", wait
                )
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)


class StreamSlots:
    """Open event streams per tenant, at most `limit` at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def acquire(self, tenant: str) -> None:
        with self._lock:
            n = self._open.get(tenant, 0)
            if n >= self.limit:
                raise Throttled(
                    "Accept", f"{n} event streams already open for this tenant (limit)", 5
                )
            self._open[tenant] = n + 1

    def release(self, tenant: str) -> None:
        with self._lock:
            n = self._open.get(tenant, 0) - 1
            if n > 0:
                self._open[tenant] = n
            else:
                self._open.pop(tenant, None)

    def count(self, tenant: str) -> int:
        with self._lock:
            return self._open.get(tenant, 0)

    def total(self) -> int:
        with self._lock:
            return sum(self._open.values())


def check_queue(session: Session, tenant: str, settings: Settings) -> None:
    """Refuse a new job when the tenant already has `max_queued_jobs` unfinished ones.

    Counts at most the limit: the answer is the same, and the cost of a submit stays bounded
    by the limit, not by the tenant's backlog. The (tenant, state) index makes it an
    index-only count (migration 0005; it read every job row of the tenant, ~1 ms per
    thousand jobs on SQLite)."""
    unfinished = (
        select(Job.state)  # a column of the index: no table read
        .where(Job.tenant == tenant, Job.state.in_(UNFINISHED))
        .limit(settings.max_queued_jobs)
        .subquery()
    )
    n = session.execute(select(func.count()).select_from(unfinished)).scalar_one()
    if n >= settings.max_queued_jobs:
        raise Throttled(
            "request",
            f"{n} unfinished jobs of this tenant: the limit is {settings.max_queued_jobs}; "
            "retry when one has finished",
            30,
        )


def cluster_cpus(settings: Settings) -> int:
    return settings.cluster_cpus or settings.ray_num_cpus


def check_fit(spec: JobSpec, settings: Settings) -> None:
    """Refuse (422, with the numbers) a job that cannot run on the cluster: workers and
    CPUs (one each), GPUs, and a demo world seed beyond
    `max_world_seed` (each new seed is a minutes-long world build)."""
    workers = spec.distributed.num_workers
    cpus = cluster_cpus(settings)
    if workers > cpus:
        raise SpecRejected(
            "distributed.num_workers",
            f"{workers} workers need {workers} CPUs; the cluster offers {cpus}",
        )
    # A cuda job takes one GPU per worker (auto: the dispatcher decides from the cluster).
    gpus = workers if spec.distributed.device == "cuda" else 0
    if gpus > settings.cluster_gpus:
        raise SpecRejected(
            "distributed.device",
            f"cuda with {workers} workers needs {gpus} GPUs; the cluster offers "
            f"{settings.cluster_gpus}",
        )
    if spec.model == "demo" and spec.world.seed > settings.max_world_seed:
        raise SpecRejected(
            "world.seed",
            f"{spec.world.seed} is over this server's limit of {settings.max_world_seed}",
        )


def _model_config(session: Session, spec: JobSpec) -> dict[str, Any] | None:
    """config.json of the job's model as the runner will load it: a registered directory,
    the output of `job:<id>` (a patch-only one's base), or a hub id at its revision already
    in this server's hub cache. None where none can be read here (the worker then plans
    for itself and reports out_of_memory)."""
    from service import models
    from workers.model_source import is_patch_output, read_base_ref
    from workers.planner import read_config

    try:
        ref, revision = models.runner_source(session, spec.model, spec.revision)
        for _ in range(64):  # a patch-only output's config is its base's (a bounded walk)
            if not is_patch_output(Path(ref)):
                break
            base = read_base_ref(Path(ref))
            ref, revision = base["model"], base["revision"]
    except ValueError:
        return None
    if (Path(ref) / "config.json").is_file():
        return read_config(ref)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id, no cache: nothing to plan from
        return None
    return read_config(Path(cached).parent) if isinstance(cached, str) else None


def check_memory(session: Session, spec: JobSpec, settings: Settings) -> None:
    """Refuse (422 on `model`, with the planner's numbers and a way out) a job whose
    per-worker peak memory (workers/planner.py) exceeds what a worker has: the
    `worker_memory_gib` / `gpu_memory_gib` settings, else this machine. The demo model is
    tiny and never checked."""
    from workers.model_shape import UnsupportedModel, shape_from_config
    from workers.planner import Capacity, GiB, estimate, local_capacity

    if spec.model == "demo":
        return
    config = _model_config(session, spec)
    if config is None:
        return
    try:
        shape = shape_from_config(config)
    except UnsupportedModel as e:
        raise SpecRejected("model", str(e)) from None
    except ValueError:
        return  # an unusual config: the worker decides
    device, workers = spec.distributed.device, spec.distributed.num_workers
    cap = local_capacity(device, workers)
    if cap.device == "cuda" and settings.gpu_memory_gib is not None:
        cap = Capacity(int(settings.gpu_memory_gib * GiB), "cuda", "MOE_UNLEARN_GPU_MEMORY_GIB",
                       gpus=cap.gpus or 1)
    elif cap.device == "cpu" and settings.worker_memory_gib is not None:
        cap = Capacity(int(settings.worker_memory_gib * GiB), "cpu",
                       "MOE_UNLEARN_WORKER_MEMORY_GIB")
    plan = estimate(shape, spec, cap)
    if not plan.fits:
        raise SpecRejected("model", plan.line())


def describe(settings: Settings) -> dict[str, Any]:
    """The limits as numbers (README table; tests)."""
    return {
        "max_queued_jobs": settings.max_queued_jobs,
        "max_streams_per_tenant": settings.max_streams_per_tenant,
        "rate_per_key": settings.rate_per_key,
        "rate_burst": settings.rate_burst,
        "cluster_cpus": cluster_cpus(settings),
        "cluster_gpus": settings.cluster_gpus,
    }
