"""DeepSeek-V2 and DeepSeek-V3 (and V3-shaped models): the first `first_k_dense_replace`
layers are dense (skipped), every MoE block has `n_shared_experts` shared experts fused
into one MLP (`shared_experts`, never candidates) and a router `gate`.

V2 scores with a softmax; with topk_method "group_limited_greedy" the top-K is chosen
inside the best `topk_group` groups, so the router's own indices are used, never a
re-computed top-K.

V3 scores with a sigmoid. The choice adds `e_score_correction_bias` (a load-balancing
buffer) and is group-limited; the weight the model mixes with is the sigmoid score
WITHOUT the bias, then renormalised over the top-K (norm_topk_prob) and multiplied by
`routed_scaling_factor`. Our gate score g (used by attribution and by the anchor) is the
plain sigmoid: it is the router's per-expert affinity, independent of which other experts
were chosen (the renormalisation would couple them) and of the balancing bias (which is
not a property of the token). Decision documented here; the paper defines g as the
router probability, and V3's sigmoid is its nearest equivalent.
"""

from __future__ import annotations

import torch

from workers.moe.base import MoEAdapter


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    num_experts_field = "n_routed_experts"


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    router_attr = "gate"
    shared_attrs = ("shared_experts",)
    num_experts_field = "n_routed_experts"

    def gate_probs(self, logits: torch.Tensor) -> torch.Tensor:
        # Sigmoid per expert, without the correction bias (see the module docstring).
        return torch.sigmoid(logits.float())
