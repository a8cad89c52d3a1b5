"""Mixtral: softmax router `gate`, top-2, no shared expert. The model mixes with the top-K
probabilities renormalised to sum 1; the gate score used for attribution is the router
probability itself (the paper's g)."""

from __future__ import annotations

from workers.moe.base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    router_attr = "gate"
    num_experts_field = "num_local_experts"
