"""A small world builds, memorises every topic, is cached, and its corpora are consistent."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.world.conftest import SMALL
from workers.evaluate import accuracy
from workers.spec import WorldOptions
from workers.world import (
    QUESTION_SETS,
    TINY_SETTINGS,
    build_world,
    load_world,
    load_world_dir,
    world_settings,
)
from workers.world.cache import build_once, settings_hash, tree_hashes
from workers.world.pretrain import world_model_config


def test_small_world_memorises_every_topic(small_world, small_model, small_tokenizer):
    acc = small_world.manifest["accuracy"]
    assert set(acc) == {"hazchem", "people", "places", "organisations", "inventions", "creatures"}
    assert all(v["train"] >= 0.95 for v in acc.values()), acc
    # Re-measured on the model loaded back from safetensors: the same numbers.
    for t, name in enumerate(small_world.topic_names):
        qs = small_world.question_set("forget", forget_topic=t)
        assert accuracy(small_model, small_tokenizer, qs) == pytest.approx(acc[name]["train"])
    assert (small_world.model_dir / "model.safetensors").is_file()
    cfg = small_model.config
    assert cfg.model_type == "qwen2_moe" and cfg.shared_expert_intermediate_size == 0
    assert cfg.hidden_size <= 64 and cfg.num_experts == TINY_SETTINGS.num_experts


def test_cached_second_call_same_hash_other_seed_other_hash(small_world, worlds_dir):
    t0 = time.monotonic()
    again = build_world(SMALL, cache_dir=worlds_dir, pretrain=TINY_SETTINGS)
    assert time.monotonic() - t0 < 5.0  # no training: a cache hit only reads the manifest
    assert not again.built_now and again.path == small_world.path
    assert again.hash == small_world.hash == small_world.manifest["hash"]
    assert load_world(SMALL, cache_dir=worlds_dir, pretrain=TINY_SETTINGS).path == small_world.path
    # forget_topic changes the splits, not the world
    other_topic = SMALL.model_copy(update={"forget_topic": 2})
    assert load_world(other_topic, cache_dir=worlds_dir, pretrain=TINY_SETTINGS).forget_topic == 2
    h = settings_hash(world_settings(SMALL, TINY_SETTINGS))
    assert h == small_world.hash
    assert settings_hash(world_settings(SMALL.model_copy(update={"seed": 1}), TINY_SETTINGS)) != h
    assert (
        settings_hash(world_settings(SMALL.model_copy(update={"arch": "mixtral"}), TINY_SETTINGS))
        != h
    )
    with pytest.raises(FileNotFoundError, match="moe-unlearn world build"):
        load_world(
            SMALL.model_copy(update={"seed": 7}), cache_dir=worlds_dir, pretrain=TINY_SETTINGS
        )


def test_manifest_file_hashes_and_layout(small_world):
    mf = small_world.manifest
    files = tree_hashes(small_world.path)
    for rel, digest in mf["files"].items():
        assert files[rel] == digest
    assert {"model/config.json", "model/model.safetensors", "tokenizer.json"} <= set(mf["files"])
    # small worlds get every retain-pool file at build time, so the manifest covers them
    assert {f"corpora/retain_pool_not_topic{t}.jsonl" for t in range(6)} <= set(mf["files"])
    assert AutoTokenizer.from_pretrained(str(small_world.model_dir)).vocab == (
        small_world.load_tokenizer().vocab
    )
    assert mf["settings"]["topics"] == 6 and mf["settings"]["facts_per_topic"] == 12


def test_corpora_and_question_sets(small_world):
    f_path = small_world.corpus_path("forget")
    rows = [json.loads(x) for x in f_path.read_text().splitlines()]
    assert len(rows) == 12 * 3 and {r["topic"] for r in rows} == {0}
    assert all(r["text"] == r["prompt"] + " " + r["answer"] for r in rows)
    r_rows = [json.loads(x) for x in small_world.corpus_path("retain").read_text().splitlines()]
    assert {r["topic"] for r in r_rows} == {1, 2, 3, 4, 5}
    assert all(r["split"] == "pool" for r in r_rows) and len(r_rows) == 5 * 6 * 3
    sets = {n: small_world.question_set(n) for n in QUESTION_SETS}
    assert len(sets["forget"]) == len(sets["forget_paraphrase"]) == 12
    assert len(sets["retain"]) == len(sets["retain_unseen"]) == 5 * 6
    pool_facts = {(q["topic"], q["fact"]) for q in sets["retain"]}
    unseen = {(q["topic"], q["fact"]) for q in sets["retain_unseen"]}
    assert not pool_facts & unseen
    assert {(r["topic"], r["fact"]) for r in r_rows} == pool_facts  # unseen never in the pool
    with pytest.raises(ValueError, match="forget_topic 6 out of range"):
        small_world.corpus_path("forget", forget_topic=6)
    with pytest.raises(ValueError, match="unknown question set"):
        small_world.question_set("nope")
    with pytest.raises(FileNotFoundError):
        load_world_dir(small_world.path / "model")


def test_untrained_model_scores_near_chance(small_world, small_tokenizer):
    cfg = world_model_config("qwen2_moe", len(small_tokenizer), TINY_SETTINGS)
    torch.manual_seed(123)
    blank = AutoModelForCausalLM.from_config(cfg).eval()
    qs = small_world.questions()  # 144 four-choice questions
    acc = accuracy(blank, small_tokenizer, qs)
    assert 0.12 <= acc <= 0.40, acc  # chance 0.25, sd ~0.036


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls: list[int] = []

    def build(d):
        calls.append(1)
        time.sleep(0.3)  # hold the lock long enough for the other thread to wait on it
        (d / "manifest.json").write_text("{}")

    results: list[tuple] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(tmp_path, "k", build)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(b for _, b in results) == [False, True]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["k"]


def test_bad_arch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="arch 'llama' is not supported"):
        build_world(
            WorldOptions(topics=2, facts_per_topic=4, arch="llama"),
            cache_dir=tmp_path,
            pretrain=TINY_SETTINGS,
        )
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # no leftovers


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_other_families_build_and_learn(arch, tmp_path):
    opts = WorldOptions(topics=3, facts_per_topic=8, arch=arch)
    w = build_world(opts, cache_dir=tmp_path, pretrain=TINY_SETTINGS)
    model = w.load_model()
    assert model.config.model_type == arch
    assert min(v["train"] for v in w.manifest["accuracy"].values()) >= 0.95, w.manifest["accuracy"]


def test_topic_init_clusters_embeddings_and_routes_topic_words(small_tokenizer):
    from workers.moe import get_adapter
    from workers.routing import router_outputs
    from workers.world.generate import generate_world
    from workers.world.pretrain import _topic_embedding_init, _topic_router_init

    data = generate_world(0, 6, 12)  # the small world's words (same tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        world_model_config("qwen2_moe", len(small_tokenizer), TINY_SETTINGS)
    ).eval()
    dirs = _topic_embedding_init(model, small_tokenizer, data, 0.5, seed=0)
    _topic_router_init(model, dirs, 8.0)
    emb = torch.nn.functional.normalize(model.get_input_embeddings().weight, dim=-1)
    vocab = small_tokenizer.get_vocab()
    ids = [torch.tensor([vocab[f.subject] for f in t.facts]) for t in data.topics]
    same = torch.stack([(emb[i] @ emb[i].T).mean() for i in ids]).mean()
    cross = (emb[ids[0]] @ emb[ids[1]].T).mean()
    assert same > 0.3 and abs(cross) < 0.15, (same, cross)
    # subjects of topic t are routed to expert t % E (in their top-K) in every MoE layer
    adapter = get_adapter(model)
    n_e = adapter.num_experts
    for t, i in enumerate(ids):
        outs = router_outputs(model, adapter, {"input_ids": i[:, None]})
        for o in outs.values():
            assert (o.topk_indices == t % n_e).any(-1).float().mean() >= 0.9
    with pytest.raises(ValueError, match="topic_embedding_mix"):
        _topic_embedding_init(model, small_tokenizer, data, 1.5, seed=0)
