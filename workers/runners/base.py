"""What differs between runners, as one small strategy object: `Runner`, whose defaults are
the one-process runner (`LocalRunner`); a Ray Train rank overrides them
(workers/runners/ray_train.py).

The one pipeline (workers/pipeline.py) and the one training loop (workers/train.py) ask
the runner, never `if distributed:`, for:
    rank / world / is_main     rank-0-only work (evaluation, packaging, progress)
    barrier()                  wait for every rank (rank 0 loads the demo world first)
    lockstep                   the model is partitioned over the ranks (ZeRO-3, loaded
                               sharded): every forward and every read of a weight runs on
                               every rank in the same order, rank 0's included
    loading() / loaded(model)  around and after the model's load (ZeRO-3: under
                               zero.Init, then the hooks that fetch shards in a forward)
    reduce_sum(t)              attribution's sums over ranks (identity in one process)
    agree(flags)               the maximum of int flags over ranks (stop rules: every rank
                               stops after the same step)
    shard(source)              this rank's rows of every global batch
    engine(training)           plain model, DDP, or a DeepSpeed engine (`Engine`)
    restore / save             the checkpoint hook (Ray Train: ray.train.report)
    finish_training(...)       the trained model as a plain module on rank 0 (ZeRO-3:
                               gathered param by param into one plain model); None elsewhere
    info(...)                  DistributedInfo for the result (None in one process)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from workers.devices import MasterWeights
    from workers.job import LoadedJob
    from workers.results import DistributedInfo
    from workers.scope import TrainableScope
    from workers.spec import JobSpec, TrainingOptions
    from workers.train import BatchSource


@dataclass
class Training:
    """What the training loop hands its runner: the model, its scope, the trainable tensors
    by name, the optimizer over them, and the options."""

    model: nn.Module
    scope: TrainableScope
    named: list[tuple[str, nn.Parameter]]
    opt: torch.optim.Optimizer
    options: TrainingOptions
    # float32 masters of trainable tensors held in a lower precision (the optimizer steps
    # them); None where the runner's engine keeps its own (DeepSpeed's bf16 optimizer).
    master: MasterWeights | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """What the optimizer steps (and clipping sees): the masters where there are some."""
        return self.master.parameters() if self.master is not None else [p for _, p in self.named]


class Engine(Protocol):
    """What the training loop steps: `module` runs the forward (the model, its DDP wrapper
    or a DeepSpeed engine); `step` does backward, clipping and the optimizer step and
    returns the gradient norm before clipping."""

    module: nn.Module
    training: Training

    def step(self, loss: torch.Tensor) -> float: ...

    def optimizer_state(self) -> dict[str, Any] | None:
        """A copy of the optimizer's state (None: the engine checkpoints its own)."""
        ...


@dataclass
class PlainEngine:
    """torch: backward, clip_grad_norm_ (grad_clip <= 0: none), optimizer step. Also DDP's
    (its backward all-reduces the gradients)."""

    module: nn.Module
    training: Training

    def step(self, loss: torch.Tensor) -> float:
        t = self.training
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.master is not None:
            t.master.grads_to_master()
        clip = t.options.grad_clip if t.options.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, clip))
        t.opt.step()
        if t.master is not None:
            t.master.master_to_model()
        return grad_norm

    def optimizer_state(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.training.opt.state_dict())


class Runner:
    """The strategy; its defaults are one process, one rank: the model itself, no
    checkpoints, nothing to reduce."""

    rank = 0
    world = 1
    checkpoint_every = 0  # steps between checkpoints; 0: never
    supports_activation_cache = True
    own_master_weights = False  # the engine keeps float32 masters itself (DeepSpeed bf16)
    lockstep = False  # see the module docstring

    @property
    def projects_routers(self) -> bool:
        """Whether seuf.router_projection nullspace can run here (one plain process)."""
        return self.world == 1 and not self.lockstep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @contextlib.contextmanager
    def loading(self, spec: JobSpec) -> Iterator[None]:
        yield

    def loaded(self, model: nn.Module) -> None:
        pass

    def agree(self, flags: list[int]) -> list[int]:
        return list(flags)

    def shard(self, source: BatchSource) -> BatchSource:
        return source

    def engine(self, training: Training) -> Engine:
        return PlainEngine(training.model, training)

    def restore(self, engine: Engine) -> dict[str, Any] | None:
        """State of the last checkpoint of this run (trainable tensors and optimizer already
        loaded): {"step", "scheduler", "rng", "meta"}; None to start fresh."""
        return None

    def save(self, engine: Engine, state: dict[str, Any]) -> None:
        raise RuntimeError("this runner writes no checkpoints")

    def finish_training(
        self, job: LoadedJob, scope: TrainableScope, pairs: list[tuple[int, int]]
    ) -> TrainableScope | None:
        return scope

    def info(self, resumed_from: int) -> DistributedInfo | None:
        return None


class LocalRunner(Runner):
    """One process (the service's one-worker jobs, `moe-unlearn run`, library use)."""


__all__ = ["Engine", "LocalRunner", "PlainEngine", "Runner", "Training"]
