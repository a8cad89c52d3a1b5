"""Qwen3-MoE: softmax router `gate`, no shared expert (norm_topk_prob only rescales the
mixing weights; the paper's gate score is the router probability before that)."""

from __future__ import annotations

from workers.moe.base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    router_attr = "gate"
