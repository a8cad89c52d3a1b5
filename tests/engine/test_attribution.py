"""Expert attribution: affinity / frequency / contrastive against hand computations."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine._moe_hand import hand_gate, make_batch, per_sequence
from workers.attribution import ExpertMap, attribute, loss_positions, resolve_method
from workers.moe import get_adapter
from workers.moe.tiny import FAMILIES, tiny_model


def _t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def hand_scores(model, family: str, batches: list[dict], use_loss_mask: bool = False):
    """Per MoE layer: (mean used gate score, mean selection), paper averaging, computed from
    the router logits that model(..., output_router_logits=True) returns."""
    moe = get_adapter(model).moe_layers()  # only for the router modules (V3 bias, groups)
    mass: list[list[torch.Tensor]] = [[] for _ in moe]
    freq: list[list[torch.Tensor]] = [[] for _ in moe]
    for batch in batches:
        with torch.no_grad():
            out = model(
                **{k: batch[k] for k in ("input_ids", "attention_mask")},
                output_router_logits=True,
                use_cache=False,
            )
        b, s = batch["input_ids"].shape
        pos = batch["attention_mask"].bool()
        if use_loss_mask:
            pos = pos & batch["loss_mask"].bool()
        for r, (m, logits) in enumerate(zip(moe, out.router_logits, strict=True)):
            g, sel = hand_gate(family, logits, m.router, model.config)
            mass[r] += per_sequence(g.reshape(b, s, -1), pos)
            freq[r] += per_sequence(sel.reshape(b, s, -1), pos)
    return (
        torch.stack([torch.stack(rows).mean(0) for rows in mass]),
        torch.stack([torch.stack(rows).mean(0) for rows in freq]),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_affinity_and_frequency_equal_hand_computation(family: str, padded_batches) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    aff = attribute(model, adapter, padded_batches, method="affinity")
    freq = attribute(model, adapter, padded_batches, method="frequency")
    want_mass, want_freq = hand_scores(model, family, padded_batches)
    torch.testing.assert_close(_t(aff.scores), want_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_t(freq.scores), want_freq, atol=1e-9, rtol=0)
    assert aff.layers == adapter.moe_layer_indices()
    assert aff.tokens == 9 + 5 + 7 + 4 + 8 and aff.sequences == 5
    assert aff.positions == "all"
    # Frequencies are fractions of tokens: each token picks K experts.
    torch.testing.assert_close(
        _t(freq.scores).sum(-1), _t([float(adapter.top_k)] * len(aff.layers)), atol=1e-9, rtol=0
    )
    # The ranking is every pair, best first, consistent with the score matrix.
    assert len(aff.ranking) == len(aff.layers) * adapter.num_experts
    assert [p.score for p in aff.ranking] == sorted((p.score for p in aff.ranking), reverse=True)
    best = aff.ranking[0]
    assert best.score == max(max(row) for row in aff.scores) == aff.score(best.layer, best.expert)


def test_padding_is_excluded(padded_batches) -> None:
    # Same sequences with extra padding give the same scores (to float tolerance).
    model = tiny_model("qwen2_moe")
    adapter = get_adapter(model)
    wide = []
    for b in padded_batches:
        pad = torch.zeros(b["input_ids"].shape[0], 5, dtype=torch.long)
        wide.append({k: torch.cat([v, pad], 1) for k, v in b.items()})
    a = attribute(model, adapter, padded_batches, method="affinity")
    w = attribute(model, adapter, wide, method="affinity")
    torch.testing.assert_close(torch.tensor(w.scores), torch.tensor(a.scores), atol=1e-6, rtol=0)
    assert w.tokens == a.tokens


def test_left_padding_gives_the_same_scores(padded_batches) -> None:
    # Padding is masked wherever it sits: left padding routes like right padding.
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    left = []
    for b in padded_batches:
        ids, mask = b["input_ids"].clone(), b["attention_mask"].clone()
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            ids[r] = torch.roll(ids[r], ids.shape[1] - n)
            mask[r] = torch.roll(mask[r], ids.shape[1] - n)
        left.append({"input_ids": ids, "attention_mask": mask})
    assert not torch.equal(left[0]["attention_mask"], padded_batches[0]["attention_mask"])
    a = attribute(model, adapter, padded_batches, method="affinity")
    b = attribute(model, adapter, left, method="affinity")
    torch.testing.assert_close(_t(b.scores), _t(a.scores), atol=1e-5, rtol=0)


def test_token_budget_stops_at_batch_granularity(padded_batches) -> None:
    model = tiny_model("olmoe")
    adapter = get_adapter(model)
    first = int(padded_batches[0]["attention_mask"].sum())
    only_first = attribute(model, adapter, padded_batches[:1], method="affinity")
    capped = attribute(model, adapter, padded_batches, method="affinity", token_budget=first)
    both = attribute(model, adapter, padded_batches, method="affinity", token_budget=first + 1)
    assert capped.tokens == first and capped.scores == only_first.scores
    assert both.tokens == first + 12 and both.sequences == 5
    with pytest.raises(ValueError, match="token_budget"):
        attribute(model, adapter, padded_batches, token_budget=0)


def _with_loss_mask(batch: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lm = (torch.rand(batch["input_ids"].shape, generator=g) < 0.4).float()
    lm[:, -1] = 0
    return {**batch, "loss_mask": lm * batch["attention_mask"]}


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_contrastive_equals_hand_computation_at_loss_positions(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    forget = [_with_loss_mask(make_batch([9, 6, 8], 9, seed=10), 1)]
    retain = [_with_loss_mask(make_batch([7, 9], 9, seed=11), 2)]
    emap = attribute(model, adapter, forget, retain_batches=retain, method="auto")
    assert emap.method == "contrastive" and emap.positions == "loss"
    f_mass, _ = hand_scores(model, family, forget, use_loss_mask=True)
    r_mass, _ = hand_scores(model, family, retain, use_loss_mask=True)
    torch.testing.assert_close(_t(emap.scores), f_mass - r_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_t(emap.forget_mass), f_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_t(emap.retain_mass), r_mass, atol=1e-6, rtol=1e-5)
    # Diagnostics explain the top expert of each layer from the kept mass matrices.
    for r, d in enumerate(emap.diagnostics):
        row = emap.scores[r]
        assert row[d.top_expert] == max(row)
        assert d.share == pytest.approx(float(f_mass[r, d.top_expert] / f_mass[r].sum()))
        fm, rm = float(f_mass[r, d.top_expert]), float(r_mass[r, d.top_expert])
        assert (d.forget_mass, d.retain_mass) == (pytest.approx(fm), pytest.approx(rm))
        assert d.ratio == (pytest.approx(fm / rm) if rm > 0 else None)


def test_labels_give_the_same_positions_as_loss_mask() -> None:
    batch = _with_loss_mask(make_batch([6, 4], 6, seed=3), 4)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1].bool(), batch["input_ids"][:, 1:], -100)
    from_labels = loss_positions({"input_ids": batch["input_ids"], "labels": labels})
    assert torch.equal(from_labels, batch["loss_mask"].bool())
    assert loss_positions({"input_ids": batch["input_ids"]}) is None


def _planted_world():
    """A mixtral whose layer-0 router sends 'forget' tokens (ids 10-29) to expert 5 AND the
    generic expert 2, and 'retain' tokens (ids 30-49) to expert 2 only: by raw gate mass
    expert 2 wins, by forget-minus-retain mass expert 5 does."""
    model = tiny_model("mixtral")
    h = model.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(h, h, generator=torch.Generator().manual_seed(0)))
    u, v = q[:, 0], q[:, 1]  # u: shared by all tokens, v: the forget topic's direction
    noise = q[:, 2:]  # retain tokens get a random mix of the remaining directions
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for t in range(10, 30):
            emb[t] = 20 * u + 20 * v
        for t in range(30, 50):
            w = torch.nn.functional.normalize(noise @ torch.randn(h - 2, generator=g), dim=0)
            emb[t] = 20 * u + 20 * w
        r0 = model.model.layers[0].mlp.gate.weight
        r0.zero_()
        r0[2] = 3.0 * u
        r0[5] = 2.9 * v  # slightly below expert 2 on forget tokens
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.zero_()  # uniform routing elsewhere: no contrast there
    return model


def _topic_batches(low: int, seed: int, n: int = 3) -> list[dict]:
    batches = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        ids = torch.randint(low, low + 20, (4, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[1, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_contrastive_finds_the_planted_expert_where_affinity_does_not() -> None:
    model = _planted_world()
    adapter = get_adapter(model)
    forget, retain = _topic_batches(10, 100), _topic_batches(30, 200)
    aff = attribute(model, adapter, forget, retain_batches=retain, method="affinity")
    con = attribute(model, adapter, forget, retain_batches=retain, method="contrastive")
    assert (aff.ranking[0].layer, aff.ranking[0].expert) == (0, 2)  # the generic expert
    assert (con.ranking[0].layer, con.ranking[0].expert) == (0, 5)  # the planted expert
    d0 = con.diagnostics[0]
    assert d0.top_expert == 5
    assert 0.3 < d0.share < 0.6  # expert 5 takes ~45% of the forget mass (logit gap 0.4)
    assert d0.ratio is not None and d0.ratio > 100  # and almost nothing of the retain mass
    assert aff.diagnostics[0].ratio == pytest.approx(aff.forget_mass[0][2] / aff.retain_mass[0][2])
    assert aff.diagnostics[0].ratio < 1  # generic: retain tokens use it even more


def test_expert_map_json_round_trip(padded_batches) -> None:
    model = tiny_model("deepseek_v2")
    emap = attribute(model, get_adapter(model), padded_batches, retain_batches=padded_batches[:1])
    text = json.dumps(emap.to_json())
    back = ExpertMap.from_json(text)
    assert back == emap
    assert ExpertMap.from_json(json.loads(text)).to_json() == emap.to_json()
    assert emap.to_json()["layers"] == [1, 2]


def test_method_errors() -> None:
    assert resolve_method("auto", False) == "affinity"
    assert resolve_method("auto", True) == "contrastive"
    with pytest.raises(ValueError, match="needs retain"):
        resolve_method("contrastive", False)
    with pytest.raises(ValueError, match="unknown attribution method 'mass'"):
        resolve_method("mass", True)
    model = tiny_model("qwen3_moe")
    empty = [
        {
            "input_ids": torch.zeros(2, 3, dtype=torch.long),
            "attention_mask": torch.zeros(2, 3, dtype=torch.long),
        }
    ]
    with pytest.raises(ValueError, match="no usable tokens"):
        attribute(model, get_adapter(model), empty)


def test_attribution_restores_training_mode(padded_batches) -> None:
    model = tiny_model("qwen3_moe").train()
    attribute(model, get_adapter(model), padded_batches)
    assert model.training


def test_budget_works_on_an_endless_sampler() -> None:
    import itertools

    model = tiny_model("qwen3_moe")
    pulled = []

    def sampler():
        for i in itertools.count():
            pulled.append(i)
            yield make_batch([6, 6], 6, seed=i)

    emap = attribute(model, get_adapter(model), sampler(), token_budget=30)
    assert emap.tokens == 36 and pulled == [0, 1, 2]  # 12 tokens per batch, no extra pull
