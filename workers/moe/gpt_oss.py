"""gpt-oss: the router is `mlp.router` (a Linear with bias); experts are fused and
transposed ([E, H, 2I] / [E, I, H]) with per-expert biases, expert index still on dim 0.

The model picks the top-K raw logits and mixes with a softmax over those K logits only.
`gate_probs` (the anchor's full probability vector) is the softmax over all E logits;
`used_gate_scores` is what the model mixes with: softmax over the top-K logits, zero
elsewhere. Both order the experts identically inside the top-K.
"""

from __future__ import annotations

import torch

from workers.moe.base import MoEAdapter, RouterOutput


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    router_attr = "router"
    num_experts_field = "num_local_experts"
    expert_input_dim = 1  # gate_up_proj is [E, H, 2I], applied as x @ W

    def used_gate_scores(self, out: RouterOutput) -> torch.Tensor:
        idx = out.topk_indices.long()
        top = torch.softmax(out.logits.float().gather(1, idx), dim=-1)
        scores = torch.zeros(out.logits.shape, dtype=torch.float32, device=out.logits.device)
        return scores.scatter_(1, idx, top)
