"""Independent hand computations for the MoE engine tests (no adapter code used).

`hand_gate` recomputes, from raw router logits (as returned by
`model(..., output_router_logits=True)`), each family's top-K choice and gate score
following the modeling code's rules, without going through the adapters.
"""

from __future__ import annotations

import torch

from workers.moe.tiny import TINY_VOCAB


def hand_gate(family: str, logits: torch.Tensor, router: torch.nn.Module, cfg: object):
    """(g [T, E] gate score used if selected else 0, sel [T, E] 0/1 selection)."""
    logits = logits.double()
    k = cfg.num_experts_per_tok
    t, e = logits.shape
    if family == "gpt_oss":
        idx = torch.topk(logits, k, dim=-1).indices
        score_top = torch.softmax(logits.gather(1, idx), dim=-1)
    elif family == "deepseek_v3":
        s = torch.sigmoid(logits)
        choice = s + router.e_score_correction_bias.double()
        ng, tg = cfg.n_group, cfg.topk_group
        group_scores = choice.view(t, ng, e // ng).topk(2, dim=-1).values.sum(-1)
        groups = torch.topk(group_scores, tg, dim=-1).indices
        allowed = torch.zeros(t, ng, dtype=torch.bool).scatter_(1, groups, True)
        allowed = allowed.repeat_interleave(e // ng, dim=1)
        idx = torch.topk(choice.masked_fill(~allowed, float("-inf")), k, dim=-1).indices
        score_top = s.gather(1, idx)
    elif family == "deepseek_v2" and cfg.topk_method == "group_limited_greedy":
        p = torch.softmax(logits, dim=-1)
        ng, tg = cfg.n_group, cfg.topk_group
        groups = torch.topk(p.view(t, ng, e // ng).max(-1).values, tg, dim=-1).indices
        allowed = torch.zeros(t, ng, dtype=torch.bool).scatter_(1, groups, True)
        allowed = allowed.repeat_interleave(e // ng, dim=1)
        idx = torch.topk(p.masked_fill(~allowed, 0.0), k, dim=-1).indices
        score_top = p.gather(1, idx)
    else:  # softmax router, plain top-K of the probabilities
        p = torch.softmax(logits, dim=-1)
        idx = torch.topk(p, k, dim=-1).indices
        score_top = p.gather(1, idx)
    g = torch.zeros(t, e, dtype=torch.float64).scatter_(1, idx, score_top)
    sel = torch.zeros(t, e, dtype=torch.float64).scatter_(1, idx, 1.0)
    return g, sel


def per_sequence(x: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
    """[(1/L_j) sum_{t in pos_j} x_t for each sequence j with at least one position], for
    x [B, S, E] and pos [B, S] bool. Written with explicit loops on purpose."""
    rows = []
    for j in range(x.shape[0]):
        n = int(pos[j].sum())
        if n:
            rows.append(sum(x[j, t] for t in range(x.shape[1]) if pos[j, t]) / n)
    return rows


def make_batch(lengths: list[int], width: int, seed: int, low: int = 3) -> dict:
    """Right-padded batch of random tokens with explicit attention mask (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(low, TINY_VOCAB, (n,), generator=g)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}
