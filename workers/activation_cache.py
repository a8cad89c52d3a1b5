"""Activation caching below the SEUF target layer.

During selected-expert unlearning nothing below the target decoder layer trains (the
embeddings, the lower layers and their routers are frozen), so the hidden states that
ENTER the target layer are constants for a given input, and so is the output of the target
layer's own attention when it is frozen too (SEUF trains only the MoE block: the selected
slices and the router). `ActivationCache.build` computes them once per sample (one no-grad
pass over a corpus that stops after the target layer's attention), keeps them bounded (on
the model's device up to `max_bytes`: GPU memory on CUDA, RAM on CPU; then in
memory-mapped chunk files on the host under a temporary directory, copied to the device
row by row at lookup)
and, while `cache.active(model)` is open, every forward pass of the model whose batch is
fully cached runs only the target layer's MoE block and the layers above it:

- a forward pre-hook on the base model (`model.model`) reads the batch's `input_ids` and
  `attention_mask`, looks every row up by its token content (so forget and retain batches
  of different corpora need no index bookkeeping) and, when all rows hit, swaps the
  decoder layers below the target for pass-through modules (decoder layers of every
  supported family return the hidden-states tensor; checked in the tests);
- a forward pre-hook on `layers[target]` substitutes the cached hidden states (right
  padded to the batch's width, zeros at padding) for its input and, when the attention
  output is cached (`attention`), its `self_attn` is swapped for a `CachedAttention` that
  returns it (every supported family's decoder layer does
  `h = residual + self_attn(input_layernorm(h))[0]`, so the sum is bitwise the same);
- a forward hook on the base model (always called, also on errors) puts the real layers
  (and attention) back. The model's own forward still builds the masks and rotary
  embeddings, so the path is family-agnostic; the embedding lookup it still does is
  negligible.
A batch with a row that is not cached runs the full uncached forward (counted in
`stats.misses`; `strict=True` raises instead).

Equal to the uncached path up to float round-off: the hidden state of a real token depends
only on the tokens before it (causal attention, right padding, positions 0..n-1), not on the
padding width of its batch. Logits at PADDING positions differ (they are never scored).
Dropout below the target layer and in its attention is not applied (the cache is built
in eval mode).

Not for: scope "full" (the embeddings train), the model's router load-balancing loss
(it needs every layer's router), a captured / tapped module below the target layer; see
`cache_start_layer`, which finds the lowest layer that is safe to start at.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.data import TokenizedCorpus
from workers.moe.base import MoEAdapter

DEFAULT_MAX_BYTES = 256 * 2**20  # 256 MiB kept in memory before spilling to disk


class _Stop(Exception):
    """Raised by the build hook to end a forward pass at the target layer."""


class PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states unchanged
    (every supported family's decoder layer returns the hidden-states tensor)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class CachedAttention(nn.Module):
    """Stands in for the target layer's frozen attention during a cached forward: returns
    (the cached attention output, None), as the attention modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.output: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out, self.output = self.output, None
        if out is None:
            raise RuntimeError("CachedAttention called without a cached output")
        return out, None


def attention_frozen(layer: nn.Module) -> bool:
    """True when the layer's attention output is a constant of its input: it has a
    `self_attn` and nothing of it (nor `input_layernorm`, its input norm) trains."""
    attn = getattr(layer, "self_attn", None)
    if not isinstance(attn, nn.Module):
        return False
    norm = getattr(layer, "input_layernorm", None)
    parts = [attn] + ([norm] if isinstance(norm, nn.Module) else [])
    return not any(p.requires_grad for m in parts for p in m.parameters())


@dataclass
class CacheStats:
    hits: int = 0  # forward passes served from the cache
    misses: int = 0  # forward passes that ran the full model (a row was not cached)


@dataclass
class _Entry:
    chunk: int  # index into ActivationCache._chunks
    offset: int  # first row of the sample in the chunk
    length: int  # number of real tokens


def _key(ids: torch.Tensor) -> bytes:
    """Content key of one sample's real tokens (int64 bytes, hashed)."""
    return hashlib.blake2b(ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).digest()


def _base(model: nn.Module) -> nn.Module:
    """The bare decoder (model.model of a ...ForCausalLM), unwrapping DDP/DeepSpeed."""
    if not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "model", model)


def _real_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per row: number of real tokens; ValueError unless each row is right padded."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    pos = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    if not torch.equal(mask, pos < lengths.unsqueeze(1)):
        raise ValueError("activation cache needs RIGHT-padded batches (attention_mask 1...1 0...0)")
    return [int(n) for n in lengths.tolist()]


def _hidden_arg(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class ActivationCache:
    """Hidden states entering decoder layer `target_layer` (and, with `attention`, that
    layer's attention output, stored beside them: rows of width 2H), per cached sample
    (real tokens only), looked up by token content. Build with `ActivationCache.build`, extend with
    `add`, use with `active(model)`, free with `close()` (also done at garbage collection).
    """

    def __init__(
        self,
        target_layer: int,
        hidden_size: int,
        dtype: torch.dtype,
        max_bytes: int = DEFAULT_MAX_BYTES,
        spill_dir: str | Path | None = None,
        attention: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {max_bytes})")
        self.target_layer = int(target_layer)
        self.hidden_size = int(hidden_size)
        self.attention = attention
        self.width = self.hidden_size * (2 if attention else 1)  # per cached token
        self.dtype = dtype
        self.device = torch.device(device)  # where the in-memory tier and lookups live
        self.max_bytes = int(max_bytes)
        self._spill_parent = None if spill_dir is None else Path(spill_dir)
        self._spill_path: Path | None = None
        self._chunks: list[torch.Tensor] = []  # [rows, H]; on the device or mmap'ed from disk
        self._entries: dict[bytes, _Entry] = {}
        self.memory_bytes = 0  # bytes held on the device (RAM on CPU, GPU memory on CUDA)
        self.disk_bytes = 0  # bytes spilled to chunk files
        self.stats = CacheStats()
        self._finalizer: weakref.finalize | None = None

    # --- building ---------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        adapter: MoEAdapter,
        target_layer: int,
        corpus: TokenizedCorpus,
        batch_size: int = 16,
        max_bytes: int = DEFAULT_MAX_BYTES,
        spill_dir: str | Path | None = None,
        attention: bool | None = None,
    ) -> ActivationCache:
        """One no-grad pass over `corpus` (stopped at the target layer) recording the hidden
        states that enter decoder layer `target_layer`, and its attention output when
        `attention` (default: when `attention_frozen`, i.e. build AFTER apply_scope). Run it
        any time before or during training: none of it changes during SEUF training."""
        layers = adapter.decoder_layers()
        if not 0 <= target_layer < len(layers):
            raise ValueError(
                f"target_layer {target_layer} out of range: the model has {len(layers)} layers"
            )
        if attention is None:
            attention = attention_frozen(layers[target_layer])
        p = next(model.parameters())
        cache = cls(target_layer, int(model.config.hidden_size), p.dtype, max_bytes, spill_dir,
                    attention, p.device)  # fmt: skip
        cache.add(model, adapter, corpus, batch_size)
        return cache

    @torch.no_grad()
    def add(
        self, model: nn.Module, adapter: MoEAdapter, corpus: TokenizedCorpus, batch_size: int = 16
    ) -> None:
        """Cache every sample of another corpus (e.g. the retain corpus)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        layer = adapter.decoder_layers()[self.target_layer]
        device = next(model.parameters()).device
        captured: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            captured.append(_hidden_arg(args, kwargs).detach())
            if not self.attention:
                raise _Stop  # nothing above the target layer is needed

        def grab_attention(_m: nn.Module, _args: tuple, out: Any) -> None:
            captured[-1] = torch.cat([captured[-1], out[0].detach()], dim=-1)
            raise _Stop  # nothing after the target layer's attention is needed

        was_training = model.training
        model.eval()
        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True)]
        if self.attention:
            handles.append(layer.self_attn.register_forward_hook(grab_attention))
        try:
            for batch in corpus.in_order(batch_size):
                captured.clear()
                try:
                    _base(model)(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    )
                except _Stop:
                    pass
                if len(captured) != 1:
                    raise RuntimeError(f"layer {self.target_layer} ran {len(captured)} times")
                self._store(batch["input_ids"], batch["attention_mask"], captured[0])
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    def _store(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> None:
        rows: list[torch.Tensor] = []
        new: list[tuple[bytes, int, int]] = []
        offset = 0
        for r, n in enumerate(_real_lengths(mask)):
            key = _key(input_ids[r, :n])
            if key in self._entries or any(k == key for k, _, _ in new):
                continue  # identical token sequences have identical hidden states
            rows.append(hidden[r, :n].to(self.device, self.dtype))
            new.append((key, offset, n))
            offset += n
        if not rows:
            return
        chunk = torch.cat(rows).contiguous()
        nbytes = chunk.numel() * chunk.element_size()
        if self.memory_bytes + nbytes > self.max_bytes:
            chunk = self._spill(chunk.cpu())  # past the cap: host disk, not device memory
            self.disk_bytes += nbytes
        else:
            self.memory_bytes += nbytes
        cid = len(self._chunks)
        self._chunks.append(chunk)
        for key, off, n in new:
            self._entries[key] = _Entry(cid, off, n)

    def _spill(self, chunk: torch.Tensor) -> torch.Tensor:
        """Write a chunk to disk and return it memory-mapped (pages load on demand)."""
        if self._spill_path is None:
            if self._spill_parent is not None:
                self._spill_parent.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="actcache-", dir=self._spill_parent))
            self._spill_path = path
            # Removed with the cache object even if close() is never called.
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), True)
        f = self._spill_path / f"chunk{len(self._chunks):06d}.pt"
        torch.save(chunk, f)
        return torch.load(f, mmap=True, weights_only=True)

    def close(self) -> None:
        """Drop every cached tensor and delete the spill directory."""
        self._chunks.clear()
        self._entries.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()  # rmtree, once

    @property
    def spill_path(self) -> Path | None:
        return self._spill_path

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: torch.Tensor) -> bool:
        """Is this 1-D sequence of real token ids cached?"""
        return _key(ids) in self._entries

    # --- lookup -----------------------------------------------------------------------
    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Cached rows of a right-padded batch as [B, S, width] (zeros at padding): the
        hidden states, then (with `attention`) the attention output; None when a row is not
        cached."""
        lengths = _real_lengths(attention_mask)
        entries = []
        for r, n in enumerate(lengths):
            e = self._entries.get(_key(input_ids[r, :n]))
            if e is None or e.length != n:
                return None
            entries.append(e)
        b, s = input_ids.shape
        out = torch.zeros(b, s, self.width, dtype=self.dtype, device=self.device)
        for r, e in enumerate(entries):  # a spilled chunk's rows are copied host -> device
            out[r, : e.length] = self._chunks[e.chunk][e.offset : e.offset + e.length]
        return out

    # --- use --------------------------------------------------------------------------
    @contextmanager
    def active(
        self, model: nn.Module, adapter: MoEAdapter, strict: bool = False
    ) -> Iterator[ActivationCache]:
        """While open, forward passes on fully cached batches skip the layers below the
        target (see the module docstring). Open it around the training forward only:
        routing-overlap / evaluation passes need every layer (they fall back to the full
        path anyway when their batches are not cached). Raises ValueError when a
        parameter below the target layer (or the embeddings) requires grad: skipping those
        layers would silently drop their gradients."""
        self._check_frozen_below(model, adapter)
        base = _base(model)
        layers = adapter.decoder_layers()
        target = layers[self.target_layer]
        skipped = [layers[i] for i in range(self.target_layer)]
        passthrough = [PassThrough() for _ in skipped]
        attn = target.self_attn if self.attention else None
        stub = CachedAttention()
        pending: list[torch.Tensor] = []

        def restore() -> None:
            for i, real in enumerate(skipped):
                if layers[i] is not real:
                    layers[i] = real
            if attn is not None and target.self_attn is not attn:
                target.self_attn = attn
            stub.output = None

        def on_base(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            pending.clear()
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is None or kwargs.get("inputs_embeds") is not None:
                self.stats.misses += 1  # embeddings given directly: cannot key the batch
                return
            if mask is None:
                mask = torch.ones_like(ids)
            if mask.dim() != 2:
                self.stats.misses += 1  # a prepared 4-D mask: cannot tell the padding
                return
            hidden = self.lookup(ids.cpu(), mask.cpu())
            if hidden is None:
                if strict:
                    raise KeyError("activation cache: a row of this batch was not cached")
                self.stats.misses += 1
                return
            self.stats.hits += 1
            pending.append(hidden)
            for i, pt in enumerate(passthrough):
                layers[i] = pt
            if attn is not None:
                target.self_attn = stub

        def on_target(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            if not pending:
                return None  # uncached forward: leave the real input alone
            like = _hidden_arg(args, kwargs)
            rows = pending.pop().to(like.device, like.dtype)
            hidden = rows[..., : self.hidden_size]
            if hidden.shape != like.shape:
                raise RuntimeError(
                    f"cached hidden states {tuple(hidden.shape)} != layer input {tuple(like.shape)}"
                )
            if attn is not None:
                stub.output = rows[..., self.hidden_size :]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def after_base(_m: nn.Module, _args: tuple, _kwargs: dict[str, Any], _out: Any) -> None:
            pending.clear()
            restore()

        handles = [
            base.register_forward_pre_hook(on_base, with_kwargs=True),
            target.register_forward_pre_hook(on_target, with_kwargs=True),
            base.register_forward_hook(after_base, with_kwargs=True, always_call=True),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            restore()

    def _check_frozen_below(self, model: nn.Module, adapter: MoEAdapter) -> None:
        lowest = cache_start_layer(model, adapter)
        if lowest is None or lowest < self.target_layer:
            where = "the embeddings" if lowest is None else f"layer {lowest}"
            raise ValueError(
                f"activation cache at layer {self.target_layer}: {where} has trainable "
                "parameters below it (cache at or below the lowest trainable layer)"
            )
        if self.attention and not attention_frozen(adapter.decoder_layers()[self.target_layer]):
            raise ValueError(
                f"activation cache at layer {self.target_layer} holds its attention output, "
                "but that attention has trainable parameters (build with attention=False)"
            )


def cache_start_layer(
    model: nn.Module, adapter: MoEAdapter, watched: Sequence[nn.Module] = ()
) -> int | None:
    """The highest decoder layer a cache may start at: the lowest layer holding a trainable
    parameter or a `watched` module (a router tapped by the anchor, a block captured by
    RMU). None when something before the decoder layers trains (embeddings: scope full).
    With nothing trainable at all it returns the number of layers."""
    layers = adapter.decoder_layers()
    base = _base(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for name, p in base.named_parameters():
        # Trainable tensors outside the decoder layers: only the final norm may (it runs
        # after every layer); anything else (embeddings) runs before the target layer.
        if p.requires_grad and id(p) not in in_layers and not name.startswith("norm."):
            return None
    watched_ids = {id(m) for m in watched}
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
        if any(id(m) in watched_ids for m in layer.modules()):
            return i
    return len(layers)


def objective_start_layer(model: nn.Module, adapter: MoEAdapter, objective: Any) -> int | None:
    """`cache_start_layer` for a bound workers.objectives.Objective: also watches the
    anchor's routers and RMU's captured block; None when the objective needs the router
    load-balancing loss (it would need the skipped layers' routers)."""
    if getattr(objective, "router_aux_loss", False):
        return None
    watched: list[nn.Module] = [m.router for m in getattr(objective, "anchor_layers", [])]
    capture = getattr(objective, "capture", None)
    if capture is not None:
        watched.append(capture)
    return cache_start_layer(model, adapter, watched)


@dataclass
class CachePlan:
    """What `build_for_training` decided (for logs / reports)."""

    layer: int | None
    cached_samples: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    reason: str = ""
    corpora: list[int] = field(default_factory=list)


def build_for_training(
    model: nn.Module,
    adapter: MoEAdapter,
    objective: Any,
    corpora: Sequence[TokenizedCorpus],
    batch_size: int = 16,
    max_bytes: int = DEFAULT_MAX_BYTES,
    spill_dir: str | Path | None = None,
) -> tuple[ActivationCache | None, CachePlan]:
    """Build a cache at the highest safe layer for `objective` over the given corpora
    (forget, retain). Call AFTER apply_scope (it reads requires_grad). Returns (None, plan)
    when no layer can be skipped (scope full, aux loss, or the target is layer 0)."""
    layer = objective_start_layer(model, adapter, objective)
    if layer is None:
        return None, CachePlan(None, reason="embeddings train or router aux loss is on")
    if layer == 0:
        return None, CachePlan(0, reason="the lowest trainable layer is layer 0")
    layer = min(layer, len(adapter.decoder_layers()) - 1)
    cache = ActivationCache.build(model, adapter, layer, corpora[0], batch_size, max_bytes,
                                  spill_dir)  # fmt: skip
    for c in corpora[1:]:
        cache.add(model, adapter, c, batch_size)
    plan = CachePlan(layer, len(cache), cache.memory_bytes, cache.disk_bytes, "ok",
                     [len(c) for c in corpora])  # fmt: skip
    return cache, plan
