"""MoE adapters: structure discovery, gate scoring and router taps for all seven families."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.engine._moe_hand import hand_gate, make_batch
from workers.moe import SUPPORTED_MODEL_TYPES, get_adapter, router_tap
from workers.moe.base import RouterOutput
from workers.moe.tiny import FAMILIES, tiny_config, tiny_model

H, E, K, MOE_I = 32, 8, 2, 16
# family -> (MoE layer indices, {expert param suffix: shape}, shared param suffixes)
EXPECTED: dict[str, tuple[list[int], dict[str, tuple[int, ...]], list[str]]] = {
    "qwen2_moe": (
        [0, 1, 2],
        {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)},
        [
            "shared_expert.gate_proj.weight",
            "shared_expert.up_proj.weight",
            "shared_expert.down_proj.weight",
            "shared_expert_gate.weight",
        ],
    ),
    "qwen3_moe": ([0, 1, 2], {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)}, []),
    "mixtral": ([0, 1, 2], {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)}, []),
    "olmoe": ([0, 1, 2], {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)}, []),
    "deepseek_v2": (
        [1, 2],
        {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)},
        [
            "shared_experts.gate_proj.weight",
            "shared_experts.up_proj.weight",
            "shared_experts.down_proj.weight",
        ],
    ),
    "deepseek_v3": (
        [1, 2],
        {"gate_up_proj": (E, 2 * MOE_I, H), "down_proj": (E, H, MOE_I)},
        [
            "shared_experts.gate_proj.weight",
            "shared_experts.up_proj.weight",
            "shared_experts.down_proj.weight",
        ],
    ),
    "gpt_oss": (
        [0, 1, 2],
        {
            "gate_up_proj": (E, H, 2 * MOE_I),
            "gate_up_proj_bias": (E, 2 * MOE_I),
            "down_proj": (E, MOE_I, H),
            "down_proj_bias": (E, H),
        },
        [],
    ),
}
ROUTER = {"gpt_oss": ("router", ["weight", "bias"])}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_structure(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.family == family
    assert (adapter.num_experts, adapter.top_k) == (E, K)
    layers, expert_shapes, shared = EXPECTED[family]
    params = dict(model.named_parameters())
    moe = adapter.moe_layers()
    assert [m.layer for m in moe] == layers == adapter.moe_layer_indices()
    for m in moe:
        prefix = f"model.layers.{m.layer}.mlp"
        assert m.block is model.model.layers[m.layer].mlp
        r_attr, r_params = ROUTER.get(family, ("gate", ["weight"]))
        assert m.router is getattr(m.block, r_attr)
        assert m.router_params == [f"{prefix}.{r_attr}.{n}" for n in r_params]
        assert params[m.router_params[0]].shape == (E, H)
        assert m.expert_params == {f"{prefix}.experts.{n}": 0 for n in expert_shapes}
        for n, shape in expert_shapes.items():
            assert tuple(params[f"{prefix}.experts.{n}"].shape) == shape
        assert sorted(m.shared_params) == sorted(f"{prefix}.{s}" for s in shared)
        # Every parameter of the block is in exactly one list: nothing is left unclassified.
        block_params = {n for n in params if n.startswith(prefix + ".")}
        listed = list(m.expert_params) + m.router_params + m.shared_params
        assert sorted(listed) == sorted(block_params)
    # Dense layers are skipped and really are dense.
    for i, layer in enumerate(model.model.layers):
        if i not in layers:
            assert not hasattr(layer.mlp, "experts")
            with pytest.raises(ValueError, match=r"not an MoE layer.*MoE layers: \[1, 2\]"):
                adapter.moe_layer(i)


def test_qwen_dense_layers_from_config_are_skipped() -> None:
    model = tiny_model("qwen2_moe", mlp_only_layers=[1])
    assert get_adapter(model).moe_layer_indices() == [0, 2]
    model = tiny_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
    assert get_adapter(model).moe_layer_indices() == [1, 3]


def test_adapter_works_on_bare_decoder() -> None:
    # Names are relative to the model handed in (the base model has no "model." prefix).
    base = tiny_model("mixtral").model
    moe = get_adapter(base).moe_layers()
    assert moe[0].router_params == ["layers.0.mlp.gate.weight"]


def test_unknown_architecture_is_a_clear_error() -> None:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    dense = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported architecture 'llama'") as err:
        get_adapter(dense)
    for mt in SUPPORTED_MODEL_TYPES:
        assert mt in str(err.value)
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)
    with pytest.raises(ValueError, match="unknown MoE family"):
        tiny_config("llama")


def test_model_without_moe_layers_is_rejected() -> None:
    model = tiny_model("deepseek_v2", first_k_dense_replace=3)
    with pytest.raises(ValueError, match="no MoE layer"):
        get_adapter(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_tap_and_gate_scores_match_model_outputs(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch = make_batch([6, 4], 6, seed=3)
    moe = adapter.moe_layers()
    with torch.no_grad(), router_tap(moe) as rec:
        out = model(**batch, output_router_logits=True, use_cache=False)
    assert len(out.router_logits) == len(moe)
    for m, logits in zip(moe, out.router_logits, strict=True):
        (tap,) = rec[m.layer]
        assert torch.equal(tap.logits, logits)  # the tap sees the router's own output
        g_hand, sel_hand = hand_gate(family, logits, m.router, model.config)
        g = adapter.used_gate_scores(tap)
        assert torch.equal(adapter.topk_mask(tap).double(), sel_hand)
        torch.testing.assert_close(g.double(), g_hand, atol=1e-6, rtol=1e-5)
        assert bool((g[sel_hand == 0] == 0).all())
        p = adapter.gate_probs(tap.logits)
        if family == "deepseek_v3":  # sigmoid, bias-free: does not sum to 1
            torch.testing.assert_close(p, torch.sigmoid(logits.float()))
        else:
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
        if family == "gpt_oss":  # what the model mixes with
            torch.testing.assert_close(g.gather(1, tap.topk_indices), tap.topk_weights.float())


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_router_choice_is_used_not_a_plain_topk(family: str) -> None:
    # Group-limited routing (and V3's correction bias) choose experts that are not the
    # plain top-K of the scores: the adapter must take the router's own indices.
    model = tiny_model(family)
    adapter = get_adapter(model)
    m = adapter.moe_layers()[0]
    batch = make_batch([9, 9, 9], 9, seed=4)
    with torch.no_grad(), router_tap([m]) as rec:
        model(**batch, use_cache=False)
    tap: RouterOutput = rec[m.layer][0]
    probs = adapter.gate_probs(tap.logits)
    plain = torch.topk(probs, K, dim=-1).indices.sort(-1).values
    assert (plain != tap.topk_indices.sort(-1).values).any()
    g = adapter.used_gate_scores(tap)
    # The score is the bias-free probability (sigmoid for V3), at the chosen experts.
    torch.testing.assert_close(g.gather(1, tap.topk_indices), probs.gather(1, tap.topk_indices))


def test_anchor_graph_flows_through_tap() -> None:
    # The anchor loss backpropagates through the tapped logits into the router weight.
    model = tiny_model("qwen2_moe")
    m = get_adapter(model).moe_layers()[1]
    with router_tap([m]) as rec:
        model(**make_batch([5], 5, seed=5), use_cache=False)
    p = get_adapter(model).gate_probs(rec[m.layer][0].logits)
    ((p - torch.nn.functional.one_hot(torch.tensor(3), E)) ** 2).sum(-1).mean().backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_wired_experts_still_listed_as_the_fused_tensors() -> None:
    # workers/scope.py wires the trainable slices as a child module of the experts block:
    # the adapter must keep listing the fused [E, ...] tensors, never the child's slices.
    from workers.scope import apply_scope

    model = tiny_model("qwen2_moe")
    prefix = "model.layers.1.mlp.experts"
    before = get_adapter(model).moe_layer(1).expert_params
    scope = apply_scope(model, get_adapter(model), "seuf", [(1, 3)])
    assert any(".selected_experts." in n for n, _ in scope.named_trainable())
    assert get_adapter(model).moe_layer(1).expert_params == before == {
        f"{prefix}.gate_up_proj": 0,
        f"{prefix}.down_proj": 0,
    }


def test_wrapped_model_is_unwrapped() -> None:
    class Wrapper(torch.nn.Module):  # the shape of DDP / a DeepSpeed engine: .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = tiny_model("olmoe")
    adapter = get_adapter(Wrapper(inner))
    assert adapter.model is inner and adapter.moe_layer_indices() == [0, 1, 2]
    with pytest.raises(ValueError, match="unsupported architecture None"):
        get_adapter(torch.nn.Linear(2, 2))
