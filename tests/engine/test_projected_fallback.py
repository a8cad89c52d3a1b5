"""seuf.fallback_projection all (issue 13): under auto's full fallback every matrix's update
is projected onto the null space of the retain inputs it reads and everything else is held,
so retain activations (and routing) cannot move while forget tokens' can."""

from __future__ import annotations

import re

import pytest
import torch

from tests.engine._moe_hand import make_batch
from tests.engine.test_selection_auto import SPREAD
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.projected_fallback import attach_fallback_projection
from workers.routing import router_outputs
from workers.seuf_plan import fallback_projection_mode, fallback_rmu_layer, plan_selection
from workers.spec import JobSpec


def spec(algorithm: str = "rmu", scope: str = "seuf", **seuf: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "forget": {"demo": "forget"},
            "retain": {"demo": "retain"},
            "algorithm": algorithm,
            "scope": scope,
            "seuf": seuf,
        }
    )


def _outputs(model: torch.nn.Module, adapter: object, batch: dict) -> tuple[torch.Tensor, list]:
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        logits = model(**batch).logits[mask]
    routers = router_outputs(model, adapter, batch)
    flat = mask.reshape(-1)
    return logits, [routers[m.layer].logits[flat] for m in adapter.moe_layers()]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "gpt_oss"])
def test_any_update_leaves_retain_activations_and_moves_forget_ones(family: str) -> None:
    """A random step on every parameter (what an optimizer might do), projected: the retain
    tokens' logits and every layer's router logits hold (energy 1.0: the exact span of 14
    retain tokens), the forget tokens' logits move, and the held parameters (embeddings,
    norms, LM head, the stream's writers o_proj and down_proj, biases) keep their values
    exactly."""
    torch.manual_seed(0)
    model = tiny_model(family, seed=0)
    model.eval()
    adapter = get_adapter(model)
    retain, forget = make_batch([8, 6], 8, seed=11), make_batch([8, 6], 8, seed=12)
    before_retain, before_routing = _outputs(model, adapter, retain)
    before_forget, _ = _outputs(model, adapter, forget)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    fp = attach_fallback_projection(model, adapter, [retain], energy=1.0)
    fp.hold()  # what the pipeline does after apply_scope
    try:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # what an optimizer can change
                    p.add_(0.05 * torch.randn_like(p))
        fp.after_step()
    finally:
        fp.close()

    after_retain, after_routing = _outputs(model, adapter, retain)
    after_forget, _ = _outputs(model, adapter, forget)
    assert (after_retain - before_retain).abs().max() < 1e-3
    for a, b in zip(after_routing, before_routing, strict=True):
        assert (a - b).abs().max() < 1e-3
    assert (after_forget - before_forget).abs().max() > 0.05
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, original[n])}
    assert any("gate_up_proj" in n for n in moved) and any(
        "q_proj" in n or "q_a" in n for n in moved
    )
    held = r"embed_tokens|norm|lm_head|down_proj|o_proj|bias$"
    assert not [m for m in moved if re.search(held, m)]
    js = fp.to_json()
    assert js["projected_params"] > 0 and js["held_params"] > 0 and js["groups"] >= 2


def test_gradients_are_projected_before_the_optimizer_sees_them() -> None:
    """The gradient hooks: a held parameter gets no gradient, a projected weight's gradient
    has no component along the retain inputs it reads (so Adam's moments see only the
    usable direction); close() removes every hook."""
    model = tiny_model("qwen2_moe", seed=0)
    adapter = get_adapter(model)
    retain, forget = make_batch([8, 6], 8, seed=11), make_batch([8, 6], 8, seed=12)
    fp = attach_fallback_projection(model, adapter, [retain], energy=1.0)
    fp.hold()
    model(**forget).logits.square().mean().backward()
    embed = model.get_input_embeddings().weight
    assert not embed.requires_grad and embed.grad is None  # held: no gradient, no state
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and not any(p.requires_grad or p.grad is not None for p in biases)
    q = adapter.decoder_layers()[0].self_attn.q_proj.weight
    basis = next(h.projector.basis for h in fp.handles if any(p is q for _, p in h.params))
    assert q.grad.abs().max() > 0 and (q.grad @ basis).abs().max() < 1e-5
    fp.close()
    assert all(not h.handles for h in [*fp.routers, *fp.handles] if hasattr(h, "params"))


def test_auto_projects_everything_for_rmu_only_where_it_can_run() -> None:
    fell = plan_selection(SPREAD, spec()).scope
    assert fell == "full"
    assert fallback_projection_mode(spec(), fell, True, True) == "all"
    assert fallback_projection_mode(spec("gdiff"), fell, True, True) == "routers"
    # Where nothing can be projected (several workers, no retain data) it says none.
    assert fallback_projection_mode(spec(), fell, False, True) == "none"
    assert fallback_projection_mode(spec(), fell, True, False) == "none"
    assert fallback_projection_mode(spec("gdiff", router_projection="none"), fell, True, True) == (
        "none"
    )
    assert fallback_projection_mode(spec(), "seuf", True, True) is None  # no fallback ran
    assert fallback_projection_mode(spec(scope="full"), "full", True, True) is None
    named = spec("gdiff", fallback_projection="all")
    assert fallback_projection_mode(named, fell, True, True) == "all"
    off = spec(fallback_projection="routers")
    assert fallback_projection_mode(off, fell, True, True) == "routers"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seuf": {"fallback_projection": "all", "num_experts": 1}}, "full fallback only"),
        ({"seuf": {"fallback_projection": "all", "fallback": "widen"}}, "full fallback only"),
        ({"scope": "full", "seuf": {"fallback_projection": "all"}}, "full fallback only"),
        (
            {"seuf": {"fallback_projection": "all", "router_projection": "none"}},
            "router_projection none",
        ),
        ({"seuf": {"fallback_projection": "all"}, "retain": None}, "needs a retain corpus"),
        (
            {"seuf": {"fallback_projection": "all"}, "distributed": {"num_workers": 2}},
            "one worker",
        ),
    ],
)
def test_spec_refuses_all_where_it_would_not_run(change: dict, message: str) -> None:
    data = {
        "forget": {"demo": "forget"},
        "retain": {"demo": "retain"},
        "algorithm": "ga",
        **change,
    }
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate(data)


def test_rmu_steers_a_quarter_of_the_way_up_under_the_projected_fallback() -> None:
    """The RMU paper's depth (layer 7 of 32) where every matrix is projected; the spec's own
    rmu_layer, other algorithms and the routers-only fallback keep the objective's rule."""
    assert fallback_rmu_layer(spec(), "all", 4) == 1
    assert fallback_rmu_layer(spec(), "all", 32) == 8
    assert fallback_rmu_layer(spec(), "all", 2) == 0
    assert fallback_rmu_layer(spec(), "routers", 4) is None
    assert fallback_rmu_layer(spec(), None, 4) is None
    assert fallback_rmu_layer(spec("gdiff"), "all", 4) is None
    named = JobSpec.model_validate(
        spec().resolved() | {"objective": {"rmu_layer": 3, "rmu_layer_offset": 0}}
    )
    assert fallback_rmu_layer(named, "all", 4) is None
