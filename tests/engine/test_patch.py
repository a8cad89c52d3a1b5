"""Expert patches: only changed regions are stored; apply and revert are bit-exact."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from workers.patch import (
    apply_patch,
    diff_states,
    patch_model_dir,
    read_patch,
    revert_patch,
    state_sha256,
    write_patch,
)

EXPERTS = "model.layers.1.mlp.experts.gate_up_proj"
ROUTER = "model.layers.1.mlp.gate.weight"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(cfg)


def _changed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    new = {k: v.clone() for k, v in state.items()}
    new[EXPERTS][2] += 0.5  # one expert's slice of a fused tensor
    new[ROUTER] *= 1.5
    return new


def test_patch_stores_only_changed_slices_and_round_trips(tmp_path):
    base = {k: v.clone() for k, v in _model().state_dict().items()}
    after = _changed(base)
    expert_dims = {EXPERTS: 0, "model.layers.1.mlp.experts.down_proj": 0}
    assert diff_states(base, after, expert_dims) == [(EXPERTS, 2), (ROUTER, None)]

    patch = write_patch(tmp_path / "p.safetensors", base, after, expert_dims)
    assert [(r.name, r.expert) for r in patch.regions] == [(EXPERTS, 2), (ROUTER, None)]
    _, tensors = read_patch(tmp_path / "p.safetensors")
    # The fused tensor's slice, not the whole [E, 2I, H] tensor, is stored.
    assert tensors["after/0"].shape == base[EXPERTS][2].shape

    state = {k: v.clone() for k, v in base.items()}
    apply_patch(state, tmp_path / "p.safetensors")
    assert state_sha256(state) == patch.patched_model_sha256 == state_sha256(after)
    revert_patch(state, tmp_path / "p.safetensors")
    assert state_sha256(state) == patch.base_model_sha256
    assert all(torch.equal(state[k], base[k]) for k in base)


def test_patch_refuses_a_model_it_was_not_made_for(tmp_path):
    base = {k: v.clone() for k, v in _model().state_dict().items()}
    write_patch(tmp_path / "p.safetensors", base, _changed(base), {EXPERTS: 0})
    other = {k: v.clone() for k, v in base.items()}
    other[ROUTER] += 1.0
    before = {k: v.clone() for k, v in other.items()}
    with pytest.raises(ValueError, match="does not match the patch's base values"):
        apply_patch(other, tmp_path / "p.safetensors")
    assert all(torch.equal(other[k], before[k]) for k in other)  # nothing half-applied
    with pytest.raises(ValueError, match="does not match the patch's patched values"):
        revert_patch(base, tmp_path / "p.safetensors")


def test_not_a_patch_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors expert patch"):
        read_patch(bad)
    with pytest.raises(ValueError, match="not found"):
        read_patch(tmp_path / "missing.safetensors")


def test_model_directory_apply_and_revert_bit_exact(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    patch = write_patch(tmp_path / "p.safetensors", base, _changed(base), {EXPERTS: 0})
    patch_model_dir(tmp_path / "base", tmp_path / "p.safetensors", tmp_path / "patched")
    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched").state_dict()
    assert state_sha256(patched) == patch.patched_model_sha256
    patch_model_dir(tmp_path / "patched", tmp_path / "p.safetensors", tmp_path / "back",
                    revert=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert state_sha256(back) == state_sha256(base)
    with pytest.raises(ValueError, match="does not match"):
        patch_model_dir(tmp_path / "patched", tmp_path / "p.safetensors", tmp_path / "x")
