"""Robustness checks of an unlearned MoE model: is the knowledge gone, or only hidden?

Four checks, each a plain function over the unlearned model, its adapter and token batches
(`workers.data` batches: input_ids, attention_mask, labels with -100 off-target), each
returning a `CheckResult` with a verdict `pass`, `fail` or `not_run` (with the reason) and
the threshold it was judged by. The model is left exactly as it was given (every check
puts back what it changed; tests compare state hashes).

Forget accuracy here is next-token top-1 accuracy on the target tokens of the forget
batches (the answer tokens with `loss_tokens: answer`): it needs nothing but the batches,
so it works for user corpora and the demo world alike. `original` maps the names of the
parameters unlearning changed to their values before unlearning (what the pipeline
snapshots before training; small for SEUF: the target layers' fused expert tensors and
routers). Recovery = (probe - unlearned) / (original - unlearned) forget accuracy: 0 means
nothing came back, 1 means the original accuracy came back. When unlearning lowered
forget accuracy by less than MIN_GAP there is nothing to recover: `not_run`.

- router_restored_probe: the unlearned model with the original routers put back, and
  with every MoE layer's routing (top-K indices and weights) forced to what the original
  model chose on the same tokens (GRIP, arXiv 2601.16905: MoE unlearning often reroutes
  around the experts that hold the knowledge). Fails when recovery > threshold (0.5).
- relearning_attack: fine-tunes the job's trainable scope (slices and router, through
  `workers.scope.apply_scope`) for a few steps on one half of the forget batches, measures
  forget accuracy on the other, disjoint half, then `discard()`s the scope: the model is
  bitwise as before, with no second model copy. Fails when recovery > threshold (0.5).
- quantization_check: round-to-nearest (RTN) symmetric group quantisation, implemented
  here (no CPU library fits: bitsandbytes and GPTQ/AWQ kernels need a GPU), of every
  floating weight matrix of the decoder layers (attention, routers, fused experts; not
  embeddings, norms or the LM head) at 8 and 4 bits, groups of `group_size` along the last
  dimension ("Catastrophic Failure of LLM Unlearning via Quantization", Zhang et al. 2024).
  Each module's weights are written to a temporary file and quantised in place just
  before its forward, and read back after it (no backup copy in memory). Fails when
  recovery at any bit width > threshold (0.5).
- membership_inference: per-record Min-K%++ (Zhang et al. 2024: the token log-probability
  standardised by the mean and spread of log-probabilities under the model's own
  next-token distribution, averaged over the lowest k% tokens) and mean token log-likelihood
  (the loss attack), and the ROC AUC of forget records against never-trained records of
  the same distribution. 0.5 = indistinguishable; far below 0.5 also reveals membership
  (over-unlearning). Fails when |AUC - 0.5| > threshold (0.2) for either score; not_run
  without never-trained records.

`run_robustness_checks` is the one function the job pipeline calls, after unlearning and
the "after" evaluation, with the spec's `evaluation.robustness` list.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import torch
from torch import nn

from workers.moe.base import MoEAdapter, router_tap
from workers.scope import apply_scope
from workers.spec_checks import (
    MembershipCheck,
    QuantizationCheck,
    RelearningCheck,
    RobustnessCheck,
    RouterRestoredCheck,
)

Batch = Mapping[str, torch.Tensor]
Verdict = Literal["pass", "fail", "not_run"]
MIN_GAP = 0.05  # forget accuracy unlearning must have removed for recovery to mean anything


@dataclass(frozen=True)
class CheckResult:
    check: str
    verdict: Verdict
    threshold: str
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"check": self.check, "verdict": self.verdict, "threshold": self.threshold,
                "metrics": dict(self.metrics), "reason": self.reason}


# --- measurements -----------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    dev = _device(model)
    out = model(input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["attention_mask"].to(dev), use_cache=False)
    return out.logits.float()


def token_accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Next-token top-1 accuracy on the target tokens (labels != -100); one forward per
    batch, in order (the forced-routing probe relies on it)."""
    hits = total = 0
    with torch.no_grad(), _eval(model):
        for b in batches:
            logits = _logits(model, b)[:, :-1]
            labels = b["labels"][:, 1:].to(logits.device)
            mask = labels != -100
            hits += int(((logits.argmax(-1) == labels) & mask).sum())
            total += int(mask.sum())
    if total == 0:
        raise ValueError("the batches have no target tokens")
    return hits / total


def recovery(probe: float, unlearned: float, original: float) -> float | None:
    """Share of the forgotten accuracy that came back (None: nothing was forgotten)."""
    gap = original - unlearned
    return None if gap < MIN_GAP else (probe - unlearned) / gap


# What `original` maps: a parameter's name (the whole tensor), or (name, expert) for one
# expert's slice of a fused tensor, or (name, None): the regions workers.job.snapshot_regions
# takes, so no whole fused tensor is ever copied for SEUF.
ParamKey = str | tuple[str, int | None]


def param_name(key: ParamKey) -> str:
    return key if isinstance(key, str) else key[0]


@contextmanager
def swapped_in(model: nn.Module, values: Mapping[ParamKey, torch.Tensor]) -> Iterator[None]:
    """Put `values` into the model (a whole parameter, or one expert's slice of it), and the
    current ones back on exit (only the named tensors or slices are copied)."""
    params = dict(model.named_parameters())
    unknown = sorted({param_name(k) for k in values} - set(params))
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(unknown[:3])}")

    def target(key: ParamKey) -> torch.Tensor:
        p = params[param_name(key)]
        return p if isinstance(key, str) or key[1] is None else p[key[1]]

    saved = {k: target(k).detach().clone() for k in values}
    try:
        with torch.no_grad():
            for k, v in values.items():
                t = target(k)
                t.copy_(v.to(t.device, t.dtype))
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                target(k).copy_(v)


Routing = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]  # layer -> [(weights, indices)]


def record_routing(model: nn.Module, adapter: MoEAdapter, batches: Sequence[Batch]) -> Routing:
    """Each MoE layer's top-K weights and indices, per forward call, on `batches`."""
    layers = adapter.moe_layers()
    with torch.no_grad(), _eval(model), router_tap(layers) as rec:
        for b in batches:
            _logits(model, b)
    return {layer: [(o.topk_weights.detach(), o.topk_indices.detach()) for o in outs]
            for layer, outs in rec.items()}


@contextmanager
def forced_routing(model: nn.Module, adapter: MoEAdapter, routing: Routing) -> Iterator[None]:
    """Every router returns the recorded top-K (weights and indices), call by call, in
    the order they were recorded (the same batches must follow, in the same order)."""
    queues = {layer: list(calls) for layer, calls in routing.items()}
    handles = []
    for m in adapter.moe_layers():

        def hook(_mod: nn.Module, _inp: object, out: tuple, layer: int = m.layer) -> tuple:
            if not queues[layer]:
                raise RuntimeError(f"no recorded routing left for layer {layer}")
            w, i = queues[layer].pop(0)
            if i.shape[0] != out[2].shape[0]:
                raise RuntimeError("forced routing replayed on other tokens")
            return (out[0], w.to(out[1].dtype), i.to(out[2].dtype))

        handles.append(m.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _recovery_verdict(
    name: str, threshold: float, acc_u: float, acc_o: float, probes: dict[str, float]
) -> CheckResult:
    metrics = {"forget_acc_unlearned": acc_u, "forget_acc_original": acc_o}
    rule = f"recovery <= {threshold} (recovery = (probe - unlearned) / (original - unlearned))"
    recs: dict[str, float] = {}
    for key, acc in probes.items():
        metrics[f"forget_acc_{key}"] = acc
        r = recovery(acc, acc_u, acc_o)
        if r is not None:
            recs[key] = r
            metrics[f"recovery_{key}"] = r
    if not recs:
        return CheckResult(name, "not_run", rule, metrics,
                           f"unlearning lowered forget accuracy by {acc_o - acc_u:.3f} "
                           f"(< {MIN_GAP}): nothing to recover")
    worst = max(recs, key=lambda k: recs[k])
    if recs[worst] > threshold:
        return CheckResult(name, "fail", rule, metrics,
                           f"{worst}: {recs[worst]:.2f} of the forgotten accuracy came back")
    return CheckResult(name, "pass", rule, metrics)


# --- the four checks --------------------------------------------------------------------


def router_restored_probe(
    model: nn.Module,
    adapter: MoEAdapter,
    original: Mapping[ParamKey, torch.Tensor],
    batches: Sequence[Batch],
    threshold: float = 0.5,
) -> CheckResult:
    """Forget accuracy with the original routers back, and with the original top-K forced."""
    routers = {n for m in adapter.moe_layers() for n in m.router_params}
    acc_u = token_accuracy(model, batches)
    with swapped_in(model, original):
        acc_o = token_accuracy(model, batches)
        routing = record_routing(model, adapter, batches)
    with swapped_in(model, {k: v for k, v in original.items() if param_name(k) in routers}):
        acc_r = token_accuracy(model, batches)
    with forced_routing(model, adapter, routing):
        acc_f = token_accuracy(model, batches)
    return _recovery_verdict("router_restored", threshold, acc_u, acc_o,
                             {"router_restored": acc_r, "forced_topk": acc_f})


def relearning_attack(
    model: nn.Module,
    adapter: MoEAdapter,
    original: Mapping[ParamKey, torch.Tensor],
    scope: str,
    selected: Sequence[tuple[int, int]],
    attack_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    steps: int = 20,
    lr: float = 1e-2,
    threshold: float = 0.5,
) -> CheckResult:
    """Relearn on `attack_batches`, measure on the disjoint `eval_batches`, restore."""
    rule = f"recovery <= {threshold} on records the attack did not see"
    if scope == "full":
        return CheckResult("relearning", "not_run", rule, {},
                           "scope 'full': restoring after the attack would need a second "
                           "model copy")
    if not attack_batches or not eval_batches:
        return CheckResult("relearning", "not_run", rule, {},
                           "needs at least two forget batches (attack and evaluation halves)")
    acc_u = token_accuracy(model, eval_batches)
    with swapped_in(model, original):
        acc_o = token_accuracy(model, eval_batches)
    ts = apply_scope(model, adapter, scope, selected)
    dev = _device(model)
    try:
        opt = torch.optim.AdamW(ts.trainable_parameters(), lr=lr, weight_decay=0.0)
        with _eval(model):  # no dropout: the attack is deterministic
            for step in range(steps):
                b = attack_batches[step % len(attack_batches)]
                out = model(input_ids=b["input_ids"].to(dev),
                            attention_mask=b["attention_mask"].to(dev),
                            labels=b["labels"].to(dev), use_cache=False)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        acc_a = token_accuracy(model, eval_batches)
    finally:
        ts.discard()  # slices dropped, routers restored: bitwise the model we were given
    res = _recovery_verdict("relearning", threshold, acc_u, acc_o, {"relearned": acc_a})
    return CheckResult(res.check, res.verdict, rule, {**res.metrics, "steps": float(steps)},
                       res.reason)


QUANT_CHUNK = 2**22  # weights handled at a time: bounds the float32 temporaries (16 MiB)


def rtn_quantize_(t: torch.Tensor, bits: int, group_size: int) -> None:
    """Round-to-nearest symmetric quantisation of a contiguous `t` in place, one scale per
    group of `group_size` values along the last dimension (the whole row when it does not
    divide); a few groups at a time."""
    last = t.shape[-1]
    g = group_size if last % group_size == 0 else last
    qmax = 2 ** (bits - 1) - 1
    groups = t.detach().view(-1, g)
    rows = max(1, QUANT_CHUNK // g)
    with torch.no_grad():
        for i in range(0, groups.shape[0], rows):
            w = groups[i : i + rows].float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
            q = torch.round(w / scale).clamp(-qmax - 1, qmax) * scale
            groups[i : i + rows] = q.to(t.dtype)


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters()
            if p.dim() >= 2 and p.is_floating_point() and ".layers." in n]


def _spill(t: torch.Tensor, f: BinaryIO) -> None:
    raw = t.detach().view(-1).view(torch.uint8)
    step = QUANT_CHUNK * 4
    for i in range(0, raw.numel(), step):
        f.write(raw[i : i + step].cpu().numpy().tobytes())


def _unspill(t: torch.Tensor, f: BinaryIO) -> None:
    raw = t.detach().view(-1).view(torch.uint8)
    step = QUANT_CHUNK * 4
    with torch.no_grad():
        for i in range(0, raw.numel(), step):
            chunk = bytearray(f.read(min(step, raw.numel() - i)))
            raw[i : i + len(chunk)].copy_(torch.frombuffer(chunk, dtype=torch.uint8))


@contextmanager
def quantized_forward(model: nn.Module, bits: int, group_size: int) -> Iterator[None]:
    """The model runs with every decoder weight matrix RTN-quantised: just before a
    module's forward its own weights are written to a temporary file and quantised in
    place, and right after it they are read back, bitwise. No weight exists twice in
    memory (a backup would double the decoder's bytes, or a layer's fused experts at least)."""
    owners: dict[nn.Module, list[nn.Parameter]] = {}
    for name, p in _quantizable(model):
        owners.setdefault(model.get_submodule(name.rpartition(".")[0]), []).append(p)
    held: dict[nn.Module, BinaryIO] = {}

    def swap_in(mod: nn.Module, _args: object) -> None:
        f = tempfile.TemporaryFile()
        for p in owners[mod]:
            _spill(p, f)
        held[mod] = f  # only once all is on disk: from here on the weights change
        for p in owners[mod]:
            rtn_quantize_(p, bits, group_size)

    def swap_out(mod: nn.Module, _args: object, _out: object) -> None:
        with held.pop(mod) as f:
            f.seek(0)
            for p in owners[mod]:
                _unspill(p, f)

    hooks = [h for m in owners for h in (m.register_forward_pre_hook(swap_in),
                                         m.register_forward_hook(swap_out))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for mod in list(held):  # a forward that raised: its module's weights go back
            swap_out(mod, None, None)


def quantization_check(
    model: nn.Module,
    original: Mapping[ParamKey, torch.Tensor],
    batches: Sequence[Batch],
    bits: Sequence[int] = (8, 4),
    group_size: int = 128,
    threshold: float = 0.5,
) -> CheckResult:
    """Forget accuracy of the RTN-quantised unlearned model at each bit width."""
    acc_u = token_accuracy(model, batches)
    with swapped_in(model, original):
        acc_o = token_accuracy(model, batches)
    probes: dict[str, float] = {}
    for b in bits:
        with quantized_forward(model, int(b), group_size):
            probes[f"int{b}"] = token_accuracy(model, batches)
    res = _recovery_verdict("quantization", threshold, acc_u, acc_o, probes)
    rule = f"{res.threshold}; RTN symmetric, group {group_size}, decoder weights"
    return CheckResult(res.check, res.verdict, rule, res.metrics, res.reason)


def record_scores(
    model: nn.Module, batches: Sequence[Batch], k_percent: float = 20.0
) -> tuple[list[float], list[float]]:
    """Per record: (mean target-token log-likelihood, Min-K%++ score); higher = more
    member-like for both."""
    loss_scores: list[float] = []
    mkpp: list[float] = []
    with torch.no_grad(), _eval(model):
        for b in batches:
            logits = _logits(model, b)[:, :-1]
            labels = b["labels"][:, 1:].to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.exp()
            mu = (probs * logp).sum(-1)
            sigma = ((probs * logp.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
            tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            z = (tok - mu) / sigma
            for r in range(labels.shape[0]):
                m = labels[r] != -100
                if not bool(m.any()):
                    continue
                loss_scores.append(float(tok[r][m].mean()))
                zs = z[r][m].sort().values
                k = max(1, int(round(len(zs) * k_percent / 100.0)))
                mkpp.append(float(zs[:k].mean()))
    return loss_scores, mkpp


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """ROC AUC of `members` scoring above `nonmembers` (Mann-Whitney U; ties count half)."""
    if not members or not nonmembers:
        raise ValueError("AUC needs scores of both groups")
    wins = 0.0
    for a in members:
        for b in nonmembers:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(members) * len(nonmembers))


def membership_inference(
    model: nn.Module,
    member_batches: Sequence[Batch],
    nonmember_batches: Sequence[Batch] | None,
    k_percent: float = 20.0,
    threshold: float = 0.2,
    original: Mapping[ParamKey, torch.Tensor] | None = None,
) -> CheckResult:
    """Loss and Min-K%++ AUC of forget records against never-trained records (and, with
    `original`, the same AUCs of the model before unlearning, for comparison)."""
    rule = f"|AUC - 0.5| <= {threshold} for loss and Min-K%++ (k = {k_percent}%)"
    if not nonmember_batches:
        return CheckResult("membership_inference", "not_run", rule, {},
                           "no never-trained records of the forget distribution (a holdout "
                           "corpus) were given")
    m_loss, m_mk = record_scores(model, member_batches, k_percent)
    n_loss, n_mk = record_scores(model, nonmember_batches, k_percent)
    metrics = {"auc_loss": auc(m_loss, n_loss), "auc_min_k_pp": auc(m_mk, n_mk),
               "members": float(len(m_loss)), "nonmembers": float(len(n_loss))}
    if original is not None:
        with swapped_in(model, original):
            o_m_loss, o_m_mk = record_scores(model, member_batches, k_percent)
            o_n_loss, o_n_mk = record_scores(model, nonmember_batches, k_percent)
        metrics["auc_loss_original"] = auc(o_m_loss, o_n_loss)
        metrics["auc_min_k_pp_original"] = auc(o_m_mk, o_n_mk)
    worst = max(abs(metrics["auc_loss"] - 0.5), abs(metrics["auc_min_k_pp"] - 0.5))
    if worst > threshold:
        return CheckResult("membership_inference", "fail", rule, metrics,
                           f"forget records remain distinguishable (|AUC - 0.5| = {worst:.2f})")
    return CheckResult("membership_inference", "pass", rule, metrics)


# --- the pipeline's entry point ---------------------------------------------------------


def run_robustness_checks(
    model: nn.Module,
    adapter: MoEAdapter,
    checks: Sequence[RobustnessCheck],
    *,
    original: Mapping[ParamKey, torch.Tensor],
    scope: str,
    selected: Sequence[tuple[int, int]],
    forget_batches: Sequence[Batch],
    holdout_batches: Sequence[Batch] | None = None,
) -> list[CheckResult]:
    """Run the spec's checks (`evaluation.robustness`) on the baked, unlearned model.

    `original`: the changed parameters' values before unlearning (name -> tensor);
    `forget_batches`: forget records in a fixed order, each record in one batch only (the
    relearning attack trains on the first half and measures on the second);
    `holdout_batches`: never-trained records for membership inference (None: not_run).
    A check that raises is reported `not_run` with the error: a check never fails the job.
    """
    results: list[CheckResult] = []
    for spec in checks:
        n = spec.max_batches
        try:
            if isinstance(spec, RouterRestoredCheck):
                r = router_restored_probe(model, adapter, original, forget_batches[:n],
                                          spec.threshold)
            elif isinstance(spec, RelearningCheck):
                half = max(1, min(len(forget_batches) // 2, n))
                r = relearning_attack(model, adapter, original, scope, selected,
                                      forget_batches[:half], forget_batches[half:half + n],
                                      spec.steps, spec.lr, spec.threshold)
            elif isinstance(spec, QuantizationCheck):
                r = quantization_check(model, original, forget_batches[:n], spec.bits,
                                       spec.group_size, spec.threshold)
            elif isinstance(spec, MembershipCheck):
                r = membership_inference(
                    model, forget_batches[:n], holdout_batches[:n] if holdout_batches else None,
                    spec.k_percent, spec.threshold, original,
                )
            else:  # pragma: no cover - the spec's union is closed
                raise TypeError(f"unknown check {spec!r}")
        except Exception as e:  # noqa: BLE001 - reported, never fatal to the job
            r = CheckResult(spec.check, "not_run", "", {},
                            f"error: {type(e).__name__}: {str(e)[:300]}")
        results.append(r)
    return results
