"""The retain routing loss (issue 13): keep the routing of retain tokens where the original
model had it, at every trained MoE layer and above.

Why: the router projection (workers/router_projection.py) keeps a trained router from
moving retain routing itself, but every other trained parameter below a router moves the
hidden states it reads; under a full-parameter fallback retain routing overlap stayed at
0.67-0.95 with every router projected. This loss charges that drift to whatever caused it.

Definition, per MoE layer l in `layers` and real retain token t: the original model's
top-K experts I_t and their gate probabilities q_t,i (i in I_t), plus the rest of the mass
q_t,rest = 1 - sum_i q_t,i, form a (K+1)-way distribution; the current model's gate
probabilities p_t (adapter.gate_probs) collapse the same way. The loss is

    L_rr = mean over layers of  mean over real tokens t of  KL(q_t || p_t)   (K+1 bins)

so it is 0 at the original model, and it grows when an original top-K expert loses
probability (the overlap measure's |TopK_orig ∩ TopK_now| falls) or when the mixing weights
change. The reference keeps K indices and K probabilities per token and layer, not E: a
retain token costs 3*K bytes per layer (int8 indices up to 127 experts, float16
probabilities); it is capped at MAX_BYTES (corpus order: the samples past the cap train
without the term, and result.json's selection.retain_routing says how many have it).

The retain samples the job measures routing overlap on (its probe) are held out of the loss
when at least half the corpus is left without them (`held_out`): the reported
`routing_overlap_retain` is then of samples the loss never saw, not its own training signal.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.data import Batch, TokenizedCorpus
from workers.moe.base import MoEAdapter, MoELayer, RouterOutput
from workers.planner import RETAIN_ROUTING_MAX_BYTES

_EPS = 1e-6
MAX_BYTES = RETAIN_ROUTING_MAX_BYTES  # the planner counts the same cap


@dataclass
class RoutingTargets:
    """The original routing of every retain sample on `layers`: per sample (corpus index)
    the top-K expert indices [n_i, len(layers), K] and their gate probabilities (same shape,
    float16), over the sample's real tokens in order."""

    layers: list[int]
    indices: list[torch.Tensor]
    probs: list[torch.Tensor]

    @property
    def samples(self) -> int:
        """How many samples have a reference (the rest were past MAX_BYTES)."""
        return sum(1 for t in self.indices if t.dim() == 3)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.indices, *self.probs))


@torch.no_grad()
def collect_routing_targets(
    model: nn.Module,
    adapter: MoEAdapter,
    layers: Sequence[MoELayer],
    corpus: TokenizedCorpus,
    batch_size: int = 16,
    max_bytes: int = MAX_BYTES,
    skip: Collection[int] = (),
) -> RoutingTargets:
    """The (frozen, original) model's routing of the samples of `corpus`, in order, up to
    `max_bytes`, except the samples in `skip` (call BEFORE training)."""
    from workers.objectives import run_forward  # objectives imports this module

    if not layers:
        raise ValueError("the retain routing loss needs at least one MoE layer")
    was_training = model.training
    model.eval()
    order = [m.layer for m in layers]
    small = adapter.num_experts <= 127
    n = len(corpus)
    indices: list[torch.Tensor] = [torch.empty(0)] * n
    probs: list[torch.Tensor] = [torch.empty(0)] * n
    per_token = len(order) * adapter.top_k * (3 if small else 4)
    budget = max_bytes
    skipped = set(skip)
    try:
        for b in corpus.in_order(batch_size):
            kept = [r for r, i in enumerate(b["index"].tolist()) if i not in skipped]
            if not kept:  # every sample held out (the probe is the corpus's first batches)
                continue
            budget -= int(b["attention_mask"][kept].sum()) * per_token
            if budget < 0:
                break
            rec = run_forward(model, b, list(layers), logits="none").routers
            real = b["attention_mask"].bool().reshape(-1).to("cpu")
            idx, q = _topk_of(rec, order, adapter)  # [T, nL, K] each
            idx, q = idx[real], q[real]
            lengths = b["attention_mask"].sum(dim=1).tolist()
            for idx_i, q_i, sample in zip(
                idx.split(lengths), q.split(lengths), b["index"].tolist(), strict=True
            ):
                if sample in skipped:
                    continue
                indices[sample] = idx_i.to(torch.int8 if small else torch.int16).clone()
                probs[sample] = q_i.to(torch.float16).clone()
    finally:
        model.train(was_training)
    return RoutingTargets(order, indices, probs)


def held_out(corpus_size: int, probe: Collection[int]) -> set[int]:
    """The probe samples to keep out of the loss: all of them when at least half the corpus
    is left to train on, else none (a small retain corpus needs every sample)."""
    probe = set(probe)
    return probe if corpus_size - len(probe) >= corpus_size / 2 else set()


def _topk_of(
    rec: dict[int, list[RouterOutput]], order: Sequence[int], adapter: MoEAdapter
) -> tuple[torch.Tensor, torch.Tensor]:
    idx, q = [], []
    for layer in order:
        out = _one_call(rec, layer)
        i = out.topk_indices.long()
        idx.append(i.cpu())
        q.append(adapter.gate_probs(out.logits).gather(1, i).float().cpu())
    return torch.stack(idx, dim=1), torch.stack(q, dim=1)


def _one_call(rec: dict[int, list[RouterOutput]], layer: int) -> RouterOutput:
    calls = rec.get(layer) or []
    if len(calls) != 1:
        raise RuntimeError(f"router of layer {layer} ran {len(calls)} times in one forward")
    return calls[0]


def retain_routing_loss(
    routers: dict[int, list[RouterOutput]],
    targets: RoutingTargets,
    batch: Batch,
    adapter: MoEAdapter,
) -> torch.Tensor:
    """L_rr of one retain batch (see the module doc). `routers` come from router_tap of the
    batch's forward on `targets.layers`; `batch["index"]` names the samples."""
    mask = batch["attention_mask"].bool()
    rows = batch["index"].tolist()
    lengths = [int(x) for x in mask.sum(dim=1).tolist()]
    held = [targets.indices[s].dim() == 3 for s in rows]  # past the cap: no reference
    if not any(held):
        return torch.zeros((), device=mask.device)
    mask = mask & torch.tensor(held, device=mask.device).unsqueeze(1)
    kept = [(row, s) for row, (s, h) in enumerate(zip(rows, held, strict=True)) if h]
    rows = [s for _, s in kept]
    for row, sample in kept:
        if targets.indices[sample].shape[0] != lengths[row]:
            raise ValueError(
                f"retain sample {sample} has {lengths[row]} tokens, its routing reference "
                f"{targets.indices[sample].shape[0]}: the reference is of another corpus"
            )
    real = mask.reshape(-1)
    first = _one_call(routers, targets.layers[0]).logits
    device = first.device
    idx = torch.cat([targets.indices[s] for s in rows]).to(device).long()  # [N, nL, K]
    q = torch.cat([targets.probs[s] for s in rows]).to(device).float()
    q_rest = (1.0 - q.sum(-1)).clamp_min(0.0)
    total = first.new_zeros((), dtype=torch.float32)
    for j, layer in enumerate(targets.layers):
        p = adapter.gate_probs(_one_call(routers, layer).logits)[real.to(device)]  # [N, E]
        pk = p.gather(1, idx[:, j])
        qk = q[:, j]
        p_rest = (1.0 - pk.sum(-1)).clamp_min(_EPS)
        kl = (qk * (qk.clamp_min(_EPS).log() - pk.clamp_min(_EPS).log())).sum(-1)
        kl = kl + q_rest[:, j] * (q_rest[:, j].clamp_min(_EPS).log() - p_rest.log())
        total = total + kl.mean()
    return total / len(targets.layers)
