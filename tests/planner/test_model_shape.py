"""The planner's parameter counts equal the real models': the torch model built from the same
config (every family, with the variants that change the layout), and the counts the published
models' cards state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.model_shape import UnsupportedModel, shape_from_config
from workers.moe import get_adapter
from workers.moe.tiny import FAMILIES, tiny_model
from workers.planner import trainable_params
from workers.scope import apply_scope
from workers.spec import JobSpec

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"

VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("qwen2_moe", {"mlp_only_layers": [1]}),
    ("qwen2_moe", {"decoder_sparse_step": 2}),
    ("qwen2_moe", {"tie_word_embeddings": True}),
    ("qwen2_moe", {"qkv_bias": False}),
    ("qwen3_moe", {"attention_bias": True}),
    ("mixtral", {"head_dim": 4}),
    ("deepseek_v2", {"q_lora_rank": 12}),
    ("deepseek_v2", {"first_k_dense_replace": 2}),
    ("deepseek_v3", {"q_lora_rank": 12, "attention_bias": True}),
]


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=lambda v: str(v))
def test_counts_equal_the_torch_model(family, overrides):
    model = tiny_model(family, **overrides)
    shape = shape_from_config(model.config.to_dict())
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    for i, n in enumerate(shape.layer_params):
        prefix = f"model.layers.{i}."
        assert n == sum(p.numel() for k, p in named.items() if k.startswith(prefix)), i
    adapter = get_adapter(model)
    assert shape.moe_layers == tuple(m.layer for m in adapter.moe_layers())


@pytest.mark.parametrize("family", FAMILIES)
def test_seuf_trainable_count_equals_the_wired_scope(family):
    """One selected expert + its router: what apply_scope makes trainable."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer = adapter.moe_layers()[-1].layer
    scope = apply_scope(model, adapter, "seuf", [(layer, 1)])
    spec = JobSpec.model_validate(
        {"model": "x", "forget": {"path": "f"}, "algorithm": "ga", "seuf": {"num_experts": 1}}
    )
    assert trainable_params(shape_from_config(model.config.to_dict()), spec) == (
        scope.trainable_params
    )
    scope.discard()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.json")))
def test_published_models_match_their_stated_size(name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    shape = shape_from_config(cfg)
    assert shape.total_params == pytest.approx(cfg["_published_params"], rel=0.01)


def test_unsupported_family_is_a_user_error():
    with pytest.raises(UnsupportedModel, match="llama"):
        shape_from_config({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="hidden_size"):
        shape_from_config({"model_type": "mixtral"})
