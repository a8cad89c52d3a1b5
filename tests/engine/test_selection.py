"""Expert selection from an expert map: every mode, and the errors users can cause."""

from __future__ import annotations

import pytest

from workers.attribution import ExpertMap, diagnose, rank
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.selection import select_experts
from workers.spec import ExpertRef, SeufOptions

# A DeepSeek-like map: layer 0 is dense, MoE layers 1..3, 4 experts each.
SCORES = [
    [0.10, 0.50, 0.20, 0.05],  # layer 1
    [0.70, 0.15, 0.30, 0.45],  # layer 2
    [0.25, 0.35, 0.60, 0.40],  # layer 3
]


def make_map() -> ExpertMap:
    emap = ExpertMap(
        method="affinity",
        layers=[1, 2, 3],
        num_experts=4,
        top_k=2,
        scores=[row[:] for row in SCORES],
        forget_mass=[row[:] for row in SCORES],
        forget_frequency=[[0.5] * 4 for _ in SCORES],
    )
    emap.ranking = rank(emap)
    emap.diagnostics = diagnose(emap)
    return emap


def pairs(sel: list) -> list[tuple[int, int]]:
    return [(s.layer, s.expert) for s in sel]


def test_top_m_is_global_and_sets_target_layer() -> None:
    emap = make_map()
    sel = select_experts(emap, SeufOptions(num_experts=1))
    assert pairs(sel) == [(2, 0)] and sel[0].score == 0.70
    assert emap.selected == sel and emap.target_layer == 2
    sel3 = select_experts(emap, SeufOptions(num_experts=3))
    assert pairs(sel3) == [(2, 0), (3, 2), (1, 1)]
    assert [s.score for s in sel3] == [0.70, 0.60, 0.50]


def test_in_layer() -> None:
    emap = make_map()
    sel = select_experts(emap, SeufOptions(selection="in_layer", layer=3, num_experts=2))
    assert pairs(sel) == [(3, 2), (3, 3)] and emap.target_layer == 3
    with pytest.raises(
        ValueError, match=r"seuf.layer=0 is not an MoE layer; MoE layers: \[1, 2, 3\]"
    ):
        select_experts(emap, SeufOptions(selection="in_layer", layer=0))
    with pytest.raises(ValueError, match="seuf.num_experts=5 but only 4"):
        select_experts(emap, SeufOptions(selection="in_layer", layer=1, num_experts=5))


def test_per_layer_best_layer_first() -> None:
    sel = select_experts(make_map(), SeufOptions(selection="per_layer"))
    assert pairs(sel) == [(2, 0), (3, 2), (1, 1)]


def test_random_is_seeded_and_valid() -> None:
    emap = make_map()
    a = select_experts(emap, SeufOptions(selection="random", num_experts=3, seed=7))
    b = select_experts(emap, SeufOptions(selection="random", num_experts=3, seed=7))
    assert a == b and len(set(pairs(a))) == 3
    assert all(s.layer in emap.layers and 0 <= s.expert < 4 for s in a)
    assert all(s.score == emap.score(s.layer, s.expert) for s in a)
    draws = {
        tuple(pairs(select_experts(emap, SeufOptions(selection="random", seed=s))))
        for s in range(20)
    }
    assert len(draws) > 3  # different seeds pick different experts
    with pytest.raises(ValueError, match="seuf.num_experts=13 but only 12"):
        select_experts(emap, SeufOptions(selection="random", num_experts=13))


def test_manual_keeps_order_and_validates() -> None:
    emap = make_map()
    opts = SeufOptions(
        selection="manual", experts=[ExpertRef(layer=3, expert=0), ExpertRef(layer=1, expert=2)]
    )
    sel = select_experts(emap, opts)
    assert pairs(sel) == [(3, 0), (1, 2)] and [s.score for s in sel] == [0.25, 0.20]
    assert emap.target_layer == 3
    bad = [
        ([ExpertRef(layer=0, expert=1)], r"experts\[0\].layer=0 is not an MoE layer .*\[1, 2, 3\]"),
        ([ExpertRef(layer=9, expert=1)], r"experts\[0\].layer=9 is not an MoE layer"),
        (
            [ExpertRef(layer=1, expert=0), ExpertRef(layer=2, expert=4)],
            r"experts\[1\].expert=4 out of range: valid 0..3",
        ),
        ([ExpertRef(layer=1, expert=0), ExpertRef(layer=1, expert=0)], r"experts\[1\] repeats"),
    ]
    for experts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            select_experts(emap, SeufOptions(selection="manual", experts=experts))


def test_top_m_too_many() -> None:
    with pytest.raises(ValueError, match="seuf.num_experts=13 but only 12 routed experts"):
        select_experts(make_map(), SeufOptions(num_experts=13))


def test_selection_on_a_real_map_survives_json(padded_batches) -> None:
    from workers.attribution import attribute

    model = tiny_model("deepseek_v3")
    emap = attribute(model, get_adapter(model), padded_batches)
    sel = select_experts(emap, SeufOptions(selection="per_layer"))
    assert [s.layer for s in sel] != [] and {s.layer for s in sel} == {1, 2}
    back = ExpertMap.from_json(emap.to_json())
    assert back.selected == sel and back.target_layer == sel[0].layer
    with pytest.raises(ValueError, match=r"MoE layers: \[1, 2\]"):
        select_experts(
            emap, SeufOptions(selection="manual", experts=[ExpertRef(layer=0, expert=0)])
        )
