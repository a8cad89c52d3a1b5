"""The activation cache below the SEUF target layer: the cached path must equal the
uncached one (logits at the scored positions, loss, gradients of the trainable slices), skip
the lower layers and the target layer's frozen attention for real, spill to disk with the
same results, and refuse unsafe set-ups."""

from __future__ import annotations

import pytest
import torch

from workers.activation_cache import (
    ActivationCache,
    CachedAttention,
    PassThrough,
    build_for_training,
    cache_start_layer,
)
from workers.data import Sample, TokenizedCorpus
from workers.moe import get_adapter
from workers.moe.tiny import TINY_VOCAB, tiny_model
from workers.objectives import Batches, make_objective
from workers.reference import prepare_reference
from workers.scope import apply_scope
from workers.spec import ObjectiveOptions

torch.set_num_threads(1)

N_LAYERS = 4  # low / middle / high targets 1, 2, 3 (DeepSeek-V2's layer 0 is dense)
ATOL = 2e-5


def rand_corpus(n: int, seed: int) -> TokenizedCorpus:
    """Random token sequences of varied lengths (so every batch is padded)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(3, TINY_VOCAB, (length,), generator=g).tolist()
        samples.append(Sample(ids, [False] + [True] * (length - 1)))
    return TokenizedCorpus(samples, pad_id=0)


def setup(family: str, target: int, algorithm: str = "ga"):
    model = tiny_model(family, seed=3, num_hidden_layers=N_LAYERS)
    adapter = get_adapter(model)
    scope = apply_scope(model, adapter, "seuf", [(target, 1)])
    obj = make_objective(
        algorithm,
        ObjectiveOptions(rmu_steering_coeff=5.0, rmu_alpha=2.0),
        scope.adapter,
        [(target, 1)],
        anchor_weight=1.0,
        layers=scope.layers,
    )
    return model, scope, obj


def step(model, scope, obj, batches: Batches, cache: ActivationCache | None = None):
    """One forward + backward: (forget logits, retain logits, loss, grads of the slices)."""
    for p in scope.trainable_parameters():
        p.grad = None
    model.train()
    if cache is None:
        out = obj.forward(model, batches)
    else:
        with cache.active(model, scope.adapter, strict=True):
            out = obj.forward(model, batches)
    loss, _ = obj(out, batches)
    loss.backward()  # outside the context: the graph holds what it needs
    grads = [p.grad.detach().clone() for p in scope.trainable_parameters()]
    ro = out.retain.logits if out.retain is not None else None
    fo = out.forget.logits
    return (
        None if fo is None else fo.detach(),
        None if ro is None else ro.detach(),
        loss.detach(),
        grads,
    )


def assert_same(a, b, batches: Batches) -> None:
    fl_a, rl_a, loss_a, g_a = a
    fl_b, rl_b, loss_b, g_b = b
    real = batches.forget["attention_mask"].bool()
    assert bool((~real).any()), "the batch must contain padding"
    # Logits exist at the scored positions only (run_forward), all of them real tokens.
    if fl_a is not None:
        torch.testing.assert_close(fl_a, fl_b, atol=ATOL, rtol=1e-4)
    if rl_a is not None:
        torch.testing.assert_close(rl_a, rl_b, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, atol=ATOL, rtol=1e-4)
    assert len(g_a) == len(g_b) > 0
    for x, y in zip(g_a, g_b, strict=True):
        assert float(x.abs().max()) > 0, "a trainable slice got no gradient"
        torch.testing.assert_close(x, y, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v2"])
@pytest.mark.parametrize("target", [1, 2, 3])
def test_cached_equals_uncached(family: str, target: int) -> None:
    model, scope, obj = setup(family, target)
    forget = rand_corpus(7, seed=11)
    cache = ActivationCache.build(model, scope.adapter, target, forget, batch_size=3)
    assert len(cache) == 7 and cache.disk_bytes == 0 and cache.spill_path is None
    assert cache.attention and cache.width == 2 * 32  # SEUF: the target's attention is frozen
    batches = Batches(forget.collate([5, 0, 3, 6]))
    ref = step(model, scope, obj, batches)

    layers = scope.adapter.decoder_layers()
    originals = list(layers)
    attention = layers[target].self_attn
    calls = [0] * len(layers)
    attn_calls = [0]
    hooks = [
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    hooks.append(attention.register_forward_hook(lambda *_a: attn_calls.__setitem__(0, 1)))
    got = step(model, scope, obj, batches, cache)
    for h in hooks:
        h.remove()
    assert calls == [0] * target + [1] * (len(layers) - target)  # lower layers skipped
    assert attn_calls == [0]  # the target layer's attention came from the cache
    assert cache.stats.hits == 1 and cache.stats.misses == 0
    assert all(a is b for a, b in zip(layers, originals, strict=True))  # restored
    assert layers[target].self_attn is attention
    assert not any(isinstance(m, PassThrough | CachedAttention) for m in model.modules())
    assert_same(ref, got, batches)
    # The input-only cache (no attention output) gives the same step too.
    plain = ActivationCache.build(model, scope.adapter, target, forget, 3, attention=False)
    assert not plain.attention and plain.width == 32
    assert_same(ref, step(model, scope, obj, batches, plain), batches)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_rmu_with_retain_and_anchor(family: str) -> None:
    target = 2
    model, scope, obj = setup(family, target, "rmu")
    forget, retain = rand_corpus(6, seed=21), rand_corpus(5, seed=22)
    prepare_reference(obj, model, forget, retain, batch_size=4)
    cache, plan = build_for_training(model, scope.adapter, obj, [forget, retain], batch_size=4)
    assert cache is not None and plan.layer == target and plan.cached_samples == 11
    batches = Batches(forget.collate([1, 4, 2]), retain.collate([0, 3, 4]))
    ref = step(model, scope, obj, batches)
    got = step(model, scope, obj, batches, cache)
    assert cache.stats.hits == 2  # the forget and the retain forward
    assert_same(ref, got, batches)


def test_disk_spill_matches_memory(tmp_path) -> None:
    target = 2
    model, scope, obj = setup("mixtral", target)
    forget = rand_corpus(9, seed=31)
    mem = ActivationCache.build(model, scope.adapter, target, forget, batch_size=4)
    disk = ActivationCache.build(
        model, scope.adapter, target, forget, batch_size=4, max_bytes=0, spill_dir=tmp_path
    )
    # A budget of one chunk: the first build batch stays in memory, the rest spill.
    chunk0 = sum(len(forget.samples[i].input_ids) for i in range(4)) * mem.width * 4
    mixed = ActivationCache.build(
        model, scope.adapter, target, forget, batch_size=4, max_bytes=chunk0, spill_dir=tmp_path
    )
    assert mem.disk_bytes == 0 and mem.memory_bytes > 0
    assert disk.memory_bytes == 0 and disk.disk_bytes == mem.memory_bytes
    assert mixed.memory_bytes == chunk0 and mixed.disk_bytes == mem.memory_bytes - chunk0
    spill = disk.spill_path
    assert spill is not None and spill.parent == tmp_path and len(list(spill.iterdir())) == 3
    batch = forget.collate([8, 1, 4, 2])
    h_mem = mem.lookup(batch["input_ids"], batch["attention_mask"])
    assert h_mem is not None
    # The in-memory tier lives on the model's device (tests/engine/test_gpu.py: CUDA).
    assert mem.device == torch.device("cpu") and h_mem.device == mem.device
    for c in (disk, mixed):
        h = c.lookup(batch["input_ids"], batch["attention_mask"])
        assert h is not None and torch.equal(h, h_mem)
    batches = Batches(batch)
    a = step(model, scope, obj, batches, mem)
    b = step(model, scope, obj, batches, disk)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)
    for x, y in zip(a[3], b[3], strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    disk.close()
    assert not spill.exists()
    mixed.close()


def test_uncached_batch_falls_back_or_raises() -> None:
    target = 2
    model, scope, obj = setup("qwen2_moe", target)
    cached, other = rand_corpus(4, seed=41), rand_corpus(4, seed=42)
    cache = ActivationCache.build(model, scope.adapter, target, cached, batch_size=4)
    batches = Batches(other.collate([0, 1, 2]))
    ref = step(model, scope, obj, batches)
    with cache.active(model, scope.adapter):
        out = obj.forward(model, batches)
    assert cache.stats.misses == 1 and cache.stats.hits == 0
    torch.testing.assert_close(out.forget.logits.detach(), ref[0], atol=0, rtol=0)
    with pytest.raises(KeyError, match="not cached"):
        step(model, scope, obj, batches, cache)
    # Layers are back after the error, and the model runs normally.
    assert not any(isinstance(m, PassThrough | CachedAttention) for m in model.modules())


def test_refuses_trainable_layers_below_target() -> None:
    model = tiny_model("qwen2_moe", seed=0, num_hidden_layers=N_LAYERS)
    adapter = get_adapter(model)
    forget = rand_corpus(3, seed=1)
    cache = ActivationCache.build(model, adapter, 2, forget)
    scope = apply_scope(model, adapter, "seuf", [(1, 0)])  # trains layer 1 < 2
    assert cache_start_layer(model, scope.adapter) == 1
    with pytest.raises(ValueError, match="layer 1 has trainable"):
        with cache.active(model, scope.adapter):
            pass
    scope.discard()
    full = apply_scope(model, adapter, "full")
    assert cache_start_layer(model, full.adapter) is None
    with pytest.raises(ValueError, match="embeddings"):
        with cache.active(model, full.adapter):
            pass
    with pytest.raises(ValueError, match="target_layer 9 out of range"):
        ActivationCache.build(model, adapter, 9, forget)
    full.discard()
    # A cache holding the attention output refuses a scope that trains that attention.
    frozen = apply_scope(model, adapter, "router", [(2, 0)])
    with_attn = ActivationCache.build(model, frozen.adapter, 2, forget)
    assert with_attn.attention
    model.model.layers[2].self_attn.q_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="attention has trainable parameters"):
        with with_attn.active(model, frozen.adapter):
            pass
    frozen.discard()


def test_build_for_training_declines_when_nothing_can_be_skipped() -> None:
    model = tiny_model("qwen2_moe", seed=0, num_hidden_layers=N_LAYERS)
    adapter = get_adapter(model)
    forget = rand_corpus(3, seed=5)
    full = apply_scope(model, adapter, "full")
    obj = make_objective("ga", ObjectiveOptions(), full.adapter, layers=full.layers)
    cache, plan = build_for_training(model, full.adapter, obj, [forget])
    assert cache is None and plan.layer is None
    full.discard()
    # Router aux loss needs every layer's router: no cache even with a high target.
    scope = apply_scope(model, adapter, "seuf", [(3, 0)])
    aux = make_objective("ga", ObjectiveOptions(), scope.adapter, [(3, 0)], 1.0,
                         router_aux_loss=True, layers=scope.layers)  # fmt: skip
    assert build_for_training(model, scope.adapter, aux, [forget])[0] is None
    scope.discard()
    # Target layer 0: nothing below it.
    scope0 = apply_scope(model, adapter, "seuf", [(0, 0)])
    obj0 = make_objective("ga", ObjectiveOptions(), scope0.adapter, [(0, 0)], 1.0,
                          layers=scope0.layers)  # fmt: skip
    cache0, plan0 = build_for_training(model, scope0.adapter, obj0, [forget])
    assert cache0 is None and plan0.layer == 0
