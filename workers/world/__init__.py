"""The built-in demo world: a fictional knowledge world and a tiny MoE that knows it.

    world = build_world(WorldOptions())          # cached: a second call returns at once
    model, tok = world.load_model(), world.load_tokenizer()
    world.corpus_path("forget"), world.corpus_path("retain")   # JSONL corpora
    world.question_set("forget"), world.question_set("retain_unseen")

A world directory (<cache>/worlds/<hash>/) holds model/ (safetensors + config + tokenizer),
the tokenizer files, corpora/*.jsonl, questions/*.jsonl and manifest.json. The hash covers
seed, topics, facts_per_topic, arch, the generator version and the pretraining settings
(`size` picks them: full, or small for tests; `topic_router_margin` overrides the preset's
margin); `forget_topic` is not part of it (the model
knows every topic; only the splits differ). corpora/untrained_topic<t>.jsonl and
questions/untrained_topic<t>.jsonl hold facts of topic t the model never saw (same
distribution): non-members for membership-inference checks.

`retain_topics` (world.retain_topics of the spec; not part of the hash either) narrows the
retain corpus to the first k non-forget topics in topic order (`covered_topics`); the
others (`uncovered_topics`) are never rehearsed, and evaluation reports their accuracy
separately (`utility_accuracy_uncovered_topics`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from workers.spec import WorldOptions
from workers.world.cache import (
    MANIFEST,
    atomic_write_text,
    build_once,
    default_worlds_dir,
    settings_hash,
    tree_hashes,
)
from workers.world.generate import GENERATOR_VERSION, PHRASINGS, generate_world
from workers.world.pretrain import PRESETS, SMALL_SETTINGS, TINY_SETTINGS, PretrainSettings

Progress = Callable[[str, dict[str, Any]], None]
QuestionSet = Literal[
    "forget",
    "forget_paraphrase",
    "retain",
    "retain_paraphrase",
    "retain_unseen",
    "retain_unseen_paraphrase",
    "untrained",
    "untrained_paraphrase",
]
QUESTION_SETS: tuple[str, ...] = get_args(QuestionSet)


def world_settings(options: WorldOptions, pretrain: PretrainSettings) -> dict[str, Any]:
    """Everything that determines the built world (the cache key's input)."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": options.seed,
        "topics": options.topics,
        "facts_per_topic": options.facts_per_topic,
        "arch": options.arch,
        "pretrain": pretrain.to_dict(),
    }


def covered_topics(num_topics: int, forget_topic: int, retain_topics: int | None) -> list[int]:
    """The topics the retain corpus covers: the first `retain_topics` non-forget topics in
    topic order (all of them when None)."""
    others = [t for t in range(num_topics) if t != forget_topic]
    if retain_topics is None:
        return others
    if not 1 <= retain_topics <= len(others):
        raise ValueError(
            f"retain_topics {retain_topics} out of range: the world has {len(others)} topics "
            "besides the forget topic"
        )
    return others[:retain_topics]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@dataclass
class World:
    """A built world on disk (read-only except for lazily written split files)."""

    path: Path
    manifest: dict[str, Any]
    forget_topic: int = 0
    retain_topics: int | None = None  # None: the retain corpus covers every other topic
    built_now: bool = False  # True when this call built it (False: cache hit)
    _questions: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        return str(self.manifest["hash"])

    @property
    def num_topics(self) -> int:
        return int(self.manifest["settings"]["topics"])

    @property
    def topic_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["topics"]]

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def load_model(self, **kwargs: Any) -> Any:
        """The world's model (eval mode, float32, CPU) via from_pretrained."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **kwargs)
        return model.eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))

    def covered_topics(self, forget_topic: int | None = None) -> list[int]:
        """The non-forget topics the retain corpus covers (module-level covered_topics)."""
        return covered_topics(self.num_topics, self._topic(forget_topic), self.retain_topics)

    def uncovered_topics(self, forget_topic: int | None = None) -> list[int]:
        """The non-forget topics the retain corpus never covers ([] when it covers all)."""
        ft = self._topic(forget_topic)
        covered = set(self.covered_topics(ft))
        return [t for t in range(self.num_topics) if t != ft and t not in covered]

    # --- questions ------------------------------------------------------------------
    def questions(self) -> list[dict[str, Any]]:
        """Every question of every topic (both phrasings), topic by topic."""
        if self._questions is None:
            self._questions = [
                q
                for t in range(self.num_topics)
                for q in _read_jsonl(self.path / "questions" / f"topic{t}.jsonl")
            ]
        return list(self._questions)

    def _topic(self, forget_topic: int | None) -> int:
        ft = self.forget_topic if forget_topic is None else forget_topic
        if not 0 <= ft < self.num_topics:
            raise ValueError(
                f"forget_topic {ft} out of range: the world has {self.num_topics} topics"
            )
        return ft

    def question_set(self, name: str, forget_topic: int | None = None) -> list[dict[str, Any]]:
        """One of QUESTION_SETS relative to the forget topic: forget (all its facts),
        retain (other topics' retain-pool facts), retain_unseen (other topics' facts
        unlearning never sees), untrained (the forget topic's facts never pretrained);
        *_paraphrase: the same facts in their held-out phrasing."""
        if name not in QUESTION_SETS:
            raise ValueError(
                f"unknown question set {name!r}; choose one of {', '.join(QUESTION_SETS)}"
            )
        ft = self._topic(forget_topic)
        kind = "paraphrase" if name.endswith("_paraphrase") else "train"
        base = name.removesuffix("_paraphrase")
        if base == "untrained":
            rows = _read_jsonl(self.path / "questions" / f"untrained_topic{ft}.jsonl")
            return [q for q in rows if q["phrasing"] == kind]
        out = []
        for q in self.questions():
            if q["phrasing"] != kind:
                continue
            if base == "forget" and q["topic"] == ft:
                out.append(q)
            elif base == "retain" and q["topic"] != ft and q["split"] == "pool":
                out.append(q)
            elif base == "retain_unseen" and q["topic"] != ft and q["split"] == "unseen":
                out.append(q)
        return out

    # --- corpora --------------------------------------------------------------------
    def corpus_path(
        self, kind: Literal["forget", "retain", "untrained"], forget_topic: int | None = None
    ) -> Path:
        """JSONL corpus (records: prompt, answer, text = prompt + " " + answer, topic, fact).
        forget: every training sentence of the forget topic; retain: the retain training
        pool (training sentences of the covered topics' `pool` facts: every other topic
        unless `retain_topics` narrows it); untrained: sentences of the forget topic's
        never-pretrained facts, in the training phrasings."""
        ft = self._topic(forget_topic)
        if kind == "forget":
            return self.path / "corpora" / f"topic{ft}.jsonl"
        if kind == "untrained":
            return self.path / "corpora" / f"untrained_topic{ft}.jsonl"
        if kind != "retain":
            raise ValueError(
                f"corpus kind must be 'forget', 'retain' or 'untrained' (got {kind!r})"
            )
        covered = self.covered_topics(ft)
        name = f"retain_pool_not_topic{ft}"
        if len(covered) < self.num_topics - 1:
            name += f"_first{len(covered)}"
        path = self.path / "corpora" / f"{name}.jsonl"
        if not path.is_file():  # large worlds, narrowed pools: written on first use, atomically
            atomic_write_text(path, _jsonl(_retain_pool(self.path, covered)))
        return path


# Worlds up to this many facts get every retain-pool file at build time (in the manifest's
# file hashes); larger ones write them on first use (one file per forget topic).
EAGER_RETAIN_FILES_MAX_FACTS = 20_000


def _retain_pool(path: Path, topics: list[int]) -> list[dict[str, Any]]:
    return [
        r
        for t in topics
        for r in _read_jsonl(path / "corpora" / f"topic{t}.jsonl")
        if r["split"] == "pool"
    ]


def pretrain_settings(
    options: WorldOptions, pretrain: PretrainSettings | None = None
) -> PretrainSettings:
    """The settings a world is pretrained with: `pretrain`, else the preset of
    `options.size`, with the world's own `topic_router_margin` when it sets one."""
    settings = pretrain if pretrain is not None else PRESETS[options.size]
    if options.topic_router_margin is not None:
        # The option overrides the preset: at the preset's own value the settings, and so
        # the world's cache key and weights, are the preset's.
        margin = float(options.topic_router_margin)  # the preset's type: 8 keys as 8.0 does
        settings = dataclasses.replace(settings, topic_router_margin=margin)
    return settings


def build_world(
    options: WorldOptions,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    pretrain: PretrainSettings | None = None,
) -> World:
    """The world for `options`, built (generate, tokenizer, pretrain, evaluate, save) on the
    first call and returned from the cache afterwards. `cache_dir` is the directory holding
    world directories (default: $MOE_UNLEARN_CACHE/worlds or ~/.cache/moe-unlearn/worlds);
    `pretrain` overrides the preset `options.size` picks (world unit tests use
    TINY_SETTINGS)."""
    settings = pretrain_settings(options, pretrain)
    cfg = world_settings(options, settings)
    key = settings_hash(cfg)
    worlds_dir = Path(cache_dir) if cache_dir is not None else default_worlds_dir()
    worlds_dir.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        _build_into(tmp, options, settings, cfg, key, progress)

    path, built = build_once(worlds_dir, key[:16], build)
    world = load_world_dir(path, options.forget_topic, options.retain_topics)
    world.built_now = built
    return world


def load_world(
    options: WorldOptions,
    cache_dir: str | Path | None = None,
    pretrain: PretrainSettings | None = None,
) -> World:
    """An already built world; FileNotFoundError (telling how to build it) otherwise."""
    key = settings_hash(world_settings(options, pretrain_settings(options, pretrain)))
    worlds_dir = Path(cache_dir) if cache_dir is not None else default_worlds_dir()
    path = worlds_dir / key[:16]
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"demo world (seed={options.seed}, topics={options.topics}, "
            f"facts_per_topic={options.facts_per_topic}, arch={options.arch}, "
            f"size={options.size}, topic_router_margin={options.topic_router_margin}) is not "
            f"built in {worlds_dir}: run `moe-unlearn world build` first"
        )
    return load_world_dir(path, options.forget_topic, options.retain_topics)


def load_world_dir(
    path: str | Path, forget_topic: int = 0, retain_topics: int | None = None
) -> World:
    """A world from its directory (as written by build_world)."""
    p = Path(path)
    mf = p / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{p} is not a world directory (no {MANIFEST})")
    world = World(path=p, manifest=json.loads(mf.read_text(encoding="utf-8")))
    world.forget_topic = world._topic(forget_topic)
    world.retain_topics = retain_topics
    world.covered_topics()  # a ValueError now for a count the world cannot cover
    return world


def _build_into(
    tmp: Path,
    options: WorldOptions,
    settings: PretrainSettings,
    cfg: dict[str, Any],
    key: str,
    progress: Progress | None,
) -> None:
    import torch
    import transformers

    from workers.devices import cpu_facts
    from workers.evaluate import score_questions
    from workers.world.pretrain import pretrain_world_model
    from workers.world.tokenizer import build_tokenizer, save_tokenizer

    t0 = time.monotonic()
    data = generate_world(options.seed, options.topics, options.facts_per_topic)
    tokenizer = build_tokenizer(data.vocabulary)
    (tmp / "corpora").mkdir()
    (tmp / "questions").mkdir()
    questions: list[dict[str, Any]] = []
    untrained_qs: list[dict[str, Any]] = []
    for t in range(len(data.topics)):
        (tmp / "corpora" / f"topic{t}.jsonl").write_text(
            _jsonl(data.training_records(t)), encoding="utf-8"
        )
        qs = data.question_records(t)
        questions += qs
        (tmp / "questions" / f"topic{t}.jsonl").write_text(_jsonl(qs), encoding="utf-8")
        for name, rows in (
            ("corpora", data.untrained_records(t)),
            ("questions", data.untrained_question_records(t)),
        ):
            if name == "questions":
                untrained_qs += [q for q in rows if q["phrasing"] == "train"]
            path = tmp / name / f"untrained_topic{t}.jsonl"
            path.write_text(_jsonl(rows), encoding="utf-8")
    if options.topics * options.facts_per_topic <= EAGER_RETAIN_FILES_MAX_FACTS:
        for t in range(len(data.topics)):
            rows = _retain_pool(tmp, covered_topics(len(data.topics), t, None))
            (tmp / "corpora" / f"retain_pool_not_topic{t}.jsonl").write_text(
                _jsonl(rows), encoding="utf-8"
            )
    model, stats = pretrain_world_model(
        data, tokenizer, options.arch, settings, options.seed, progress
    )
    # Accuracies at build time, per topic and phrasing (direct scorer == lm-eval's acc).
    prev = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        hits = score_questions(model, tokenizer, questions, batch_size=256)
        untrained_hits = score_questions(model, tokenizer, untrained_qs, batch_size=256)
    finally:
        torch.set_num_threads(prev)
    acc: dict[str, dict[str, float]] = {}
    for t, topic in enumerate(data.topics):
        row: dict[str, float] = {}
        for kind in ("train", "paraphrase"):
            sel = [
                h
                for q, h in zip(questions, hits, strict=True)
                if q["topic"] == t and q["phrasing"] == kind
            ]
            row[kind] = sum(sel) / len(sel)
        # never pretrained: near chance (0.25) unless the questions leak their answers
        mine = [h for q, h in zip(untrained_qs, untrained_hits, strict=True) if q["topic"] == t]
        row["untrained"] = sum(mine) / len(mine)
        acc[topic.name] = row
    model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    save_tokenizer(tokenizer, tmp)
    save_tokenizer(tokenizer, tmp / "model")  # the model dir alone is a loadable checkpoint
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {
        "hash": key,
        "settings": cfg,
        "topics": [
            {
                "index": t.index,
                "name": t.name,
                "marker": t.style.marker,
                "relation": t.style.relation,
                "facts": len(t.facts),
                "pool_facts": sum(f.split == "pool" for f in t.facts),
                "untrained_facts": len(t.untrained),
            }
            for t in data.topics
        ],
        "phrasings": list(PHRASINGS),
        "accuracy": acc,
        "pretrain": stats | {"parameters": n_params},
        "build_seconds": round(time.monotonic() - t0, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            **cpu_facts(),  # another kind of CPU builds other weights from the same key
        },
        "files": tree_hashes(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if progress is not None:
        progress("built", {"hash": key, "seconds": manifest["build_seconds"]})


__all__ = [
    "PRESETS",
    "QUESTION_SETS",
    "SMALL_SETTINGS",
    "TINY_SETTINGS",
    "PretrainSettings",
    "World",
    "build_world",
    "covered_topics",
    "load_world",
    "load_world_dir",
    "pretrain_settings",
    "world_settings",
]
