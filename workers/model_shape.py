"""Parameter counts of an MoE model from its config.json alone (no torch, no weights).

The memory planner (workers/planner.py) needs, before anything is loaded: every decoder
layer's parameter count, which layers are MoE layers, one routed expert's and one router's
size, and the widths that set activation memory. Each supported family (the model_types of
workers/moe/) lays its parameters out as transformers 5.x builds them; tests/engine compare
these counts with the torch models built from the same configs, family by family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FAMILIES: tuple[str, ...] = (
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
)


class UnsupportedModel(ValueError):
    """The config names a family the engine has no adapter for (a user error)."""


@dataclass(frozen=True)
class ModelShape:
    family: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_experts: int
    top_k: int
    expert_intermediate: int  # one routed expert's FFN width
    shared_intermediate: int  # all shared experts of a MoE layer together (0: none)
    layer_params: tuple[int, ...]  # every decoder layer
    moe_layers: tuple[int, ...]  # indices of the layers with routed experts
    expert_params: int  # one routed expert
    router_params: int  # one MoE layer's router
    embed_params: int
    head_params: int  # 0 when the LM head is tied to the embeddings
    final_norm_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    @property
    def total_params(self) -> int:
        return (
            self.embed_params + self.head_params + self.final_norm_params + sum(self.layer_params)
        )

    @property
    def largest_layer_params(self) -> int:
        return max(self.layer_params, default=0)


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n)
        if v is not None:
            return v
    return default


def _attention_params(cfg: Mapping[str, Any], family: str, h: int, heads: int) -> int:
    if family in ("deepseek_v2", "deepseek_v3"):
        nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        v_dim, kv_rank = int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"])
        q_rank = cfg.get("q_lora_rank")
        bias = 1 if cfg.get("attention_bias") else 0
        qk = nope + rope
        if q_rank:
            q = h * q_rank + bias * q_rank + q_rank + q_rank * heads * qk
        else:
            q = h * heads * qk
        kv = (
            h * (kv_rank + rope)
            + bias * (kv_rank + rope)
            + kv_rank
            + kv_rank * heads * (nope + v_dim)
        )
        o = heads * v_dim * h + bias * h
        return q + kv + o
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    hd = int(_get(cfg, "head_dim", default=h // heads))
    q_out, kv_out = heads * hd, kv_heads * hd
    n = h * q_out + 2 * h * kv_out + q_out * h
    if family == "qwen2_moe":
        if cfg.get("qkv_bias", True):
            n += q_out + 2 * kv_out
    elif cfg.get("attention_bias"):
        n += q_out + 2 * kv_out + h
    if family == "qwen3_moe":
        n += 2 * hd  # per-head q/k RMSNorm
    elif family == "olmoe":
        n += q_out + kv_out  # q/k RMSNorm over the projected width
    elif family == "gpt_oss":
        n += heads  # attention sinks
    return n


def _is_moe_layer(cfg: Mapping[str, Any], family: str, i: int, num_experts: int) -> bool:
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step") or 1)
        return (
            i not in (cfg.get("mlp_only_layers") or []) and num_experts > 0 and (i + 1) % step == 0
        )
    if family in ("deepseek_v2", "deepseek_v3"):
        return i >= int(cfg.get("first_k_dense_replace") or 0)
    return True


def shape_from_config(cfg: Mapping[str, Any]) -> ModelShape:
    """The shape of the model a config.json describes. Raises UnsupportedModel for a family
    without an adapter, KeyError-free ValueError for a config missing a width it needs."""
    family = str(cfg.get("model_type", ""))
    if family not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {family!r} is not a supported MoE family ({', '.join(FAMILIES)})"
        )
    try:
        h = int(cfg["hidden_size"])
        vocab = int(cfg["vocab_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json lacks a usable {e} field") from e
    experts = int(_get(cfg, "num_experts", "num_local_experts", "n_routed_experts", default=0))
    top_k = int(_get(cfg, "num_experts_per_tok", "num_experts_per_token", default=1))
    dense_inter = int(_get(cfg, "intermediate_size", default=0))
    if family in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        expert_inter = int(_get(cfg, "moe_intermediate_size", default=dense_inter))
    else:
        expert_inter = dense_inter
    expert = 3 * h * expert_inter
    router = experts * h
    if family == "gpt_oss":
        expert += 2 * expert_inter + h  # gate_up and down biases
        router += experts
    shared_inter, shared = 0, 0
    if family == "qwen2_moe":
        shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
        shared = 3 * h * shared_inter + (h if shared_inter else 0)  # + its sigmoid gate
    elif family in ("deepseek_v2", "deepseek_v3"):
        shared_inter = expert_inter * int(cfg.get("n_shared_experts") or 0)
        shared = 3 * h * shared_inter
    attn = _attention_params(cfg, family, h, heads)
    norms = 2 * h
    per_layer: list[int] = []
    moe_layers: list[int] = []
    for i in range(layers):
        if _is_moe_layer(cfg, family, i, experts):
            moe_layers.append(i)
            mlp = experts * expert + router + shared
        else:
            mlp = 3 * h * dense_inter
        per_layer.append(attn + norms + mlp)
    return ModelShape(
        family=family,
        vocab_size=vocab,
        hidden_size=h,
        num_heads=heads,
        num_experts=experts,
        top_k=top_k,
        expert_intermediate=expert_inter,
        shared_intermediate=shared_inter,
        layer_params=tuple(per_layer),
        moe_layers=tuple(moe_layers),
        expert_params=expert,
        router_params=router,
        embed_params=vocab * h,
        head_params=0 if cfg.get("tie_word_embeddings") else vocab * h,
        final_norm_params=h,
    )
