"""What an objective needs from the frozen model, computed once before training: NPO's
reference forget NLLs, RMU's retain activations and steering direction, the retain routing
loss's original routing (workers/retain_routing.py)
(`prepare_reference` attaches them to the objective; see workers/objectives.py)."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from workers.data import TokenizedCorpus
from workers.moe import get_adapter
from workers.objectives import Objective, Reference, run_forward, sequence_nll
from workers.retain_routing import collect_routing_targets


@torch.no_grad()
def reference_forget_nll(
    model: nn.Module, corpus: TokenizedCorpus, batch_size: int = 16
) -> torch.Tensor:
    """Sequence-summed NLL of every forget sample under the (frozen, original) model."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(corpus))
    for b in corpus.in_order(batch_size):
        nll, _ = sequence_nll(run_forward(model, b).logits, b)
        out[b["index"]] = nll.float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def reference_activations(
    model: nn.Module, module: nn.Module, corpus: TokenizedCorpus, batch_size: int = 16
) -> list[torch.Tensor]:
    """Output of `module` on every sample (real tokens only), in corpus order."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(corpus)
    for b in corpus.in_order(batch_size):
        acts = run_forward(model, b, capture=module, logits="none").activations
        assert acts is not None
        for row, idx in enumerate(b["index"].tolist()):
            n = int(b["attention_mask"][row].sum())
            out[idx] = acts[row, :n].float().cpu().clone()
    model.train(was_training)
    return out


def rmu_direction(hidden_size: int, seed: int) -> torch.Tensor:
    """A fixed random unit vector (uniform entries, normalised, as in RMU), seeded."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=g)
    return u / u.norm()


def prepare_reference(
    objective: Objective,
    model: nn.Module,
    forget: TokenizedCorpus,
    retain: TokenizedCorpus | None,
    seed: int = 0,
    batch_size: int = 16,
    routing_holdout: Collection[int] = (),
) -> Reference | None:
    """Compute what `objective` needs from the frozen model (call BEFORE training) and
    attach it to the objective. Returns None for reference-free objectives.
    `routing_holdout`: retain samples the retain routing loss leaves out (the overlap probe,
    workers/retain_routing.held_out)."""
    d = objective.definition
    if not d.needs_reference and not objective.keeps_retain_routing:
        return None
    ref = Reference()
    if objective.keeps_retain_routing:
        if retain is None or objective.adapter is None:
            raise ValueError("the retain routing loss needs a retain corpus")
        adapter = objective.adapter
        layers = objective.retain_routing_layers
        if adapter.model is not model:  # another copy of the original (tests): its routers
            adapter = get_adapter(model)
            layers = [adapter.moe_layer(m.layer) for m in layers]
        ref.retain_routing = collect_routing_targets(
            model, adapter, layers, retain, batch_size, skip=routing_holdout
        )
    if objective.name == "npo":
        ref.forget_nll = reference_forget_nll(model, forget, batch_size)
    if objective.name == "rmu":
        if retain is None or objective.capture is None:
            raise ValueError("objective 'rmu' needs a retain corpus")
        # The same block in `model` (normally the model being unlearned, before training).
        owner = objective.adapter.model if objective.adapter is not None else model
        names = {id(m): n for n, m in owner.named_modules()}
        module = model.get_submodule(names[id(objective.capture)])
        set_rmu_reference(ref, model, module, retain, seed, batch_size)
    objective.reference = ref
    return ref


def set_rmu_reference(
    ref: Reference,
    model: nn.Module,
    module: nn.Module,
    retain: TokenizedCorpus,
    seed: int,
    batch_size: int = 16,
) -> None:
    """RMU's part of `ref` for the block `module` of `model`: the retain activations it
    must keep, the steering direction and the block's mean output norm (the relative
    coefficient's scale). Also used when RMU's fallback steers a higher block
    (workers/rmu_climb.py)."""
    ref.retain_activations = reference_activations(model, module, retain, batch_size)
    ref.rmu_direction = rmu_direction(int(model.config.hidden_size), seed)
    ref.rmu_seed = seed
    norms = torch.cat([a.norm(dim=-1) for a in ref.retain_activations])
    ref.rmu_block_norm = float(norms.mean())
