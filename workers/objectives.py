"""Unlearning objectives: GA, GDiff, NPO, SimNPO, RMU, and the SEUF router anchor.

Every base objective is a typed function

    loss_fn(outputs: Outputs, reference: Reference | None, batch: Batches,
            opts: ObjectiveOptions) -> (loss tensor, {part name: float})

registered by name in `OBJECTIVES` (the one registry). Signs follow METHOD.md: every
objective is MINIMISED, and minimising any forget term RAISES the forget NLL.

Conventions (batch fields: see workers/data.py):
- NLL_i  = sum over positions t with loss_mask[i, t] = 1 of -log p(input_ids[i, t+1] | <= t),
  the sequence-summed NLL of sample i; n_i = sum_t loss_mask[i, t].
- "token NLL" of a batch = sum_i NLL_i / sum_i n_i (mean over target tokens, as HF's loss).
- The training forward computes logits only at the scored positions (`loss_positions`);
  the losses equal those from full [B, S, V] logits (tests/engine/test_objectives.py).
- GA      l = -tokenNLL(f)
- GDiff   l = -tokenNLL(f) + lambda * tokenNLL(r)
- NPO     l = -(2/beta) * mean_i log sigmoid(beta * (NLL_i - NLLref_i))  [+ lambda*tokenNLL(r)
          when a retain batch is given]; NLLref from the frozen model, computed once
          before training (`workers.reference`), never the current model.
- SimNPO  l = -(2/beta) * mean_i log sigmoid(beta * (NLL_i / n_i - delta))  [+ retain term]
- RMU     l = MSE(h(x_f), c*u) + alpha_r * MSE(h(x_r), h_ref(x_r)); h = output of the MLP /
          MoE block of layer `rmu_layer`, MSE = mean over real (attention_mask) tokens and
          hidden units (the scale the RMU code's mse_loss uses, for which c and alpha_r were
          tuned); u a fixed seeded random unit vector; h_ref precomputed once. Options:
          the forget MSE only at answer-predicting positions (rmu_positions "answer"), and
          c relative to the block's mean reference output norm (rmu_coeff_relative), and
          u_i one Gaussian unit vector per forget sample i (rmu_directions "per_sample").
- Anchor  L_anchor = mean over real forget tokens t of sum_e (p_t,e - a_e)^2 (reduction
          "sum", the paper) or mean_e (reduction "mean", the authors' code: divided by E);
          p_t = adapter.gate_probs(router logits) from the router's own forward (router_tap);
          a = one-hot on the layer's selected expert (1/m on each of m selected experts of
          one layer, so a stays a distribution); averaged over the anchored layers.
SEUF wraps any base objective: total = base (l_f + lambda*l_r) + alpha * L_anchor
          [+ w_rr * L_rr, the retain routing loss of workers/retain_routing.py, when on].
The model's load-balancing aux loss is off (output_router_logits=False) unless
`router_aux_loss` is set; then router_aux_loss_coef * aux_loss is added (never negated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.data import Batch
from workers.moe.base import MoEAdapter, MoELayer, RouterOutput, router_tap
from workers.retain_routing import RoutingTargets, retain_routing_loss
from workers.spec import JobSpec, ObjectiveOptions


@dataclass
class Batches:
    """One step's data: a forget batch and, when the objective uses one, a retain batch."""

    forget: Batch
    retain: Batch | None = None


@dataclass
class SideOutputs:
    """What one forward pass on one batch produced."""

    # [N, V] at the batch's loss positions (`loss_positions`, run_forward's default), or
    # [B, S, V] at every position (logits="all"); None when not computed (logits="none").
    logits: torch.Tensor | None
    activations: torch.Tensor | None = None  # [B, S, H] output of the captured MLP block
    routers: dict[int, list[RouterOutput]] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None


@dataclass
class Outputs:
    forget: SideOutputs
    retain: SideOutputs | None = None


@dataclass
class Reference:
    """Values of the frozen original model, computed once before training."""

    forget_nll: torch.Tensor | None = None  # [N_forget] sequence-summed NLL per sample index
    retain_activations: list[torch.Tensor] | None = None  # per retain sample [L_i, H]
    rmu_direction: torch.Tensor | None = None  # [H] unit vector u
    rmu_block_norm: float | None = None  # mean per-token norm of h_ref (rmu_coeff_relative)
    rmu_seed: int = 0  # seeds the per-sample directions (rmu_directions "per_sample")
    retain_routing: RoutingTargets | None = None  # the retain routing loss's targets


LossFn = Callable[
    [Outputs, Reference | None, Batches, ObjectiveOptions], tuple[torch.Tensor, dict[str, float]]
]


# --- building blocks ---------------------------------------------------------------------
def loss_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every scored position, row-major: loss_mask[row, col] = 1, i.e. the
    logits at (row, col) are scored against input_ids[row, col + 1]."""
    return batch["loss_mask"][:, :-1].nonzero(as_tuple=True)


def sequence_nll(logits: torch.Tensor | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL_i [B], n_i [B]): summed NLL over each sample's target positions and their count.
    `logits` is [N, V] at `loss_positions(batch)` (what run_forward returns) or [B, S, V]."""
    if logits is None:
        raise ValueError("no logits: the forward ran with logits='none'")
    rows, cols = loss_positions(batch)
    pred = (logits[rows, cols] if logits.dim() == 3 else logits).float()
    ce = F.cross_entropy(pred, batch["input_ids"][rows, cols + 1], reduction="none")
    mask = batch["loss_mask"][:, :-1].to(ce.dtype)
    # Back to [B, S-1] (zeros elsewhere), then a row sum: deterministic, the same order as
    # summing over every position.
    per_pos = ce.new_zeros(mask.shape).index_put((rows, cols), ce)
    return per_pos.sum(dim=1), mask.sum(dim=1)


def token_nll(logits: torch.Tensor | None, batch: Batch) -> torch.Tensor:
    """Mean NLL over all target tokens of the batch."""
    nll, n = sequence_nll(logits, batch)
    return nll.sum() / n.sum().clamp_min(1.0)


def masked_mse(x: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and hidden units of (x - target)^2."""
    m = attention_mask.to(x.dtype).unsqueeze(-1)
    sq = (x.float() - target.float()) ** 2 * m
    return sq.sum() / (m.sum() * x.shape[-1]).clamp_min(1.0)


def _retain_term(
    outputs: Outputs, batch: Batches, opts: ObjectiveOptions, parts: dict[str, float]
) -> torch.Tensor | None:
    if batch.retain is None or outputs.retain is None:
        return None
    r = token_nll(outputs.retain.logits, batch.retain)
    parts["retain_nll"] = float(r.detach())
    return opts.retain_weight * r


def _need_retain(outputs: Outputs, batch: Batches, name: str) -> tuple[SideOutputs, Batch]:
    if batch.retain is None or outputs.retain is None:
        raise ValueError(f"objective '{name}' needs a retain batch")
    return outputs.retain, batch.retain


# --- the base objectives -------------------------------------------------------------------
def ga_loss(
    outputs: Outputs, reference: Reference | None, batch: Batches, opts: ObjectiveOptions
) -> tuple[torch.Tensor, dict[str, float]]:
    f = token_nll(outputs.forget.logits, batch.forget)
    loss = -f
    return loss, {"forget_nll": float(f.detach()), "forget": float(loss.detach())}


def gdiff_loss(
    outputs: Outputs, reference: Reference | None, batch: Batches, opts: ObjectiveOptions
) -> tuple[torch.Tensor, dict[str, float]]:
    ret_out, ret_batch = _need_retain(outputs, batch, "gdiff")
    f = token_nll(outputs.forget.logits, batch.forget)
    r = token_nll(ret_out.logits, ret_batch)
    loss = -f + opts.retain_weight * r
    return loss, {
        "forget_nll": float(f.detach()),
        "retain_nll": float(r.detach()),
        "forget": float(-f.detach()),
    }


def npo_loss(
    outputs: Outputs, reference: Reference | None, batch: Batches, opts: ObjectiveOptions
) -> tuple[torch.Tensor, dict[str, float]]:
    if reference is None or reference.forget_nll is None:
        raise ValueError("objective 'npo' needs reference forget NLLs (reference_forget_nll)")
    nll, n = sequence_nll(outputs.forget.logits, batch.forget)
    ref = reference.forget_nll.to(nll.device)[batch.forget["index"].to(nll.device)]
    beta = opts.beta
    lf = -(2.0 / beta) * F.logsigmoid(beta * (nll - ref)).mean()
    parts = {
        "forget_nll": float((nll.sum() / n.sum().clamp_min(1.0)).detach()),
        "forget": float(lf.detach()),
    }
    r = _retain_term(outputs, batch, opts, parts)
    return (lf if r is None else lf + r), parts


def simnpo_loss(
    outputs: Outputs, reference: Reference | None, batch: Batches, opts: ObjectiveOptions
) -> tuple[torch.Tensor, dict[str, float]]:
    nll, n = sequence_nll(outputs.forget.logits, batch.forget)
    beta = opts.beta
    per_tok = nll / n.clamp_min(1.0)
    lf = -(2.0 / beta) * F.logsigmoid(beta * (per_tok - opts.simnpo_delta)).mean()
    parts = {
        "forget_nll": float((nll.sum() / n.sum().clamp_min(1.0)).detach()),
        "forget": float(lf.detach()),
    }
    r = _retain_term(outputs, batch, opts, parts)
    return (lf if r is None else lf + r), parts


def rmu_sample_directions(hidden_size: int, seed: int, indices: torch.Tensor) -> torch.Tensor:
    """[B, H] unit vectors, one per forget sample index, each a function of (seed, index)
    only, so a sample steers to the same target in every batch, epoch and worker. Gaussian,
    not RMU's uniform entries: uniform vectors all lie in the positive orthant (cosine ~0.75
    to each other), so per-sample targets would be nearly one direction."""
    rows = []
    for idx in indices.tolist():
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(idx))
        u = torch.randn(hidden_size, generator=g)
        rows.append(u / u.norm())
    return torch.stack(rows)


def rmu_loss(
    outputs: Outputs, reference: Reference | None, batch: Batches, opts: ObjectiveOptions
) -> tuple[torch.Tensor, dict[str, float]]:
    if reference is None or reference.rmu_direction is None or not reference.retain_activations:
        raise ValueError("objective 'rmu' needs a reference (rmu_direction, retain activations)")
    ret_out, ret_batch = _need_retain(outputs, batch, "rmu")
    hf, hr = outputs.forget.activations, ret_out.activations
    if hf is None or hr is None:
        raise ValueError("objective 'rmu' needs the captured block activations")
    c = opts.rmu_steering_coeff
    if opts.rmu_coeff_relative:
        if reference.rmu_block_norm is None:
            raise ValueError("rmu_coeff_relative needs the reference block norm")
        c *= reference.rmu_block_norm
    if opts.rmu_directions == "per_sample":
        dims = hf.shape[-1]
        u = rmu_sample_directions(dims, reference.rmu_seed, batch.forget["index"])
        steer = (c * u.to(hf.device)).unsqueeze(1).expand_as(hf)
    else:
        steer = (c * reference.rmu_direction.to(hf.device)).expand_as(hf)
    steered = batch.forget["attention_mask"]
    if opts.rmu_positions == "answer":
        # Positions whose output predicts an answer token (loss_mask's convention).
        at_answer = torch.zeros_like(steered)
        at_answer[:, :-1] = batch.forget["loss_mask"][:, :-1]
        steered = steered * at_answer
    lf = masked_mse(hf, steer, steered)
    ref = pad_activations(reference.retain_activations, ret_batch, hr)
    lr = masked_mse(hr, ref, ret_batch["attention_mask"])
    loss = lf + opts.rmu_alpha * lr
    return loss, {"forget": float(lf.detach()), "retain_mse": float(lr.detach())}


def pad_activations(
    per_sample: Sequence[torch.Tensor], batch: Batch, like: torch.Tensor
) -> torch.Tensor:
    """Stack the reference activations of the batch's samples, right padded to `like`."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for row, idx in enumerate(batch["index"].tolist()):
        a = per_sample[idx]
        n = min(a.shape[0], out.shape[1])
        out[row, :n] = a[:n].to(out.device)
    return out


@dataclass(frozen=True)
class ObjectiveDef:
    """A registry entry: the loss and what it needs around it."""

    fn: LossFn
    needs_retain: bool  # the loss cannot be computed without a retain batch
    uses_retain: bool  # a retain batch, if given, adds a term
    needs_reference: bool  # a Reference must be precomputed (prepare_reference)
    captures_activations: bool  # the forward must capture the RMU layer's block output
    needs_logits: bool = True  # False: the forward skips the LM head (RMU)


OBJECTIVES: dict[str, ObjectiveDef] = {
    "ga": ObjectiveDef(ga_loss, False, False, False, False),
    "gdiff": ObjectiveDef(gdiff_loss, True, True, False, False),
    "npo": ObjectiveDef(npo_loss, False, True, True, False),
    "simnpo": ObjectiveDef(simnpo_loss, False, True, False, False),
    "rmu": ObjectiveDef(rmu_loss, True, True, True, True, needs_logits=False),
}


def get_objective(name: str) -> ObjectiveDef:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# --- the router anchor ---------------------------------------------------------------------
def anchor_targets(
    selected: Sequence[tuple[int, int]], num_experts: int
) -> dict[int, torch.Tensor]:
    """Layer -> anchor vector a [E]: 1/m on each of the layer's m selected experts."""
    by_layer: dict[int, list[int]] = {}
    for layer, e in selected:
        by_layer.setdefault(int(layer), []).append(int(e))
    out: dict[int, torch.Tensor] = {}
    for layer, experts in by_layer.items():
        a = torch.zeros(num_experts)
        a[sorted(set(experts))] = 1.0 / len(set(experts))
        out[layer] = a
    return out


def anchor_loss(
    routers: dict[int, list[RouterOutput]],
    targets: dict[int, torch.Tensor],
    attention_mask: torch.Tensor,
    adapter: MoEAdapter,
    reduction: str = "sum",
) -> torch.Tensor:
    """Mean over real tokens of ||p_t - a||^2 (sum over experts, or mean with "mean"),
    averaged over the anchored layers. `routers` come from router_tap of ONE forward."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"anchor_reduction must be 'sum' or 'mean' (got {reduction!r})")
    real = attention_mask.reshape(-1).bool()
    terms = []
    for layer, a in targets.items():
        recs = routers.get(layer)
        if not recs:
            raise ValueError(f"no router output recorded for anchored layer {layer}")
        p = adapter.gate_probs(recs[-1].logits)  # [T, E], T = B*S
        d = (p - a.to(p.device, p.dtype)) ** 2
        per_tok = d.sum(-1) if reduction == "sum" else d.mean(-1)
        terms.append(per_tok[real.to(p.device)].mean())
    return torch.stack(terms).mean()


@dataclass
class Anchor:
    targets: dict[int, torch.Tensor]
    weight: float = 1.0  # alpha
    reduction: str = "sum"


# --- forward and the bound objective -----------------------------------------------------
LogitsAt = Literal["loss", "all", "none"]


def run_forward(
    model: nn.Module,
    batch: Batch,
    tap: Sequence[MoELayer] = (),
    capture: nn.Module | None = None,
    aux: bool = False,
    logits: LogitsAt = "loss",
) -> SideOutputs:
    """One forward pass recording router outputs of `tap` layers and the output of
    `capture` (a module whose forward returns a tensor, e.g. an MoE block).

    logits: "loss" computes the LM head only at `loss_positions(batch)` ([N, V]), "all" at
    every position ([B, S, V]), "none" not at all (RMU). Why: the head and the vocabulary-
    wide log-softmax (and their backward) over every position were the largest cost of a
    SEUF step after the experts; prompt and padding positions are never scored."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine -> the HF model
    hooks = []
    captured: list[torch.Tensor] = []
    if capture is not None:

        def grab(_m: nn.Module, _i: object, out: object) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[index]

        hooks.append(capture.register_forward_hook(grab))
    if logits != "all":
        rows, cols = loss_positions(batch)
        if logits == "none":
            rows, cols = rows[:0], cols[:0]

        def keep(_m: nn.Module, args: tuple) -> tuple:
            return (args[0][rows, cols], *args[1:])  # [B, S, H] -> [N, H]

        # A pre-hook on the head (not a call of the bare decoder): the wrapped model's own
        # forward still runs (DDP / DeepSpeed bookkeeping, the aux loss).
        hooks.append(inner.get_output_embeddings().register_forward_pre_hook(keep))
    kwargs: dict[str, object] = {"use_cache": False}
    config = getattr(inner, "config", None)
    if hasattr(config, "output_router_logits"):
        kwargs["output_router_logits"] = aux  # off unless asked: it would fight the anchor
    elif aux:
        kind = getattr(config, "model_type", type(model).__name__)
        raise ValueError(f"router_aux_loss: {kind} computes no load-balancing loss")
    try:
        with router_tap(list(tap)) as rec:
            out = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
            )
    finally:
        for h in hooks:
            h.remove()
    return SideOutputs(
        logits=None if logits == "none" else out.logits,
        activations=captured[-1] if captured else None,
        routers=rec,
        aux_loss=getattr(out, "aux_loss", None) if aux else None,
    )


@dataclass
class Objective:
    """A base loss bound to its options and reference, optionally wrapped by SEUF's anchor.

    `forward` runs the model on a step's batches (recording what the loss needs); calling
    the objective on (outputs, batches) returns (total loss, logged float parts)."""

    name: str
    options: ObjectiveOptions
    reference: Reference | None = None
    anchor: Anchor | None = None
    adapter: MoEAdapter | None = None
    anchor_layers: list[MoELayer] = field(default_factory=list)
    capture: nn.Module | None = None  # RMU: the block whose output is steered
    router_aux_loss: bool = False
    aux_coef: float = 0.0
    # The retain routing loss (weight, the MoE layers it keeps): on when weight > 0.
    retain_routing_weight: float = 0.0
    retain_routing_layers: list[MoELayer] = field(default_factory=list)

    @property
    def definition(self) -> ObjectiveDef:
        return get_objective(self.name)

    @property
    def keeps_retain_routing(self) -> bool:
        return self.retain_routing_weight > 0 and bool(self.retain_routing_layers)

    @property
    def uses_retain(self) -> bool:
        """Whether a step's retain batch is used: by the base loss, or by L_rr (GA)."""
        return self.definition.uses_retain or self.keeps_retain_routing

    def forward(
        self, model: nn.Module, batches: Batches, extra_tap: Sequence[MoELayer] = ()
    ) -> Outputs:
        tap = {m.layer: m for m in [*self.anchor_layers, *extra_tap]}
        d = self.definition
        cap = self.capture if d.captures_activations else None
        at: LogitsAt = "loss" if d.needs_logits else "none"
        aux = self.router_aux_loss
        fo = run_forward(model, batches.forget, list(tap.values()), cap, aux, at)
        ro = None
        if batches.retain is not None and self.uses_retain:
            r_tap = self.retain_routing_layers if self.keeps_retain_routing else []
            r_at: LogitsAt = at if d.uses_retain else "none"  # GA: routing only
            ro = run_forward(model, batches.retain, r_tap, cap, aux, r_at)
        return Outputs(fo, ro)

    def __call__(self, outputs: Outputs, batches: Batches) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = self.definition.fn(outputs, self.reference, batches, self.options)
        if self.anchor is not None and self.anchor.weight > 0:
            if self.adapter is None:
                raise ValueError("the anchor loss needs the model's adapter")
            a = anchor_loss(
                outputs.forget.routers,
                self.anchor.targets,
                batches.forget["attention_mask"],
                self.adapter,
                self.anchor.reduction,
            )
            loss = loss + self.anchor.weight * a
            parts["anchor"] = float(a.detach())
        if self.keeps_retain_routing and outputs.retain is not None and batches.retain is not None:
            if self.adapter is None or self.reference is None or not self.reference.retain_routing:
                raise ValueError("the retain routing loss needs its reference (prepare_reference)")
            rr = retain_routing_loss(
                outputs.retain.routers, self.reference.retain_routing, batches.retain, self.adapter
            )
            loss = loss + self.retain_routing_weight * rr
            parts["retain_routing"] = float(rr.detach())
        if self.router_aux_loss:
            for side in (outputs.forget, outputs.retain):
                if side is not None and side.aux_loss is not None:
                    aux = side.aux_loss
                    loss = loss + self.aux_coef * aux
                    parts["aux"] = parts.get("aux", 0.0) + float(aux.detach())
        parts["total"] = float(loss.detach())
        return loss, parts


def make_objective(
    name: str,
    options: ObjectiveOptions,
    adapter: MoEAdapter,
    selected: Sequence[tuple[int, int]] = (),
    anchor_weight: float = 0.0,
    anchor_reduction: str = "sum",
    reference: Reference | None = None,
    router_aux_loss: bool = False,
    layers: Sequence[MoELayer] | None = None,
    retain_routing_weight: float = 0.0,
) -> Objective:
    """Bind a registered objective. With anchor_weight > 0 and a selection, SEUF's anchor is
    added on the selected experts' layers. Pass `layers` (adapter.moe_layers() taken before
    apply_scope) when the scope is already wired; the RMU layer is options.rmu_layer, else
    the first selected layer, else the middle decoder layer. With retain_routing_weight > 0
    the retain routing loss keeps the MoE layers from the lowest selected layer up (every
    MoE layer without a selection: all parameters train)."""
    d = get_objective(name)
    moe_layers = list(layers) if layers is not None else adapter.moe_layers()
    by_idx = {m.layer: m for m in moe_layers}
    anchor = None
    anchor_layers: list[MoELayer] = []
    if anchor_weight > 0 and selected:
        targets = anchor_targets(selected, adapter.num_experts)
        missing = [lay for lay in targets if lay not in by_idx]
        if missing:
            raise ValueError(f"selected layer(s) {missing} are not MoE layers")
        anchor = Anchor(targets, anchor_weight, anchor_reduction)
        anchor_layers = [by_idx[lay] for lay in targets]
    capture = None
    if d.captures_activations:
        capture = adapter.decoder_layers()[rmu_layer_index(options, adapter, selected)].mlp
    coef = float(getattr(adapter.config, "router_aux_loss_coef", 0.0) or 0.0)
    lowest = min((lay for lay, _ in selected), default=None)
    kept = [m for m in moe_layers if lowest is None or m.layer >= lowest]
    return Objective(
        name, options, reference, anchor, adapter, anchor_layers, capture, router_aux_loss,
        coef, retain_routing_weight, kept if retain_routing_weight > 0 else [],
    )  # fmt: skip


def objective_from_spec(
    spec: JobSpec,
    adapter: MoEAdapter,
    selected: Sequence[tuple[int, int]],
    layers: Sequence[MoELayer] | None = None,
    retain_routing_weight: float = 0.0,
    rmu_layer: int | None = None,
) -> Objective:
    """The objective a job spec asks for. The anchor is SEUF's: it is added when the
    router trains (scope "seuf" or "router") and seuf.anchor_weight > 0; "full" is the
    plain baseline and "experts" has no trainable router to anchor. The retain routing
    loss's weight is resolved by the caller (JobSpec.retain_routing_weight), and so is
    `rmu_layer` where the plan overrides the objective's rule (seuf_plan.fallback_rmu_layer)."""
    anchor = spec.seuf.anchor_weight if spec.scope in ("seuf", "router") else 0.0
    options = spec.objective
    if rmu_layer is not None:
        options = options.model_copy(update={"rmu_layer": rmu_layer, "rmu_layer_offset": 0})
    return make_objective(
        spec.algorithm,
        options,
        adapter,
        selected,
        anchor_weight=anchor,
        anchor_reduction=spec.seuf.anchor_reduction,
        router_aux_loss=spec.seuf.router_aux_loss,
        layers=layers,
        retain_routing_weight=retain_routing_weight,
    )


def rmu_layer_index(
    options: ObjectiveOptions, adapter: MoEAdapter, selected: Sequence[tuple[int, int]]
) -> int:
    n = len(adapter.decoder_layers())
    layer = options.rmu_layer
    if layer is None:
        # Above the target layer, the one trained expert reaches every later position
        # through attention, not only the tokens routed to it (rmu_layer_offset).
        if selected:
            layer = min(min(lay for lay, _ in selected) + options.rmu_layer_offset, n - 1)
        else:
            layer = n // 2
    if not 0 <= layer < n:
        raise ValueError(f"rmu_layer {layer} out of range: the model has {n} layers")
    return layer
