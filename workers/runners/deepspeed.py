"""DeepSpeed ZeRO 1/2/3 on a Ray Train rank: the committed configs, the engine the training
loop steps, its checkpoints, and under ZeRO-3 the sharded load, the hooks that fetch shards
in the forwards before training, and the trained model gathered, parameter by parameter,
into a plain model on rank 0. A client torch AdamW over the trainable tensors only
(nothing to compile); the LR schedule is the loop's torch scheduler on that optimizer.

ZeRO-3 sharded load: while `sharded_loading` holds an HfDeepSpeedConfig of stage 3,
transformers builds the model under `deepspeed.zero.Init` and loads each tensor into its
partitions, so no rank ever holds the whole model (each module is gathered in turn while
its weights are copied in). Every stage before training then runs on every rank in
lockstep (workers.runners.base.Runner.lockstep): forwards through `open_fetch_hooks`'s
parameter-only engine, which gathers each module's shards as it runs and frees them after;
reads of a weight through workers.partitioned. The training engine replaces that engine
(`close_fetch_hooks` first: two sets of hooks would fetch twice)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.deepspeed_configs import load_deepspeed_config
from workers.moe.base import MoELayer
from workers.runners.base import Training
from workers.scope import NO_LEAF_MODULES, SELECTED_ATTR, TrainableScope

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


def sharded_load_config(
    micro_batch: int, world: int, grad_clip: float, dtype: torch.dtype
) -> dict[str, Any]:
    """The stage-3 config the sharded load and the fetch hooks use (zero.Init takes its
    dtype from the bf16 flag: float32 otherwise)."""
    cfg = deepspeed_config(3, micro_batch, world, grad_clip)
    # no leaves: a mark set here would outlive this engine and break wired slices in
    # training (workers.scope.deepspeed_config_for)
    cfg["zero_optimization"]["leaf_module"] = dict(NO_LEAF_MODULES)
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    return cfg


@contextlib.contextmanager
def sharded_loading(cfg: dict[str, Any]) -> Iterator[None]:
    """Every from_pretrained inside builds its model partitioned (a collective: every rank
    loads together). The config is unset after: later models (rank 0's plain copy,
    robustness reloads) are ordinary ones."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed.init_distributed(dist_init_required=False)  # wraps the trainer's process group
    alive = HfDeepSpeedConfig(cfg)  # transformers keeps a weak reference: hold it
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()


def open_fetch_hooks(model: nn.Module, cfg: dict[str, Any]) -> Any:
    """A parameter-only ZeRO-3 engine over `model` (no optimizer): its hooks gather each
    module's shards when the module runs and free them after, so the model's own forward
    works on every rank (all ranks must run the same forwards)."""
    import deepspeed

    from workers.moe import get_adapter

    _empty_parameters_as_buffers(model)
    _experts_helpers_unhooked(get_adapter(model).moe_layers())
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
    return engine


def close_fetch_hooks(engine: Any) -> None:
    """Remove every hook `open_fetch_hooks` added. destroy() leaves the engine's own root
    hooks, which turn on DeepSpeed's fetch-on-access of parameters for the whole forward
    (nothing would be freed): removed too."""
    engine.destroy()
    for handle in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if handle is not None:
            handle.remove()
    engine.module_forward_pre_hook = engine.module_forward_post_hook = None


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
    if stage == 3:
        _empty_parameters_as_buffers(t.model)
        _experts_helpers_unhooked(t.scope.layers)
    engine, _, _, _ = deepspeed.initialize(
        model=t.model, optimizer=t.opt, config=cfg, dist_init_required=False
    )
    return DeepSpeedEngine(engine, t)


def _empty_parameters_as_buffers(model: nn.Module) -> None:
    """DeepSpeed 0.19's ZeRO-3 cannot fetch a zero-element parameter (the demo world's
    Qwen2-MoE has a shared expert of width 0: [0, 256] weights): it marks one persistent,
    releases it after the first forward of a step and then fails the second forward's
    availability check. Such a parameter holds nothing and trains nothing: it becomes a
    buffer of the same name (its module reads it the same way), which ZeRO leaves alone."""
    from workers.partitioned import full_numel, full_shape

    for name, p in list(model.named_parameters()):
        if full_numel(p) == 0:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            del module._parameters[leaf]
            # a partitioned one's own tensor is flat: the buffer takes the parameter's shape
            module.register_buffer(leaf, torch.empty(full_shape(p), dtype=p.dtype, device=p.device))


def _experts_helpers_unhooked(layers: Sequence[MoELayer]) -> None:
    """ZeRO-3 checks, when it records its trace, that every rank ran the same submodules
    in the same order. The experts' activation module is called once per pass through the
    family's experts forward, and how many passes run depends on the rows: the selected
    slices' pass is skipped on a rank whose rows chose no selected expert (eager experts
    also loop over the experts that got tokens). A 60-expert model with a few rows per
    rank stopped on "disagreement on list length". A parameter-free child of an experts
    module has nothing to gather: it is called as a plain function (its own forward), out
    of ZeRO's sight. The plain model rank 0 evaluates is rebuilt from the config. Done
    before the fetch hooks too: attribution's forwards differ per rank."""
    for layer in layers:
        experts = layer.experts
        for name, child in list(experts.named_children()):
            holds = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if not holds:
                del experts._modules[name]
                experts.__dict__[name] = child.forward


def gathered_onto_main(
    model: nn.Module, is_main: bool
) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    """ZeRO-3's trained model, whole, on rank 0 only (a collective: every rank calls it).

    Rank 0 builds a plain model of the same config on the meta device (no weights) and
    fills it one parameter at a time: each parameter is gathered from its shards, copied
    into the plain model, and this rank's shard of it is freed at once (each is gathered
    once). So rank 0 holds at most one whole model, plus one gathered parameter, plus its
    not-yet-gathered shards, never a second copy, and nothing is read from disk again.
    Buffers are not sharded by ZeRO: copied as they are. The wired slices are returned
    by name (every rank gets them), the plain model (None off rank 0) holds the fused
    tensors as they were before training, with the trained routers."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    plain: nn.Module | None = None
    if is_main:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    slices: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            whole = p.detach().clone()
        p.ds_tensor.data = torch.empty(0, dtype=p.dtype)  # gathered once: drop the shard
        if SELECTED_ATTR in name.split("."):
            slices[name] = whole  # small: every rank keeps the trained slices
        elif plain is not None:
            _put(plain, name, whole)
    if plain is None:
        return None, slices
    for name, b in model.named_buffers():
        if SELECTED_ATTR not in name.split("."):
            _put(plain, name, b.detach().clone())
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.base_dtype = model.base_dtype  # type: ignore[assignment]
    return plain.eval(), slices


def _put(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Set the parameter (frozen) or buffer `name` (a dotted path) of `model` to `t`."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = t
    else:
        raise KeyError(f"{name} is not in the plain model")


def with_trained_slices(
    model: nn.Module, spec_scope: str, pairs: list[tuple[int, int]], slices: dict[str, Any]
) -> tuple[Any, TrainableScope]:
    """The plain model wired with the same scope, its slices set to the trained ones (the
    pipeline bakes them in)."""
    from workers.moe import get_adapter
    from workers.scope import apply_scope

    adapter = get_adapter(model)
    scope = apply_scope(model, adapter, spec_scope, pairs)
    fresh = dict(scope.named_trainable())
    with torch.no_grad():
        for n, t in slices.items():
            fresh[n].copy_(t)
    return adapter, scope


__all__ = [
    "DeepSpeedEngine",
    "close_fetch_hooks",
    "deepspeed_config",
    "open_fetch_hooks",
    "sharded_load_config",
    "sharded_loading",
    "gathered_onto_main",
    "make_engine",
    "with_trained_slices",
]
