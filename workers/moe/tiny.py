"""Tiny randomly initialised MoE models of every supported family, built from config only.

Used by the tests of every part and by the demo: nothing is downloaded. Each family keeps
the features that matter to the engine: Qwen2-MoE has a shared expert with its sigmoid
gate, DeepSeek-V2/V3 a dense first layer (first_k_dense_replace=1) and shared experts,
DeepSeek-V2 group-limited greedy routing, DeepSeek-V3 sigmoid scoring with a (non-zero,
seeded) e_score_correction_bias and n_group/topk_group, gpt-oss a biased router and
transposed, biased experts.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_VOCAB = 128

# Shared by every family: small enough for a 2-core CI box (each model < 0.2M parameters).
_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,  # larger than 0.02 so routing is not near-uniform
}

_MLA: dict[str, Any] = {  # DeepSeek multi-head latent attention, shrunk
    "q_lora_rank": None,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
}

_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 16, "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 8, "intermediate_size": 16},
    "olmoe": {"num_experts": 8, "intermediate_size": 16, "norm_topk_prob": False},
    "deepseek_v2": {
        **_MLA,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        **_MLA,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "gpt_oss": {
        "num_local_experts": 8,
        "intermediate_size": 16,
        "head_dim": 8,
        "sliding_window": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """Config of a tiny model of `family` (a model_type); `overrides` replace any field."""
    if family not in _FAMILIES:
        raise ValueError(
            f"unknown MoE family {family!r}; tiny models exist for: {', '.join(FAMILIES)}"
        )
    kwargs = {**_COMMON, **_FAMILIES[family], **overrides}
    cfg = AutoConfig.for_model(family, **kwargs)
    # Eager attention: identical numerics everywhere and no kernel downloads (gpt-oss sinks).
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of `family` in eval mode (float32, CPU).

    For DeepSeek-V3 the router's e_score_correction_bias (a buffer, zero at init) is set to
    seeded random values so tests see the bias change the choice but not the score."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if family == "deepseek_v3":
        g = torch.Generator().manual_seed(seed + 1)
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                with torch.no_grad():
                    bias.copy_(torch.randn(bias.shape, generator=g) * 0.1)
    return model.eval()
