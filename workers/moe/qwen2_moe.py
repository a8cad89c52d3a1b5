"""Qwen1.5-MoE / Qwen2-MoE: softmax router `gate`, one shared expert with a sigmoid gate.

Dense layers (mlp_only_layers, decoder_sparse_step) hold a plain MLP and are skipped.
"""

from __future__ import annotations

from workers.moe.base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    router_attr = "gate"
    # The shared expert and its scalar sigmoid gate are never candidates nor trained by SEUF.
    shared_attrs = ("shared_expert", "shared_expert_gate")
