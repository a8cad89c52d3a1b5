"""DeepSpeed ZeRO 1/2/3 on a Ray Train rank: the committed configs, the engine the training
loop steps, its checkpoints, and (ZeRO-3) the trained tensors gathered into a fresh plain
model on rank 0. A client torch AdamW over the trainable tensors only (nothing to compile);
the LR schedule is the loop's torch scheduler on that optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.deepspeed_configs import load_deepspeed_config
from workers.runners.base import Training
from workers.scope import TrainableScope

CHECKPOINT_TAG = "ckpt"


def deepspeed_config(stage: int, micro_batch: int, world: int, grad_clip: float) -> dict[str, Any]:
    """The shipped zero{2,3}.json (package data: workers/deepspeed_configs; stage 1:
    zero2.json with stage 1), with the batch sizes and clipping of this job made concrete."""
    cfg = load_deepspeed_config(stage)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch * world
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["zero_allow_untested_optimizer"] = True  # the client torch AdamW: nothing to compile
    return cfg


@dataclass
class DeepSpeedEngine:
    """The training loop's Engine: `module` is the DeepSpeed engine (clipping is in its
    config)."""

    module: Any
    training: Training

    def step(self, loss: torch.Tensor) -> float:
        self.module.backward(loss)
        self.module.step()
        gn = self.module.get_global_grad_norm()
        return float(gn) if gn is not None else float("nan")

    def optimizer_state(self) -> dict[str, Any] | None:
        return None  # ZeRO partitions it: save_checkpoint writes it, per rank

    def save(self, folder: Path, client_state: dict[str, Any], rank: int) -> None:
        """Collective: each rank writes its own shard files (Ray merges the rank folders)."""
        self.module.save_checkpoint(
            str(folder / "ds"),
            tag=CHECKPOINT_TAG,
            client_state=client_state,
            exclude_frozen_parameters=True,
        )
        latest = folder / "ds" / "latest"
        if rank != 0 and latest.exists():
            latest.unlink()  # rank 0 writes it; avoid a clash in the merged folder

    def load(self, folder: Path) -> dict[str, Any]:
        _, client = self.module.load_checkpoint(
            str(folder / "ds"), tag=CHECKPOINT_TAG, load_module_strict=False
        )
        return dict(client)


def make_engine(t: Training, stage: int, world: int) -> DeepSpeedEngine:
    import deepspeed

    from workers.scope import deepspeed_config_for

    if stage == 3:
        t.model.enable_input_require_grads()  # frozen base: backward fails without it
    opts = t.options
    cfg = deepspeed_config_for(
        t.scope, deepspeed_config(stage, max(1, opts.batch_size // world), world, opts.grad_clip)
    )
    if next(t.model.parameters()).dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}  # its optimizer keeps float32 masters and moments
    engine, _, _, _ = deepspeed.initialize(
        model=t.model, optimizer=t.opt, config=cfg, dist_init_required=False
    )
    return DeepSpeedEngine(engine, t)


def gathered(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """The trained ZeRO-3 tensors, whole, on every rank (a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().clone() for n, p in named}


def into_fresh_model(
    model_ref: str,
    revision: str | None,
    spec_scope: str,
    pairs: list[tuple[int, int]],
    trained: dict[str, Any],
) -> tuple[nn.Module, Any, TrainableScope]:
    """ZeRO-3's model holds empty shards: a freshly loaded plain copy (the same source and
    pinned revision) with the same scope, its trainable tensors set to `trained`."""
    from workers.job import open_model
    from workers.moe import get_adapter
    from workers.scope import apply_scope

    dtype = next(iter(trained.values())).dtype if trained else torch.float32
    model, _, _ = open_model(model_ref, revision, dtype)
    adapter = get_adapter(model)
    scope = apply_scope(model, adapter, spec_scope, pairs)
    fresh = dict(scope.named_trainable())
    with torch.no_grad():
        for n, t in trained.items():
            fresh[n].copy_(t)
    return model, adapter, scope


__all__ = ["DeepSpeedEngine", "deepspeed_config", "gathered", "into_fresh_model", "make_engine"]
