"""Reading a model whose parameters may be ZeRO-3 partitions (loaded sharded under
`deepspeed.zero.Init`, workers/runners/deepspeed.py): a partitioned parameter holds only
this rank's shard (`ds_tensor`); its whole size is `ds_numel` and its shape `ds_shape`.

Every read of a partitioned parameter's values is an all-gather that every rank must
enter in the same order: the callers run these on every rank in lockstep
(`Runner.lockstep`). On a plain model they cost nothing and need no DeepSpeed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (not of this rank's shard)."""
    return int(p.ds_numel) if is_partitioned(p) else int(p.numel())


def full_shape(p: torch.Tensor) -> torch.Size:
    return torch.Size(p.ds_shape) if is_partitioned(p) else p.shape


def any_partitioned(model: nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """The partitioned ones among `params` whole for the block (read only: nothing written
    inside is kept); a no-op when none is partitioned. Collective when one is."""
    todo = [p for p in params if is_partitioned(p)]
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
        yield


@torch.no_grad()
def write_whole(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Set `p` to the value `whole` (its whole shape). A partitioned parameter takes only
    this rank's shard of it, laid out as DeepSpeed partitions (contiguous, rank-major, the
    last shard zero-padded): no collective, so each rank may do it alone (every rank holds
    the same `whole`, e.g. a copy taken while gathered)."""
    if not is_partitioned(p):
        p.copy_(whole)
        return
    import torch.distributed as dist

    shard = p.ds_tensor
    size = int(shard.ds_numel)
    rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
    start = rank * size
    flat = whole.reshape(-1)
    n = max(0, min(size, flat.numel() - start))
    if n:
        shard.narrow(0, 0, n).copy_(flat.narrow(0, start, n))


def state_tensors(
    model: nn.Module, names: Sequence[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of the model's state dict (or of `names` in it), one at a time in
    the given (else sorted) order: a partitioned parameter is gathered for its turn only, so
    at most one whole parameter is held beyond the shards. The tensor is only valid until
    the next item (copy it to keep it)."""
    state = model.state_dict(keep_vars=True)
    for name in names if names is not None else sorted(state):
        t = state[name]
        with gathered([t]):
            yield name, t.detach()


def model_sha256(model: nn.Module, dtype: torch.dtype | None = None, here: bool = True) -> str:
    """workers.patch.state_sha256 of the model's state dict, read one tensor at a time (the
    same digest for a plain and a partitioned model of the same weights). here=False: take
    part in the gathers only (the other ranks of a lockstep stage) and return ""."""
    from workers.patch import items_sha256

    if not here:
        return take_part(state_tensors(model))
    return items_sha256(state_tensors(model), dtype)


def take_part(items: Iterable[object]) -> str:
    """Run a lockstep read to its end (its gathers) without keeping anything; returns ""."""
    for _ in items:
        pass
    return ""


__all__ = [
    "any_partitioned",
    "full_numel",
    "full_shape",
    "gathered",
    "is_partitioned",
    "model_sha256",
    "state_tensors",
    "take_part",
]
