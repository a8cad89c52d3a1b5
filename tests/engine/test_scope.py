"""Trainable scope: only the selected expert slices (+ target router) change, memory is
proportional to the slice, and bake leaves a plain transformers model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.moe import get_adapter, router_tap
from workers.moe.tiny import FAMILIES, tiny_model
from workers.objectives import make_objective
from workers.scope import Region, SelectedExperts, apply_scope
from workers.spec import ObjectiveOptions, StopRule, TrainingOptions
from workers.train import train

LAYER, EXPERTS = 1, [2, 5]
UP = f"model.layers.{LAYER}.mlp.experts.gate_up_proj"
DOWN = f"model.layers.{LAYER}.mlp.experts.down_proj"
ROUTER = f"model.layers.{LAYER}.mlp.gate.weight"


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_seuf(scope_name="seuf", weight_decay=0.5, steps=4, selected=None):
    model, adapter = model_and_adapter(seed=0)
    before = _snapshot(model)
    sel = [(LAYER, e) for e in EXPERTS] if selected is None else selected
    sc = apply_scope(model, adapter, scope_name, sel)
    obj = make_objective(
        "gdiff", ObjectiveOptions(), adapter, sel, anchor_weight=1.0, layers=sc.layers
    )
    opts = TrainingOptions(lr=1e-2, max_steps=steps, weight_decay=weight_decay, stop=StopRule())
    res = train(
        model,
        adapter,
        sc,
        obj,
        BatchStream(corpus(8, seed=1), 4, seed=0),
        BatchStream(corpus(8, seed=2), 4, seed=0),
        opts,
    )
    return model, adapter, sc, before, res


def test_only_selected_slices_and_router_change_bitwise_even_with_weight_decay():
    model, adapter, sc, before, res = _run_seuf()
    assert res.steps == 4
    sc.bake()
    after = _snapshot(model)
    assert set(after) == set(before)
    changed = []
    for name in before:
        if name in (UP, DOWN):
            for e in range(adapter.num_experts):
                same = torch.equal(after[name][e], before[name][e])
                assert same == (e not in EXPERTS), (name, e)  # others bitwise equal
        elif not torch.equal(after[name], before[name]):
            changed.append(name)
    assert changed == [ROUTER]
    assert sc.regions == [
        Region(UP, 2),
        Region(UP, 5),
        Region(DOWN, 2),
        Region(DOWN, 5),
        Region(ROUTER, None),
    ]


def test_optimizer_state_and_gradients_are_proportional_to_the_slice():
    model, adapter, sc, before, res = _run_seuf(steps=2)
    per_expert = before[UP][0].numel() + before[DOWN][0].numel()
    expected = len(EXPERTS) * per_expert + before[ROUTER].numel()
    assert sc.trainable_params == expected
    assert sc.total_params == sum(v.numel() for v in before.values())
    assert sc.ratio == pytest.approx(expected / sc.total_params)
    state = res.state["optimizer"]["state"]
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values())
    assert moments == 2 * expected
    # A backward pass allocates no gradient on the frozen fused tensors.
    batch = corpus(4, seed=1).collate(range(4))
    model.train()
    model(input_ids=batch["input_ids"]).logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in sc.named_trainable()}
    assert all("original" not in n for n in with_grad)
    sc.discard()


def test_bake_leaves_a_plain_model_that_round_trips(tmp_path):
    model, adapter, sc, before, _ = _run_seuf(steps=2)
    trained = {n: p.detach().clone() for n, p in sc.named_trainable()}
    names_before = list(before)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sc.bake()
    assert not any(isinstance(m, SelectedExperts) for m in model.modules())
    experts = model.model.layers[LAYER].mlp.experts
    assert type(experts).__name__ == "Qwen2MoeExperts"
    assert "forward" not in experts.__dict__  # the class's own forward again
    assert list(model.state_dict()) == names_before
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # While wired, the fused tensors stayed in place, frozen, beside the trainable slices.
    assert flags[UP] is False
    slices = trained[f"model.layers.{LAYER}.mlp.experts.selected_experts.gate_up_proj"]
    assert torch.equal(experts.gate_up_proj[EXPERTS], slices)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="already baked"):
        sc.trainable_parameters()


def test_discard_restores_the_original_and_scope_variants():
    model, adapter, sc, before, _ = _run_seuf(steps=2)
    sc.discard()
    after = _snapshot(model)
    assert all(torch.equal(after[k], before[k]) for k in before)

    model, adapter = model_and_adapter()
    sc = apply_scope(model, adapter, "experts", [(LAYER, 3)])
    assert {n.rsplit(".", 1)[-1] for n, _ in sc.named_trainable()} == {"gate_up_proj", "down_proj"}
    sc.discard()
    sc = apply_scope(model, adapter, "router", [(LAYER, 3)])
    assert [n for n, _ in sc.named_trainable()] == [ROUTER]
    sc.discard()
    sc = apply_scope(model, adapter, "full")
    assert sc.trainable_params == sc.total_params and sc.ratio == 1.0
    sc.discard()


def test_router_and_experts_scopes_keep_the_rest_bitwise():
    model, adapter, sc, before, _ = _run_seuf("experts", steps=2)
    sc.bake()
    after = _snapshot(model)
    assert torch.equal(after[ROUTER], before[ROUTER])
    assert not torch.equal(after[UP][2], before[UP][2])
    model, adapter, sc, before, _ = _run_seuf("router", steps=2)
    sc.bake()
    after = _snapshot(model)
    assert [k for k in before if not torch.equal(after[k], before[k])] == [ROUTER]


def test_scope_errors_are_clear():
    model, adapter = model_and_adapter()
    with pytest.raises(ValueError, match="scope must be one of"):
        apply_scope(model, adapter, "layers", [(1, 0)])
    with pytest.raises(ValueError, match="needs at least one selected"):
        apply_scope(model, adapter, "seuf", [])
    with pytest.raises(ValueError, match="layer 9 is not an MoE layer"):
        apply_scope(model, adapter, "seuf", [(9, 0)])
    with pytest.raises(ValueError, match="expert 8 out of range"):
        apply_scope(model, adapter, "seuf", [(1, 8)])
    sc = apply_scope(model, adapter, "seuf", [(1, 0)])
    with pytest.raises(ValueError, match="already carries wired expert slices"):
        apply_scope(model, adapter, "seuf", [(1, 1)])
    sc.discard()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_slice_gradient_equals_the_fused_tensor_gradient_rows(impl):
    batch = corpus(4, seed=1).collate(range(4))
    model, adapter = model_and_adapter()
    model.config._experts_implementation = impl
    model(input_ids=batch["input_ids"]).logits.square().mean().backward()
    want = model.model.layers[LAYER].mlp.experts.gate_up_proj.grad[EXPERTS].clone()
    model.zero_grad(set_to_none=True)
    sc = apply_scope(model, adapter, "experts", [(LAYER, e) for e in EXPERTS])
    model(input_ids=batch["input_ids"]).logits.square().mean().backward()
    got = sc.trainable_parameters()[0].grad
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    sc.discard()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_only_its_slices(family):
    model = tiny_model(family, seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers()[-1].layer
    batch = corpus(4, seed=1).collate(range(4))
    with router_tap(adapter.moe_layers()) as rec:
        plain = model(input_ids=batch["input_ids"]).logits.detach()
    # An expert the router actually uses on this data (else it gets no gradient).
    expert = int(rec[layer][0].topk_indices.flatten().mode().values)
    before = _snapshot(model)
    sel = [(layer, expert)]
    sc = apply_scope(model, adapter, "seuf", sel)
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain)  # wiring is exact
    obj = make_objective(
        "ga", ObjectiveOptions(), adapter, sel, anchor_weight=1.0, layers=sc.layers
    )
    f = BatchStream(corpus(8, seed=1), 4, seed=0)
    train(model, adapter, sc, obj, f, None, TrainingOptions(lr=1e-2, max_steps=2, stop=StopRule()))
    sc.bake()
    after = _snapshot(model)
    moe = next(m for m in adapter.moe_layers() if m.layer == layer)
    for name in before:
        if name in moe.expert_params:
            diff = (after[name] != before[name]).reshape(after[name].shape[0], -1).any(1)
            assert diff.nonzero().flatten().tolist() == [expert], name
        elif name in moe.router_params:
            assert not torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name], before[name]), name


_ZERO_SCRIPT = r"""
import json, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
torch.set_num_threads(1)
import deepspeed
from tests.engine._train_kit import corpus, model_and_adapter
from workers.data import BatchStream
from workers.objectives import Batches, make_objective
from workers.scope import apply_scope, deepspeed_config_for
from workers.spec import ObjectiveOptions

stage = int(sys.argv[1])
model, adapter = model_and_adapter(0)
before = {k: v.clone() for k, v in model.state_dict().items()}
sel = [(1, 2)]
sc = apply_scope(model, adapter, "seuf", sel)
obj = make_objective("ga", ObjectiveOptions(), adapter, sel, anchor_weight=1.0, layers=sc.layers)
params = sc.trainable_parameters()
opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
base = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage}}
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params,
                                  config=deepspeed_config_for(sc, base))
f = BatchStream(corpus(8, seed=1), 4, seed=0)
losses = []
for step in range(3):
    b = Batches(f.batch(step))
    loss, _ = obj(obj.forward(engine, b), b)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    sc.bake()
    after = {k: v.clone() for k, v in model.state_dict().items()}
up = "model.layers.1.mlp.experts.gate_up_proj"


def whole_state():
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.clone() for k, v in model.state_dict().items()}


# discard() on the partitioned model (the error path): the router comes back from its copy.
gate = "model.layers.1.mlp.gate.weight"
s0 = whole_state()
sc2 = apply_scope(model, adapter, "seuf", [(1, 3)])
router = dict(model.named_parameters())[gate]
with deepspeed.zero.GatheredParameters([router], modifier_rank=0):
    router.data.add_(1.0)
moved = not torch.equal(whole_state()[gate], s0[gate])
sc2.discard()
s1 = whole_state()
print("RESULT " + json.dumps({
    "discard": {"moved": moved, "restored": all(torch.equal(s0[k], s1[k]) for k in s0)},
    "losses": losses,
    "changed": sorted(k for k in before if not torch.equal(before[k], after[k])),
    "experts": [e for e in range(8) if not torch.equal(before[up][e], after[up][e])],
}))
"""


@pytest.mark.slow
def test_seuf_scope_under_deepspeed_zero3(tmp_path):
    """ZeRO-3 (single CPU process, in a subprocess: it initialises torch.distributed) trains
    the same slices with the same losses as the plain loop, and a scope discarded on the
    partitioned model leaves it bitwise as it was."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _ZERO_SCRIPT, "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["changed"] == sorted([UP, DOWN, ROUTER])  # LAYER is 1
    assert got["experts"] == [2]
    # A scope discarded on the partitioned model restores its router shard from the copy.
    assert got["discard"] == {"moved": True, "restored": True}
    # The same three steps without DeepSpeed.
    model, adapter = model_and_adapter(seed=0)
    sel = [(1, 2)]
    sc = apply_scope(model, adapter, "seuf", sel)
    obj = make_objective(
        "ga", ObjectiveOptions(), adapter, sel, anchor_weight=1.0, layers=sc.layers
    )
    opts = TrainingOptions(lr=1e-2, max_steps=3, weight_decay=0.5, grad_clip=1.0, stop=StopRule())
    res = train(model, adapter, sc, obj, BatchStream(corpus(8, seed=1), 4, seed=0), None, opts)
    assert got["losses"] == pytest.approx([h.loss for h in res.history], rel=1e-4)


def test_tunable_ratio_on_the_real_qwen15_moe_shape():
    """Paper: SEUF with M = 1 trains ~0.06% of Qwen1.5-MoE-A2.7B. Built on the meta device
    (shapes only, no weights, no download)."""
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        vocab_size=151936, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sc = apply_scope(model, get_adapter(model), "seuf", [(12, 7)])
    assert sc.total_params == 14_315_784_192  # Qwen1.5-MoE-A2.7B: 14.3B parameters
    assert sc.trainable_params == 3 * 2048 * 1408 + 60 * 2048  # one expert + the router
    assert round(100 * sc.ratio, 2) == 0.06
    sc.discard()


def _fused_allocations(model, fused: dict[str, torch.Tensor], run) -> list[str]:
    """Names of ops that, while `run()` executes, produce a NEW tensor shaped like one of
    the fused expert tensors (a copy of it or a gradient for all of it); views are fine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # 3-D weights only: a 2-D bias shape [E, H] is also the shape of ordinary activations.
    shapes = {tuple(t.shape) for t in fused.values() if t.dim() == 3}
    shapes |= {(s[0], s[2], s[1]) for s in list(shapes)}  # transposed (grouped_mm operand)
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view (e.g. the transpose grouped_mm takes): no new memory
            for o in out if isinstance(out, tuple | list) else [out]:
                if isinstance(o, torch.Tensor) and tuple(o.shape) in shapes:
                    seen.append(str(func))
            return out

    with Watch():
        run()
    return seen


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_wiring_neither_copies_nor_differentiates_the_fused_tensors(family, impl):
    """Same forward (bitwise) and the same slice and router gradients as training the fused
    tensors themselves, without ever materialising a fused-size copy or gradient."""
    model = tiny_model(family, seed=0)
    model.config._experts_implementation = impl
    adapter = get_adapter(model)
    moe = adapter.moe_layers()[-1]
    batch = corpus(4, seed=1).collate(range(4))
    with router_tap([moe]) as rec:
        plain = model(input_ids=batch["input_ids"]).logits
    expert = int(rec[moe.layer][0].topk_indices.flatten().mode().values)
    plain.square().mean().backward()
    want = [model.get_parameter(n).grad[expert].clone() for n in moe.expert_params]
    want += [model.get_parameter(n).grad.clone() for n in moe.router_params]
    fused = {n: model.get_parameter(n).detach() for n in moe.expert_params}
    model.zero_grad(set_to_none=True)
    sc = apply_scope(model, adapter, "seuf", [(moe.layer, expert)])
    got: list[torch.Tensor] = []

    def step() -> None:
        logits = model(input_ids=batch["input_ids"]).logits
        assert torch.equal(logits.detach(), plain.detach())
        logits.square().mean().backward()

    assert _fused_allocations(model, fused, step) == []
    got = [p.grad for p in sc.trainable_parameters()]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (1, *w.shape) or g.shape == w.shape
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-5, atol=1e-7)
    assert all(model.get_parameter(n).grad is None for n in moe.expert_params)
    sc.discard()


def test_a_selected_expert_no_token_chose_gets_a_zero_gradient():
    model, adapter = model_and_adapter()
    batch = corpus(1, seed=3).collate([0])
    with router_tap(adapter.moe_layers()) as rec:
        model(input_ids=batch["input_ids"])
    used = set(rec[LAYER][0].topk_indices.flatten().tolist())
    idle = min(set(range(adapter.num_experts)) - used)
    plain = model(input_ids=batch["input_ids"]).logits.detach()
    sc = apply_scope(model, adapter, "experts", [(LAYER, idle)])
    logits = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(logits.detach(), plain)
    logits.sum().backward()
    grads = [p.grad for p in sc.trainable_parameters()]
    assert all(g is not None and not g.any() for g in grads)  # zero, not missing (DDP)
    sc.discard()


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_baked_tensors_are_the_state_bake_leaves(family):
    """TrainableScope.baked_tensors (what a ZeRO-3 patch output reads instead of baking):
    every tensor, in sorted order, bitwise the state dict bake() leaves, without baking;
    workers.partitioned.model_sha256 (tensor by tensor) is state_sha256 of the state dict."""
    from workers.partitioned import model_sha256
    from workers.patch import items_sha256, state_sha256

    torch.manual_seed(0)
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers()[0].layer
    scope = apply_scope(model, adapter, "seuf", [(layer, 1), (layer, 3)])
    with torch.no_grad():
        for p in scope.trainable_parameters():
            p.add_(torch.randn_like(p))
    baked = {n: t.clone() for n, t in scope.baked_tensors()}
    digest = items_sha256(scope.baked_tensors())
    scope.bake()
    want = model.state_dict()
    assert list(baked) == sorted(want)
    for name, t in want.items():
        assert torch.equal(baked[name], t), name
    assert digest == state_sha256(want) == model_sha256(model)
    assert model_sha256(model, torch.bfloat16) == state_sha256(want, torch.bfloat16)
