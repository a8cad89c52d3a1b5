"""What differs between runners, as one small strategy object (`Runner`), and the plain
one-process runner (`LocalRunner`).

The one pipeline (workers/pipeline.py) and the one training loop (workers/train.py) ask
the runner, never `if distributed:`, for:
    rank / world / is_main     rank-0-only work (evaluation, packaging, progress)
    barrier()                  wait for every rank (rank 0 loads the demo world first)
    reduce_sum(t)              attribution's sums over ranks (identity in one process)
    agree(flags)               the maximum of int flags over ranks (stop rules: every rank
                               stops after the same step)
    shard(source)              this rank's rows of every global batch
    engine(...)                plain model, DDP, or a DeepSpeed engine (`Engine`)
    restore / save             the checkpoint hook (Ray Train: ray.train.report)
    finish_training(...)       the trained model as a plain module on rank 0 (ZeRO-3:
                               gathered into a fresh copy)
    info(...)                  DistributedInfo for the result (None in one process)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from workers.job import LoadedJob
    from workers.results import DistributedInfo
    from workers.scope import TrainableScope
    from workers.spec import TrainingOptions
    from workers.train import BatchSource


class Engine(Protocol):
    """What the training loop steps: `module` runs the forward (the model, its DDP wrapper
    or a DeepSpeed engine); `step` does backward, clipping and the optimizer step and
    returns the gradient norm before clipping."""

    module: nn.Module

    def step(self, loss: torch.Tensor) -> float: ...


@dataclass
class PlainEngine:
    """torch: backward, clip_grad_norm_ (grad_clip <= 0: none), optimizer step. Also DDP's
    (its backward all-reduces the gradients)."""

    module: nn.Module
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    grad_clip: float

    def step(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.opt.step()
        return grad_norm


class Runner(Protocol):
    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def agree(self, flags: list[int]) -> list[int]: ...

    def shard(self, source: BatchSource) -> BatchSource: ...

    def engine(
        self,
        model: nn.Module,
        scope: TrainableScope,
        params: list[nn.Parameter],
        opt: torch.optim.Optimizer,
        options: TrainingOptions,
    ) -> Engine: ...

    def restore(self, engine: Engine, named: list[tuple[str, nn.Parameter]]) -> dict | None:
        """State of the last checkpoint of this run (trainable tensors and optimizer already
        loaded): {"step", "scheduler"?, "rng"?, "meta"}; None to start fresh."""
        ...

    @property
    def checkpoint_every(self) -> int: ...  # 0: never

    def save(
        self, engine: Engine, named: list[tuple[str, nn.Parameter]], state: dict[str, Any]
    ) -> None: ...

    @property
    def supports_activation_cache(self) -> bool: ...

    def finish_training(
        self, job: LoadedJob, scope: TrainableScope, pairs: list[tuple[int, int]]
    ) -> TrainableScope | None:
        """After training, on every rank: the scope to bake on rank 0 (job.model may be
        replaced), None on the other ranks."""
        ...

    def info(self, resumed_from: int) -> DistributedInfo | None: ...


class LocalRunner:
    """One process, one rank: the model itself, no checkpoints, nothing to reduce."""

    rank = 0
    world = 1
    is_main = True
    checkpoint_every = 0
    supports_activation_cache = True

    def barrier(self) -> None:
        pass

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, flags: list[int]) -> list[int]:
        return list(flags)

    def shard(self, source: BatchSource) -> BatchSource:
        return source

    def engine(
        self,
        model: nn.Module,
        scope: TrainableScope,
        params: list[nn.Parameter],
        opt: torch.optim.Optimizer,
        options: TrainingOptions,
    ) -> Engine:
        return PlainEngine(model, params, opt, options.grad_clip)

    def restore(self, engine: Engine, named: list[tuple[str, nn.Parameter]]) -> dict | None:
        return None

    def save(
        self, engine: Engine, named: list[tuple[str, nn.Parameter]], state: dict[str, Any]
    ) -> None:
        raise RuntimeError("the one-process runner writes no checkpoints")

    def finish_training(
        self, job: LoadedJob, scope: TrainableScope, pairs: list[tuple[int, int]]
    ) -> TrainableScope | None:
        return scope

    def info(self, resumed_from: int) -> DistributedInfo | None:
        return None


__all__ = ["Engine", "LocalRunner", "PlainEngine", "Runner"]
