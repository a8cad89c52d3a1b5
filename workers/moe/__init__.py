"""MoE architecture adapters: `get_adapter(model)` picks one by `config.model_type`."""

from __future__ import annotations

from torch import nn

from workers.moe.base import MoEAdapter, MoELayer, RouterOutput, router_tap
from workers.moe.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from workers.moe.gpt_oss import GptOssAdapter
from workers.moe.mixtral import MixtralAdapter
from workers.moe.olmoe import OlmoeAdapter
from workers.moe.qwen2_moe import Qwen2MoeAdapter
from workers.moe.qwen3_moe import Qwen3MoeAdapter

# The one table: model_type -> adapter class.
ADAPTERS: dict[str, type[MoEAdapter]] = {
    mt: cls
    for cls in (
        Qwen2MoeAdapter,
        Qwen3MoeAdapter,
        MixtralAdapter,
        OlmoeAdapter,
        DeepseekV2Adapter,
        DeepseekV3Adapter,
        GptOssAdapter,
    )
    for mt in cls.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for `model` (a transformers MoE model), chosen by config.model_type.
    Raises ValueError naming the supported model types for anything else, or when the
    model has no MoE layer at all."""
    if not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP / DeepSpeed engine: adapt the wrapped transformers model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(str(model_type))
    if cls is None:
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported MoE model types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    adapter = cls(model)
    if not adapter.moe_layers():
        raise ValueError(f"{model_type} model has no MoE layer (all layers are dense)")
    return adapter


__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "MoEAdapter",
    "MoELayer",
    "RouterOutput",
    "get_adapter",
    "router_tap",
]
