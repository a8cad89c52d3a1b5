"""Expert attribution: score every (MoE layer, routed expert) pair on a forget sample.

Methods (METHOD.md step 1 and "Second round"):
- affinity (the paper): s_i^(l) = (1/Z) sum_j (1/L_j) sum_t g_{i,t}^(l), g the gate score the
  architecture uses (adapter.used_gate_scores: router probability if i is in t's top-K,
  else 0), over the non-pad tokens of each sequence, then averaged over the Z sequences.
- frequency (diagnostic): the same average of the selection indicator 1[i in TopK_t].
- contrastive (beyond the paper): forget gate mass minus retain gate mass, both averaged as
  above but over the loss positions (`loss_mask`) when the batch has them, else over all
  non-pad tokens. In the feasibility runs this picked the expert that made one enough.

Batch convention (shared with workers/data.py): a dict of [B, S] tensors
- input_ids, attention_mask (1 = real token; padding excluded everywhere),
- optional loss_mask: loss_mask[b, t] = 1 means position t's output is scored against
  token t+1, i.e. t is a position that PREDICTS a target token. For prompt/answer records
  these are the positions from the last prompt token to the second-to-last answer token
  (the first of them is "the position that predicts the answer").
- or optional labels (HF convention, -100 = ignored, aligned with input_ids): then
  loss_mask[t] = labels[t+1] != -100 is derived.
The caller samples the calibration subset (workers/data.py); this module only stops after
`token_budget` non-pad tokens (at batch granularity: the batch that crosses the budget is
used whole; `ExpertMap.tokens` records the count).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from workers.moe.base import MoEAdapter
from workers.routing import Batch, attention_mask_of, router_outputs

Method = Literal["affinity", "contrastive", "frequency"]
METHODS: tuple[str, ...] = ("affinity", "contrastive", "frequency")
EXPERT_MAP_FORMAT = "moe-unlearn-expert-map/1"


class ScoredExpert(NamedTuple):
    """One (layer, expert) pair with its attribution score; ExpertRef-compatible."""

    layer: int
    expert: int
    score: float


@dataclass
class LayerDiagnostic:
    """Why the top expert of a layer is (or is not) a good single target (METHOD.md: one
    expert sufficed where share >= ~0.7 and ratio >= ~15)."""

    layer: int
    top_expert: int  # best expert of the layer by the method's score
    share: float  # its share of the layer's forget gate mass (0..1)
    ratio: float | None  # forget mass / retain mass (None: no retain data, or retain mass 0)
    forget_mass: float = 0.0  # the top expert's forget gate mass
    retain_mass: float | None = None  # its retain gate mass (0.0 with ratio None: infinite)


@dataclass
class ExpertMap:
    """Scores of every routed expert of every MoE layer, and what was selected.

    Matrices are [n_moe_layers][E] lists, row r belonging to decoder layer layers[r].
    forget_mass / retain_mass: mean gate mass per the averaging above, at the method's
    positions (loss positions for contrastive, all non-pad tokens otherwise);
    forget_frequency: mean selection indicator at the same positions."""

    method: str
    layers: list[int]
    num_experts: int
    top_k: int
    scores: list[list[float]]
    forget_mass: list[list[float]]
    forget_frequency: list[list[float]]
    retain_mass: list[list[float]] | None = None
    ranking: list[ScoredExpert] = field(default_factory=list)
    selected: list[ScoredExpert] = field(default_factory=list)
    diagnostics: list[LayerDiagnostic] = field(default_factory=list)
    tokens: int = 0  # non-pad forget tokens seen
    sequences: int = 0  # forget sequences that contributed (Z)
    retain_tokens: int = 0
    positions: str = "all"  # "all" non-pad tokens, or "loss" positions

    def score(self, layer: int, expert: int) -> float:
        """Score of one pair; ValueError naming the valid ranges."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {self.layers}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: valid 0..{self.num_experts - 1}")
        return self.scores[self.layers.index(layer)][expert]

    @property
    def target_layer(self) -> int | None:
        """The layer of the first selected expert (the router the anchor trains)."""
        return self.selected[0].layer if self.selected else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = EXPERT_MAP_FORMAT
        d["ranking"] = [s._asdict() for s in self.ranking]
        d["selected"] = [s._asdict() for s in self.selected]
        d["target_layer"] = self.target_layer
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> ExpertMap:
        if isinstance(data, str):
            data = json.loads(data)
        data = dict(data)
        if data.pop("format", EXPERT_MAP_FORMAT) != EXPERT_MAP_FORMAT:
            raise ValueError(f"not an expert map of format {EXPERT_MAP_FORMAT}")
        data.pop("target_layer", None)
        data["ranking"] = [ScoredExpert(**s) for s in data.get("ranking", [])]
        data["selected"] = [ScoredExpert(**s) for s in data.get("selected", [])]
        data["diagnostics"] = [LayerDiagnostic(**x) for x in data.get("diagnostics", [])]
        return cls(**data)


def resolve_method(method: str, has_retain: bool) -> Method:
    """'auto' -> contrastive when retain data is given, else the paper's affinity."""
    if method == "auto":
        return "contrastive" if has_retain else "affinity"
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}: use auto, {', '.join(METHODS)}")
    if method == "contrastive" and not has_retain:
        raise ValueError("attribution 'contrastive' needs retain batches")
    return method  # type: ignore[return-value]


def loss_positions(batch: Batch) -> torch.Tensor | None:
    """[B, S] bool: positions that predict a target token (see the module docstring), or
    None when the batch carries neither loss_mask nor labels."""
    ids = batch["input_ids"]
    if batch.get("loss_mask") is not None:
        lm = batch["loss_mask"]
        if lm.shape != ids.shape:
            raise ValueError(f"loss_mask shape {tuple(lm.shape)} != input_ids {tuple(ids.shape)}")
        return lm.bool()
    labels = batch.get("labels")
    if labels is not None:
        out = torch.zeros_like(ids, dtype=torch.bool)
        out[:, :-1] = labels[:, 1:] != -100
        return out
    return None


@dataclass
class _Acc:
    """Running sums of per-sequence means (float64)."""

    mass: torch.Tensor  # [n_layers, E]
    freq: torch.Tensor  # [n_layers, E]
    sequences: int = 0
    tokens: int = 0


def _accumulate(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: Iterable[Batch],
    layers: list[int],
    use_loss_positions: bool,
    forwards: tuple[int, Batch] | None = None,
) -> _Acc:
    """forwards: (n, filler) in lockstep (a model partitioned over the ranks): exactly n
    forwards, the batches' and then the filler's (discarded) for the rest."""
    e = adapter.num_experts
    zeros = torch.zeros(len(layers), e, dtype=torch.float64)
    acc = _Acc(zeros.clone(), zeros.clone())
    ran = 0
    for batch in batches:
        mask = attention_mask_of(batch)
        acc.tokens += int(mask.sum())
        pos = mask
        if use_loss_positions:
            lp = loss_positions(batch)
            if lp is not None:
                pos = mask & lp
        b, s = mask.shape
        counts = pos.sum(dim=1).to(torch.float64)  # L_j (positions per sequence)
        keep = counts > 0  # a sequence without positions does not count in Z
        if not bool(keep.any()):
            continue  # (in lockstep the filler makes up its forward)
        w = pos.to(torch.float64).unsqueeze(-1)  # [B, S, 1]
        outs = router_outputs(model, adapter, batch)
        ran += 1
        for r, layer in enumerate(layers):
            o = outs[layer]
            g = adapter.used_gate_scores(o).to("cpu", torch.float64).reshape(b, s, e)
            sel = adapter.topk_mask(o).to("cpu", torch.float64).reshape(b, s, e)
            per_seq_mass = (g * w).sum(1)[keep] / counts[keep].unsqueeze(-1)
            per_seq_freq = (sel * w).sum(1)[keep] / counts[keep].unsqueeze(-1)
            acc.mass[r] += per_seq_mass.sum(0)
            acc.freq[r] += per_seq_freq.sum(0)
        acc.sequences += int(keep.sum())
    if forwards is not None:
        n, filler = forwards
        for _ in range(n - ran):
            router_outputs(model, adapter, filler)
    return acc


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks, in place (float64)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def budget_prefix(batches: Iterable[Batch], token_budget: int) -> Iterator[Batch]:
    """The batches attribution reads: up to and including the one whose non-pad tokens
    bring the running count to `token_budget` (the batch that crosses it is used whole)."""
    tokens = 0
    for b in batches:  # may be an endless sampler: stop as soon as the budget is met
        yield b
        tokens += int(attention_mask_of(b).sum())
        if tokens >= token_budget:
            return


def _side(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: Iterable[Batch],
    layers: list[int],
    token_budget: int,
    use_lp: bool,
    shard: tuple[int, int],
    reduce: Reduce,
    lockstep: bool = False,
) -> _Acc:
    """The sums over this rank's share of the budget prefix (batches rank, rank + world,
    ...), summed over ranks by `reduce` (every rank gets the same totals). lockstep: every
    rank runs the same number of forwards, ceil(prefix / world), padding with discarded
    ones (the gathers of a partitioned model pair up)."""
    rank, world = shard
    if lockstep:
        prefix = list(budget_prefix(batches, token_budget))
        rounds = -(-len(prefix) // world)
        forwards = (rounds, prefix[0]) if prefix else None
        acc = _accumulate(model, adapter, prefix[rank::world], layers, use_lp, forwards)
    else:
        mine = itertools.islice(budget_prefix(batches, token_budget), rank, None, world)
        acc = _accumulate(model, adapter, mine, layers, use_lp)
    if reduce is _identity:
        return acc
    k = acc.mass.numel()
    counts = torch.tensor([acc.sequences, acc.tokens], dtype=torch.float64)
    flat = reduce(torch.cat([acc.mass.flatten(), acc.freq.flatten(), counts]))
    return _Acc(
        flat[:k].view_as(acc.mass),
        flat[k : 2 * k].view_as(acc.freq),
        int(flat[2 * k]),
        int(flat[2 * k + 1]),
    )


def attribute(
    model: nn.Module,
    adapter: MoEAdapter,
    forget_batches: Iterable[Batch],
    *,
    retain_batches: Iterable[Batch] | None = None,
    method: str = "auto",
    token_budget: int = 100_000,
    at_loss_positions: bool | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce = _identity,
    lockstep: bool = False,
) -> ExpertMap:
    """Score every routed expert of every MoE layer on the forget batches.

    method: auto | affinity | contrastive | frequency (see the module docstring).
    retain_batches: needed by contrastive; with the other methods it only feeds the
      diagnostics' forget/retain ratio.
    token_budget: stop after this many non-pad tokens (forget and retain each).
    at_loss_positions: average over loss positions (True) or all non-pad tokens (False);
      None = True for contrastive, False for affinity/frequency (the paper's definition).
    shard, reduce: (rank, world) and a sum over ranks (e.g. torch.distributed.all_reduce):
      rank r reads the calibration batches r, r + world, ... and every rank returns the
      same map (equal to one process's up to float64 summation order).
    lockstep: every rank runs the same number of forwards (a model partitioned over the
      ranks, ZeRO-3: each forward gathers every layer's shards, a collective).
    Returns an ExpertMap with ranking filled and `selected` empty (see workers.selection).
    """
    m = resolve_method(method, retain_batches is not None)
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    use_lp = (m == "contrastive") if at_loss_positions is None else at_loss_positions
    layers = adapter.moe_layer_indices()

    def side(batches: Iterable[Batch]) -> _Acc:
        return _side(model, adapter, batches, layers, token_budget, use_lp, shard, reduce, lockstep)

    f = side(forget_batches)
    if f.sequences == 0:
        raise ValueError("the forget batches hold no usable tokens (empty, or no loss positions)")
    f_mass = f.mass / f.sequences
    f_freq = f.freq / f.sequences
    r_mass: torch.Tensor | None = None
    r_tokens = 0
    if retain_batches is not None:
        r = side(retain_batches)
        if r.sequences == 0:
            raise ValueError("the retain batches hold no usable tokens")
        r_mass = r.mass / r.sequences
        r_tokens = r.tokens
    if m == "affinity":
        scores = f_mass
    elif m == "frequency":
        scores = f_freq
    else:
        assert r_mass is not None
        scores = f_mass - r_mass
    emap = ExpertMap(
        method=m,
        layers=layers,
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        scores=scores.tolist(),
        forget_mass=f_mass.tolist(),
        forget_frequency=f_freq.tolist(),
        retain_mass=None if r_mass is None else r_mass.tolist(),
        tokens=f.tokens,
        sequences=f.sequences,
        retain_tokens=r_tokens,
        positions="loss" if use_lp else "all",
    )
    emap.ranking = rank(emap)
    emap.diagnostics = diagnose(emap)
    return emap


def rank(emap: ExpertMap) -> list[ScoredExpert]:
    """Every (layer, expert) pair by score, best first (ties: lower layer, then expert)."""
    pairs = [
        ScoredExpert(layer, e, emap.scores[r][e])
        for r, layer in enumerate(emap.layers)
        for e in range(emap.num_experts)
    ]
    return sorted(pairs, key=lambda p: (-p.score, p.layer, p.expert))


def diagnose(emap: ExpertMap) -> list[LayerDiagnostic]:
    """Per layer: the top expert's share of the forget gate mass and forget/retain ratio."""
    out: list[LayerDiagnostic] = []
    for r, layer in enumerate(emap.layers):
        row = emap.scores[r]
        top = max(range(emap.num_experts), key=lambda e: (row[e], -e))
        fm = emap.forget_mass[r]
        total = sum(fm)
        share = fm[top] / total if total > 0 else 0.0
        ratio: float | None = None
        rm: float | None = None
        if emap.retain_mass is not None:
            rm = emap.retain_mass[r][top]
            # JSON has no infinity: a zero retain mass is reported as ratio None, mass 0.0.
            ratio = fm[top] / rm if rm > 0 and math.isfinite(fm[top] / rm) else None
        out.append(LayerDiagnostic(layer, top, share, ratio, fm[top], rm))
    return out
