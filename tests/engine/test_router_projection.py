"""GRIP's null-space router projection: retain tokens' router logits hold under projected
AdamW updates while forget tokens' move; without the projection both move."""

from __future__ import annotations

import pytest
import torch

from tests.engine._moe_hand import make_batch
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.router_projection import ProjectedRouter, RouterProjector, router_inputs
from workers.routing import router_outputs

LAYER = 1


def _logits(model, adapter, batch) -> torch.Tensor:
    return router_outputs(model, adapter, batch)[LAYER].logits.detach().clone()


def _train_router(
    model, adapter, forget, proj: RouterProjector | None, steps: int = 5, hooks: bool = False
) -> None:
    """AdamW with weight decay on the target router only, pushing forget tokens' routing to
    expert 0 (an anchor-like loss): the elementwise Adam scaling is what a projected
    gradient alone would not survive."""
    router = adapter.moe_layer(LAYER).router
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in router.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.1)
    captured: list[torch.Tensor] = []
    hook = router.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    wrapped = ProjectedRouter(proj, router) if hooks and proj is not None else None
    try:
        for _ in range(steps):
            captured.clear()
            model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
            probs = torch.softmax(captured[0].float(), dim=-1)
            loss = (probs - torch.nn.functional.one_hot(torch.tensor(0), probs.shape[-1])) ** 2
            loss.sum(-1).mean().backward()
            if wrapped is not None:
                opt.step()
                wrapped.after_step()
            elif proj is None:
                opt.step()
            else:
                with proj.step(router):
                    opt.step()
            opt.zero_grad()
    finally:
        hook.remove()
        if wrapped is not None:
            wrapped.close()


@pytest.mark.parametrize("hooks", [False, True])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_projected_update_keeps_retain_logits_and_moves_forget_logits(
    family: str, hooks: bool
) -> None:
    model = tiny_model(family, seed=0)
    adapter = get_adapter(model)
    # 2 x 8 retain tokens < hidden size 32: the retain span is exact, so logits must hold.
    retain = make_batch([8, 6], 8, seed=11)
    forget = make_batch([7, 8], 8, seed=12)
    h = router_inputs(model, adapter, LAYER, [retain])
    assert h.shape == (14, 32)  # pad tokens dropped
    proj = RouterProjector.from_hidden_states(h, energy=1.0)
    assert proj.rank == 14 and proj.dim == 32
    r0, f0 = _logits(model, adapter, retain), _logits(model, adapter, forget)
    _train_router(model, adapter, forget, proj, hooks=hooks)
    r1, f1 = _logits(model, adapter, retain), _logits(model, adapter, forget)
    rm = retain["attention_mask"].reshape(-1).bool()
    fm = forget["attention_mask"].reshape(-1).bool()
    assert (r1 - r0)[rm].abs().max() < 1e-4
    assert (f1 - f0)[fm].abs().max() > 0.05


def test_without_projection_retain_logits_move() -> None:
    model = tiny_model("qwen2_moe", seed=0)
    adapter = get_adapter(model)
    retain, forget = make_batch([8, 6], 8, seed=11), make_batch([7, 8], 8, seed=12)
    r0 = _logits(model, adapter, retain)
    _train_router(model, adapter, forget, None)
    rm = retain["attention_mask"].reshape(-1).bool()
    assert (_logits(model, adapter, retain) - r0)[rm].abs().max() > 0.05


def test_energy_keeps_fewest_directions_and_bounds_the_change() -> None:
    torch.manual_seed(0)
    # 200 tokens in 32 dims, most energy in 4 directions: a full-rank, realistic case.
    strong = torch.randn(200, 4) @ torch.randn(4, 32) * 10.0
    h = strong + 0.01 * torch.randn(200, 32)
    full = RouterProjector.from_hidden_states(h, energy=1.0)
    part = RouterProjector.from_hidden_states(h, energy=0.99)
    assert full.rank == 32 and part.rank == 4 and part.energy >= 0.99
    g = torch.randn(8, 32)
    pg = part.project(g)
    # The projected change leaves retain logits nearly unmoved, the raw one does not.
    assert (pg @ h.T).norm() < 0.01 * (g @ h.T).norm()
    assert torch.allclose(part.project(pg), pg, atol=1e-5)  # a projector: P P = P
    assert full.project(g).abs().max() < 1e-4  # every direction protected: nothing left


def test_bias_is_frozen_and_bad_input_is_refused() -> None:
    router = torch.nn.Linear(4, 3, bias=True)
    proj = RouterProjector.from_hidden_states(torch.eye(4)[:2])
    w0, b0 = router.weight.detach().clone(), router.bias.detach().clone()
    router.weight.grad, router.bias.grad = torch.ones(3, 4), torch.ones(3)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    with proj.step(router):
        opt.step()
    assert torch.equal(router.bias, b0)
    assert torch.equal(router.weight[:, :2], w0[:, :2])  # protected directions
    assert not torch.equal(router.weight[:, 2:], w0[:, 2:])  # free directions moved
    with pytest.raises(ValueError, match="hidden states must be"):
        RouterProjector.from_hidden_states(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="energy must be in"):
        RouterProjector.from_hidden_states(torch.ones(2, 4), energy=0.0)
    with pytest.raises(ValueError, match="hidden size 4"):
        proj.project(torch.ones(3, 5))


def test_projected_router_hooks_project_the_gradient_and_go_away() -> None:
    router = torch.nn.Linear(4, 3, bias=True)
    proj = RouterProjector.from_hidden_states(torch.eye(4)[:2])
    x = torch.randn(5, 4)
    with ProjectedRouter(proj, router):
        router(x).sum().backward()
        assert router.weight.grad[:, :2].abs().max() == 0  # protected directions
        assert router.weight.grad[:, 2:].abs().max() > 0
        assert router.bias.grad.abs().max() == 0
    router.zero_grad()
    router(x).sum().backward()  # hooks removed: the plain gradient again
    assert router.weight.grad[:, :2].abs().max() > 0 and router.bias.grad.abs().max() > 0
