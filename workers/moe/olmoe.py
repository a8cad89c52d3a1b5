"""OLMoE: softmax router `gate`, no shared expert."""

from __future__ import annotations

from workers.moe.base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    router_attr = "gate"
