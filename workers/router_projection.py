"""Retain-safe router updates (GRIP, arXiv 2601.16905; METHOD.md "Newer work"): the target
router's update is projected onto the null space of the retain hidden states entering that
router, so the router logits of retain tokens stay where they were while forget tokens'
logits can still move.

For a linear router W (E x d) and retain hidden states H (n x d) the projector is
P = I - U U^T, U (d x k) an orthonormal basis of the directions H occupies: the top right
singular vectors of H that together hold `energy` of its squared singular values (and stand
above `rel_tol` of the largest). (W + dW P) h = W h + dW P h = W h for h in span(U), exactly;
for a retain token outside span(U) the change is bounded by the energy left out.

Why the update and not only the gradient: AdamW rescales every coordinate of the gradient
by its own second moment (and decays weights), so a projected gradient does not give a
projected step. `RouterProjector.step` projects the gradient before the optimizer (clipping
and Adam's moments then see only the usable direction) and the parameter change after it,
which holds for any optimizer. A router bias shifts every token's logits alike, retain ones
included, so its gradient and change are zeroed under the projection.

Small typed API for the training loop, two ways:
    proj = RouterProjector.from_hidden_states(H)                     # or .for_layer(...)
    with proj.step(router):   # around optimizer.step(), after backward()
        opt.step()
or, where the optimizer step is inside an engine (DDP, DeepSpeed) and only a per-step
callback is at hand:
    with ProjectedRouter(proj, router) as pr:   # gradient hooks project during backward
        ... every step, after the optimizer: pr.after_step()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.moe.base import MoEAdapter
from workers.routing import Batch, attention_mask_of

DEFAULT_ENERGY = 0.99  # share of the retain states' squared singular values protected
DEFAULT_REL_TOL = 1e-6  # directions below this share of the top singular value are noise
DEFAULT_MAX_TOKENS = 20_000


@dataclass
class RouterProjector:
    """P = I - U U^T for one router; `basis` is U (d x k, orthonormal columns, float32)."""

    basis: torch.Tensor
    energy: float  # share of the retain energy span(U) holds
    tokens: int  # retain tokens the basis was built from

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        """Directions protected (k); dim - rank directions stay free for the update."""
        return int(self.basis.shape[1])

    @classmethod
    def from_hidden_states(
        cls,
        hidden: torch.Tensor,
        *,
        energy: float = DEFAULT_ENERGY,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> RouterProjector:
        """Build from retain hidden states [n, d] (the router's inputs, pad tokens removed).

        energy in (0, 1]: keep the fewest top singular directions holding this share of
        sum(s^2); 1.0 keeps every direction above rel_tol (the exact span)."""
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise ValueError(f"hidden states must be [n > 0, d], got {tuple(hidden.shape)}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        h = hidden.detach().to("cpu", torch.float64)
        # Right singular vectors from the d x d Gram matrix: n may be 10^5, d is small.
        return cls.from_gram(h.T @ h, int(h.shape[0]), energy=energy, rel_tol=rel_tol)

    @classmethod
    def from_gram(
        cls,
        gram: torch.Tensor,
        tokens: int,
        *,
        energy: float = DEFAULT_ENERGY,
        rel_tol: float = DEFAULT_REL_TOL,
    ) -> RouterProjector:
        """Build from the Gram matrix H^T H [d, d] of `tokens` retain inputs (what
        from_hidden_states computes; workers/projected_fallback.py sums it batch by batch)."""
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"a Gram matrix must be [d, d], got {tuple(gram.shape)}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        g = gram.detach().to("cpu", torch.float64)
        evals, evecs = torch.linalg.eigh((g + g.T) / 2)  # ascending
        evals = evals.flip(0).clamp(min=0.0)
        evecs = evecs.flip(1)
        total = float(evals.sum())
        if total <= 0.0:
            return cls(torch.zeros(g.shape[1], 0), 1.0, tokens)
        s = evals.sqrt()
        above = int((s > rel_tol * float(s[0])).sum())
        cum = torch.cumsum(evals, 0) / total
        k = above if energy >= 1.0 else min(above, int((cum < energy).sum()) + 1)
        return cls(evecs[:, :k].to(torch.float32).contiguous(), float(cum[k - 1]), tokens)

    @classmethod
    def for_layer(
        cls,
        model: nn.Module,
        adapter: MoEAdapter,
        layer: int,
        retain_batches: Iterable[Batch],
        *,
        energy: float = DEFAULT_ENERGY,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> RouterProjector:
        """Collect the retain hidden states entering `layer`'s router and build from them."""
        hidden = router_inputs(model, adapter, layer, retain_batches, max_tokens=max_tokens)
        return cls.from_hidden_states(hidden, energy=energy)

    def project(self, update: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """update P along `dim` (the input dimension: last for an [E, d] weight, 1 for a
        fused [E, d, out] expert tensor) for a gradient or change (a new tensor)."""
        if update.shape[dim] != self.dim:
            raise ValueError(f"dimension {dim} is {update.shape[dim]} != hidden size {self.dim}")
        u = self.basis.to(update.device, update.dtype)
        x = update.movedim(dim, -1)
        return (x - (x @ u) @ u.T).movedim(-1, dim)

    def project_grad_(self, router: nn.Module) -> None:
        """In place on the router's gradients: weight -> grad P, bias -> 0."""
        for name, p in router.named_parameters():
            if p.grad is None:
                continue
            if _is_weight(name, p, self.dim):
                p.grad.copy_(self.project(p.grad))
            else:
                p.grad.zero_()

    @contextmanager
    def step(self, router: nn.Module) -> Iterator[None]:
        """Around optimizer.step(): projects the gradients before and the parameter change
        after (W_new = W_old + (W_stepped - W_old) P; a bias keeps its old value)."""
        self.project_grad_(router)
        before = {n: p.detach().clone() for n, p in router.named_parameters() if p.requires_grad}
        yield
        with torch.no_grad():
            for name, p in router.named_parameters():
                if name not in before:
                    continue
                old = before[name]
                if _is_weight(name, p, self.dim):
                    p.copy_(old + self.project(p - old))
                else:
                    p.copy_(old)

    def to_json(self) -> dict[str, float | int]:
        return {"dim": self.dim, "rank": self.rank, "energy": self.energy, "tokens": self.tokens}


class ProjectedTensor:
    """Keeps one parameter's updates in a projector's null space along `dim` (or, with no
    projector, holds the parameter at its value) without touching the optimizer: a
    gradient hook projects each backward's gradient, and `after_step()` projects the
    change since the previous call (exact for any optimizer). The hook stays until
    `close()`."""

    def __init__(
        self, param: torch.Tensor, projector: RouterProjector | None, dim: int = -1
    ) -> None:
        self.param, self.projector, self.dim = param, projector, dim
        self.previous: torch.Tensor | None = param.detach().clone()
        self.handle: RemovableHandle | None = param.register_hook(
            self._project if projector else torch.zeros_like
        )

    def _project(self, update: torch.Tensor) -> torch.Tensor:
        assert self.projector is not None
        return self.projector.project(update, self.dim)

    def after_step(self) -> None:
        if self.previous is None:
            raise RuntimeError("this projection was closed")
        with torch.no_grad():
            p, old = self.param, self.previous
            p.copy_(old + self._project(p - old) if self.projector else old)
            old.copy_(p)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.previous = None  # a copy of the parameter: under the full fallback, the model


class ProjectedRouter:
    """One router (or any module with an [out, d] weight read from the projector's
    inputs): its weight's updates in the projector's null space, every other parameter
    (a bias) held, through one ProjectedTensor each. Hooks stay until `close()` (or the
    with-block ends)."""

    def __init__(self, projector: RouterProjector, router: nn.Module) -> None:
        self.projector = projector
        self.params = [(n, p) for n, p in router.named_parameters() if p.requires_grad]
        self.tensors = [
            ProjectedTensor(p, projector if _is_weight(name, p, projector.dim) else None)
            for name, p in self.params
        ]

    @property
    def handles(self) -> list[RemovableHandle]:
        """The gradient hooks still registered (none after close())."""
        return [t.handle for t in self.tensors if t.handle is not None]

    def after_step(self) -> None:
        for t in self.tensors:
            t.after_step()

    def close(self) -> None:
        for t in self.tensors:
            t.close()

    def __enter__(self) -> ProjectedRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_weight(name: str, p: torch.Tensor, dim: int) -> bool:
    return p.dim() == 2 and p.shape[-1] == dim and name.split(".")[-1] == "weight"


def router_inputs(
    model: nn.Module,
    adapter: MoEAdapter,
    layer: int,
    batches: Iterable[Batch],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """The hidden states [n, d] that `layer`'s router receives on `batches` (non-pad tokens,
    eval mode, no grad), stopping after `max_tokens` (at batch granularity, then cut)."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    router = adapter.moe_layer(layer).router
    seen: list[torch.Tensor] = []

    def grab(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach())

    out: list[torch.Tensor] = []
    count = 0
    was_training = model.training
    model.eval()
    handle = router.register_forward_pre_hook(grab)
    try:
        for batch in batches:
            seen.clear()
            mask = base_forward(model, batch)
            if len(seen) != 1:
                raise RuntimeError(f"router of layer {layer} ran {len(seen)} times in one pass")
            h = seen[0].reshape(mask.numel(), -1)[mask.reshape(-1).to(seen[0].device)]
            out.append(h.to("cpu", torch.float32))
            count += int(h.shape[0])
            if count >= max_tokens:
                break
    finally:
        handle.remove()
        model.train(was_training)
    if not out:
        raise ValueError("the retain batches hold no tokens")
    return torch.cat(out)[:max_tokens]


def base_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """One no-grad forward of the decoder (no LM head) on `batch`, for the hooks that read
    its inputs; returns the batch's attention mask (the caller sets eval mode)."""
    mask = attention_mask_of(batch)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    with torch.no_grad():
        getattr(model, "base_model", model)(
            input_ids=batch["input_ids"].to(device),
            attention_mask=mask.long().to(device),
            position_ids=pos.to(device),
            use_cache=False,
        )
    return mask
