"""The small world builds, memorises every topic, is cached, and its corpora are consistent."""

from __future__ import annotations

import json
import threading
import time
from statistics import mean

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.small_world import SMALL_WORLD as SMALL
from workers.evaluate import accuracy
from workers.spec import WorldOptions
from workers.world import (
    QUESTION_SETS,
    SMALL_SETTINGS,
    TINY_SETTINGS,
    PretrainSettings,
    build_world,
    load_world,
    load_world_dir,
    pretrain_settings,
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
    assert cfg.hidden_size <= 64 and cfg.num_experts == SMALL_SETTINGS.num_experts
    # pretraining stopped on its accuracy target or epoch count (no clock in the settings)
    stats = small_world.manifest["pretrain"]
    assert SMALL_SETTINGS.min_epochs <= stats["epochs"] <= SMALL_SETTINGS.max_epochs
    assert "max_seconds" not in small_world.manifest["settings"]["pretrain"]
    # which kind of CPU built it: another kind builds other weights from the same key
    versions = small_world.manifest["versions"]
    assert versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "cpu_model" in versions


def test_untrained_facts_stay_unknown(small_world):
    """The never-pretrained facts are at chance: a non-member set for membership tests."""
    acc = small_world.manifest["accuracy"]
    assert mean(v["untrained"] for v in acc.values()) <= 0.40, acc  # chance 0.25, sd ~0.025
    rows = [json.loads(x) for x in small_world.corpus_path("untrained").read_text().splitlines()]
    forget = [json.loads(x) for x in small_world.corpus_path("forget").read_text().splitlines()]
    assert len(rows) == len(forget) and {r["split"] for r in rows} == {"untrained"}
    assert {r["topic"] for r in rows} == {0}
    assert not {r["answer"] for r in rows} & {r["answer"] for r in forget}
    qs = small_world.question_set("untrained", forget_topic=1)
    assert len(qs) == SMALL.facts_per_topic and {q["topic"] for q in qs} == {1}
    assert not {q["id"] for q in qs} & {q["id"] for q in small_world.questions()}
    assert "corpora/untrained_topic0.jsonl" in small_world.manifest["files"]


def test_cached_second_call_same_hash_other_seed_other_hash(small_world, worlds_dir):
    again = build_world(SMALL, cache_dir=worlds_dir)
    assert not again.built_now and again.path == small_world.path  # a cache hit
    assert again.hash == small_world.hash == small_world.manifest["hash"]
    assert load_world(SMALL, cache_dir=worlds_dir).path == small_world.path
    # forget_topic changes the splits, not the world
    other_topic = SMALL.model_copy(update={"forget_topic": 2})
    assert load_world(other_topic, cache_dir=worlds_dir).forget_topic == 2
    h = settings_hash(world_settings(SMALL, SMALL_SETTINGS))
    assert h == small_world.hash
    assert settings_hash(world_settings(SMALL.model_copy(update={"seed": 1}), SMALL_SETTINGS)) != h
    assert (
        settings_hash(world_settings(SMALL.model_copy(update={"arch": "mixtral"}), SMALL_SETTINGS))
        != h
    )
    full = SMALL.model_copy(update={"size": "full"})
    assert settings_hash(world_settings(full, PretrainSettings())) != h
    with pytest.raises(FileNotFoundError, match="size=full.*moe-unlearn world build"):
        load_world(full, cache_dir=worlds_dir)
    with pytest.raises(FileNotFoundError, match="moe-unlearn world build"):
        load_world(SMALL.model_copy(update={"seed": 7}), cache_dir=worlds_dir)


def test_topic_router_margin_overrides_the_preset_and_keys_the_world(worlds_dir):
    assert pretrain_settings(SMALL) == SMALL_SETTINGS
    same = SMALL.model_copy(update={"topic_router_margin": 8})
    assert SMALL_SETTINGS.topic_router_margin == 8.0
    h = settings_hash(world_settings(SMALL, pretrain_settings(SMALL)))
    assert settings_hash(world_settings(same, pretrain_settings(same))) == h  # the same world
    strong = SMALL.model_copy(update={"topic_router_margin": 24})
    assert pretrain_settings(strong).topic_router_margin == 24.0
    assert pretrain_settings(strong, TINY_SETTINGS).hidden_size == TINY_SETTINGS.hidden_size
    assert settings_hash(world_settings(strong, pretrain_settings(strong))) != h
    with pytest.raises(FileNotFoundError, match="topic_router_margin=24"):
        load_world(strong, cache_dir=worlds_dir)
    with pytest.raises(ValueError, match="topic_router_margin"):
        WorldOptions(topic_router_margin=65)
    with pytest.raises(ValueError, match="topic_router_margin"):
        WorldOptions(topic_router_margin=8.5)  # whole numbers: a bounded set of worlds


def test_manifest_file_hashes_and_layout(small_world):
    mf = small_world.manifest
    files = tree_hashes(small_world.path)
    for rel, digest in mf["files"].items():
        assert files[rel] == digest
    assert {"model/config.json", "model/model.safetensors", "tokenizer.json"} <= set(mf["files"])
    # small worlds get every retain-pool file at build time, so the manifest covers them
    assert {f"corpora/retain_pool_not_topic{t}.jsonl" for t in range(6)} <= set(mf["files"])
    assert {f"questions/untrained_topic{t}.jsonl" for t in range(6)} <= set(mf["files"])
    assert AutoTokenizer.from_pretrained(str(small_world.model_dir)).vocab == (
        small_world.load_tokenizer().vocab
    )
    assert mf["settings"]["topics"] == 6 and mf["settings"]["facts_per_topic"] == 50
    assert mf["settings"]["pretrain"] == SMALL_SETTINGS.to_dict()


def test_retain_topics_narrows_the_retain_corpus_to_the_first_topics(small_world):
    narrow = load_world_dir(small_world.path, forget_topic=0, retain_topics=2)
    assert narrow.covered_topics() == [1, 2] and narrow.uncovered_topics() == [3, 4, 5]
    rows = [json.loads(x) for x in narrow.corpus_path("retain").read_text().splitlines()]
    pool = [json.loads(x) for t in (1, 2)
            for x in small_world.corpus_path("forget", forget_topic=t).read_text().splitlines()]
    assert rows == [r for r in pool if r["split"] == "pool"] and len(rows) == 2 * 25 * 3
    # the full pool is untouched and stays the default; the forget topic is skipped
    assert narrow.corpus_path("retain").name == "retain_pool_not_topic0_first2.jsonl"
    assert small_world.corpus_path("retain").name == "retain_pool_not_topic0.jsonl"
    assert small_world.uncovered_topics() == [] and small_world.covered_topics() == [1, 2, 3, 4, 5]
    assert narrow.covered_topics(forget_topic=1) == [0, 2]
    three = load_world_dir(small_world.path, forget_topic=2, retain_topics=3)
    rows = [json.loads(x) for x in three.corpus_path("retain").read_text().splitlines()]
    assert {r["topic"] for r in rows} == {0, 1, 3} and three.uncovered_topics() == [4, 5]
    with pytest.raises(ValueError, match="retain_topics 6 out of range: the world has 5"):
        load_world_dir(small_world.path, retain_topics=6)


def test_corpora_and_question_sets(small_world):
    f_path = small_world.corpus_path("forget")
    rows = [json.loads(x) for x in f_path.read_text().splitlines()]
    assert len(rows) == 50 * 3 and {r["topic"] for r in rows} == {0}
    assert all(r["text"] == r["prompt"] + " " + r["answer"] for r in rows)
    r_rows = [json.loads(x) for x in small_world.corpus_path("retain").read_text().splitlines()]
    assert {r["topic"] for r in r_rows} == {1, 2, 3, 4, 5}
    assert all(r["split"] == "pool" for r in r_rows) and len(r_rows) == 5 * 25 * 3
    sets = {n: small_world.question_set(n) for n in QUESTION_SETS}
    assert len(sets["forget"]) == len(sets["forget_paraphrase"]) == 50
    assert len(sets["retain"]) == len(sets["retain_unseen"]) == 5 * 25
    assert len(sets["untrained"]) == len(sets["untrained_paraphrase"]) == 50
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
    cfg = world_model_config("qwen2_moe", len(small_tokenizer), SMALL_SETTINGS)
    torch.manual_seed(123)
    blank = AutoModelForCausalLM.from_config(cfg).eval()
    qs = small_world.questions()  # 600 four-choice questions
    acc = accuracy(blank, small_tokenizer, qs)
    assert 0.15 <= acc <= 0.35, acc  # chance 0.25, sd ~0.018


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


def test_bad_arch_is_a_clear_error():
    # Refused by the spec itself (a client learns it at submit, not from a failed build).
    with pytest.raises(ValueError, match="arch") as e:
        WorldOptions(topics=2, facts_per_topic=4, arch="llama")
    assert "qwen2_moe" in str(e.value)  # it says what is allowed


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
    from workers.world.pretrain import topic_embedding_init, topic_router_init

    data = generate_world(0, 6, 50)  # the small world's words (same tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        world_model_config("qwen2_moe", len(small_tokenizer), SMALL_SETTINGS)
    ).eval()
    dirs = topic_embedding_init(model, small_tokenizer, data, 0.5, seed=0)
    topic_router_init(model, dirs, 8.0)
    emb = torch.nn.functional.normalize(model.get_input_embeddings().weight, dim=-1)
    vocab = small_tokenizer.get_vocab()
    ids = [torch.tensor([vocab[f.subject] for f in t.facts]) for t in data.topics]
    same = torch.stack([(emb[i] @ emb[i].T).mean() for i in ids]).mean()
    cross = (emb[ids[0]] @ emb[ids[1]].T).mean()
    assert same > 0.3 and abs(cross) < 0.15, (same, cross)
    # subjects of topic t are routed to expert t % E (in their top-2 of 8: chance 0.25) in
    # every MoE layer: mostly, and well above chance for every topic and layer
    adapter = get_adapter(model)
    n_e = adapter.num_experts
    shares = []
    for t, i in enumerate(ids):
        outs = router_outputs(model, adapter, {"input_ids": i[:, None]})
        shares += [float((o.topk_indices == t % n_e).any(-1).float().mean()) for o in outs.values()]
    assert sum(shares) / len(shares) >= 0.9 and min(shares) >= 0.6, shares
    with pytest.raises(ValueError, match="topic_embedding_mix"):
        topic_embedding_init(model, small_tokenizer, data, 1.5, seed=0)
