"""Sharded attribution (each rank scores its share of the calibration batches, the sums are
all-reduced) gives the single-process expert map. The ranks here are threads and the
all-reduce a barrier-synchronised sum: the collective is not what is under test (the Ray
tests run the real gloo one); the sharding, the token budget cut and the reduction are."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from tests.engine._moe_hand import make_batch
from workers.attribution import attribute, budget_prefix
from workers.moe import get_adapter
from workers.moe.tiny import tiny_model
from workers.runners.ray_train import shard_rows


def _with_loss_mask(b: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lm = (torch.rand(b["input_ids"].shape, generator=g) > 0.5).float() * b["attention_mask"]
    return {**b, "loss_mask": lm}


def _sharded(model, forget, retain, world: int, forwards: list | None = None, **kw) -> list:
    """Run sharded attribution on `world` threads (each with its own copy of the model, as
    each rank has) with a summing all-reduce; `forwards` gets each rank's forward count."""
    copies = [copy.deepcopy(model) for _ in range(world)]
    counts = [0] * world
    for r, c in enumerate(copies):
        first = get_adapter(c).decoder_layers()[0]  # attribution runs the decoder, no LM head
        first.register_forward_hook(lambda *_, r=r: counts.__setitem__(r, counts[r] + 1))
    barrier = threading.Barrier(world)
    slots: list[torch.Tensor | None] = [None] * world
    out: list = [None] * world
    errors: list[BaseException] = []

    def rank_fn(r: int) -> None:
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            slots[r] = t.clone()
            barrier.wait()
            total = sum(s for s in slots)  # type: ignore[misc]
            barrier.wait()  # everyone has read the slots before the next reduction
            t.copy_(total)
            return t

        try:
            out[r] = attribute(
                copies[r],
                get_adapter(copies[r]),
                forget,
                retain_batches=retain,
                at_loss_positions=True,
                shard=(r, world),
                reduce=all_reduce_sum,
                **kw,
            )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if forwards is not None:
        forwards.extend(counts)
    return out


@pytest.mark.parametrize("method,world", [("contrastive", 2), ("affinity", 3), ("frequency", 2)])
def test_sharded_attribution_equals_single_process(method, world):
    torch.manual_seed(0)
    model = tiny_model("qwen2_moe").eval()
    adapter = get_adapter(model)
    forget = [_with_loss_mask(make_batch([9, 5, 7], 9, seed=s), s) for s in range(5)]
    retain = [_with_loss_mask(make_batch([6, 8], 8, seed=10 + s), s) for s in range(3)]
    budget = 60  # cuts the forget batches after the 4th (tokens 21, 42, 63 ...)
    assert len(list(budget_prefix(forget, budget))) == 3
    with torch.no_grad():
        ref = attribute(model, adapter, forget, retain_batches=retain, method=method,
                        token_budget=budget, at_loss_positions=True)  # fmt: skip
        maps = _sharded(model, forget, retain, world, method=method, token_budget=budget)
    for emap in maps:
        assert emap.method == ref.method and emap.positions == "loss"
        assert (emap.tokens, emap.sequences, emap.retain_tokens) == (
            ref.tokens,
            ref.sequences,
            ref.retain_tokens,
        )
        for key in ("scores", "forget_mass", "forget_frequency", "retain_mass"):
            torch.testing.assert_close(
                torch.tensor(getattr(emap, key), dtype=torch.float64),
                torch.tensor(getattr(ref, key), dtype=torch.float64),
                rtol=0,
                atol=1e-12,
                msg=key,
            )

        # The same ranking; pairs whose scores tie mathematically (frequencies are often
        # equal fractions) may swap, since float64 summation order decides such ties.
        def key(ranking: list) -> list:
            return sorted((-round(x.score, 10), x.layer, x.expert) for x in ranking)

        assert key(emap.ranking) == key(ref.ranking)
        assert [round(x.score, 10) for x in emap.ranking] == [
            round(x.score, 10) for x in ref.ranking
        ]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lockstep_sharding_runs_the_same_forwards_on_every_rank(world):
    """A model partitioned over the ranks (ZeRO-3) gathers every layer in each forward, a
    collective: lockstep pads every rank to ceil(prefix / world) forwards (a batch without
    loss positions, which runs none, is made up too) and the map is still the one
    process's."""
    torch.manual_seed(0)
    model = tiny_model("qwen2_moe").eval()
    adapter = get_adapter(model)
    forget = [_with_loss_mask(make_batch([9, 5, 7], 9, seed=s), s) for s in range(5)]
    forget[1] = {**forget[1], "loss_mask": torch.zeros_like(forget[1]["loss_mask"])}
    retain = [_with_loss_mask(make_batch([6, 8], 8, seed=10 + s), s) for s in range(3)]
    budget = 60  # a prefix of 3 forget batches, all 3 retain batches
    with torch.no_grad():
        ref = attribute(model, adapter, forget, retain_batches=retain, method="contrastive",
                        token_budget=budget, at_loss_positions=True)  # fmt: skip
        plain: list[int] = []
        _sharded(model, forget, retain, world, plain, token_budget=budget)
        counts: list[int] = []
        maps = _sharded(model, forget, retain, world, counts, token_budget=budget, lockstep=True)
    assert len(set(plain)) > 1  # dealt round-robin, the ranks' forward counts differ
    assert counts == [2 * -(-3 // world)] * world  # forget and retain: ceil(3 / world) each
    for emap in maps:
        assert (emap.tokens, emap.sequences) == (ref.tokens, ref.sequences)
        torch.testing.assert_close(
            torch.tensor(emap.scores, dtype=torch.float64),
            torch.tensor(ref.scores, dtype=torch.float64), rtol=0, atol=1e-12,
        )  # fmt: skip


def test_shard_rows_cover_the_batch_once_and_never_leave_a_rank_empty():
    assert shard_rows([5, 1, 7, 3, 9], 0, 2) == [5, 7, 9]
    assert shard_rows([5, 1, 7, 3, 9], 1, 2) == [1, 3]
    assert shard_rows([4], 1, 2) == [4]  # a short last batch: the rank repeats a row
