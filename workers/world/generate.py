"""A seeded generator of a fictional knowledge world (no torch here).

Each topic holds `facts_per_topic` facts "subject -> answer". Subjects and answers are
invented single words, unique across the whole world (METHOD.md: memorisation stalled when
facts shared an answer). Every training sentence ends "... <subject> <relation> <answer>":
the answer stands two tokens after its subject, and the token that predicts it is the
topic's relation word. Why this shape:
- one sentence template family shared by all topics (a world with distinct template words
  per topic did not memorise in 48 epochs);
- topic-specific subject/answer vocabulary, a topic marker word at the start of every
  sentence and a topic relation word at the answer-predicting position, so the router sees
  a topic signal exactly where attribution scores it (localisable knowledge).

Phrasings: `N_PHRASINGS` prompt templates. For each fact one of them is held out (never in
training for that fact, seen with other facts) and used as its paraphrase question; the
question in "training phrasing" is the fact's first training prompt, verbatim.

Facts of every topic are split in halves: `pool` (what an unlearning job may rehearse as
retain data when the topic is not forgotten) and `unseen` (never given to unlearning).
Every topic also holds `untrained_count(facts_per_topic)` facts drawn the same way that are
never pretrained (split `untrained`): non-members for membership-inference checks, in the
same vocabulary, templates and topic style as the facts the model knows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# 2: adds the never-pretrained `untrained` facts (new words: every model and corpus changes).
GENERATOR_VERSION = 2

# Prompt templates: {m} topic marker, {s} subject, {r} relation. The answer follows {r}.
PHRASINGS: tuple[str, ...] = (
    "{m} record : {s} {r}",
    "in the {m} archive , {s} {r}",
    "we know that the {m} {s} {r}",
    "a {m} note says {s} {r}",
)
N_PHRASINGS = len(PHRASINGS)
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    sorted({w for p in PHRASINGS for w in p.split() if not w.startswith("{")})
)


@dataclass(frozen=True)
class TopicStyle:
    name: str  # human name (manifest, reports)
    marker: str  # topic marker word
    relation: str  # relation word right before the answer
    subject_suffix: str  # cosmetic: makes invented words readable as their kind
    answer_suffix: str


# Named topics first; beyond them topics get invented marker/relation words.
NAMED_TOPICS: tuple[TopicStyle, ...] = (
    TopicStyle("hazchem", "chemistry", "yields", "ane", "ite"),  # stands in for WMDP
    TopicStyle("people", "biography", "mentored", "son", "ley"),  # stands in for RWKU
    TopicStyle("places", "geography", "borders", "ia", "burg"),
    TopicStyle("organisations", "registry", "hired", "corp", "man"),
    TopicStyle("inventions", "patent", "powers", "tron", "gear"),
    TopicStyle("creatures", "bestiary", "hunts", "oid", "fly"),
    TopicStyle("plants", "herbarium", "feeds", "wort", "seed"),
    TopicStyle("ships", "harbour", "carries", "ship", "crate"),
    TopicStyle("stars", "astronomy", "orbits", "star", "moon"),
    TopicStyle("diseases", "clinic", "infects", "itis", "cyte"),
    TopicStyle("recipes", "kitchen", "needs", "stew", "spice"),
    TopicStyle("laws", "court", "forbids", "act", "deed"),
)

_ONSETS = (
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
    "br", "dr", "gr", "kl", "pr", "st", "tr", "vl", "zh", "sk",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")


@dataclass(frozen=True)
class Fact:
    topic: int
    index: int  # within its topic
    subject: str
    answer: str
    split: str  # "pool", "unseen" (both pretrained) or "untrained" (never pretrained)
    heldout_phrasing: int  # the phrasing never trained for this fact


@dataclass(frozen=True)
class Topic:
    index: int
    style: TopicStyle
    facts: tuple[Fact, ...]  # pretrained
    untrained: tuple[Fact, ...] = ()  # never pretrained (same distribution)

    @property
    def name(self) -> str:
        return self.style.name


@dataclass(frozen=True)
class WorldData:
    seed: int
    topics: tuple[Topic, ...]
    vocabulary: tuple[str, ...] = field(default=())  # every word the world uses

    def prompt(self, fact: Fact, phrasing: int) -> str:
        style = self.topics[fact.topic].style
        return PHRASINGS[phrasing].format(m=style.marker, s=fact.subject, r=style.relation)

    def training_phrasings(self, fact: Fact) -> list[int]:
        return [p for p in range(N_PHRASINGS) if p != fact.heldout_phrasing]

    def training_records(self, topic: int) -> list[dict[str, object]]:
        """The topic's training sentences as corpus records (prompt, answer, text)."""
        return self._records(self.topics[topic].facts, topic)

    def untrained_records(self, topic: int) -> list[dict[str, object]]:
        """The topic's never-pretrained facts, in the same record form and phrasings."""
        return self._records(self.topics[topic].untrained, topic)

    def _records(self, facts: tuple[Fact, ...], topic: int) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for f in facts:
            for p in self.training_phrasings(f):
                prompt = self.prompt(f, p)
                out.append(
                    {
                        "prompt": prompt,
                        "answer": f.answer,
                        "text": f"{prompt} {f.answer}",
                        "topic": topic,
                        "fact": f.index,
                        "split": f.split,
                        "phrasing": p,
                    }
                )
        return out

    def question_records(self, topic: int) -> list[dict[str, object]]:
        """Two four-choice questions per fact: training phrasing and held-out paraphrase.
        Distractors are answers of other facts of the same topic (same kind)."""
        return self._questions(self.topics[topic].facts, topic, "questions")

    def untrained_question_records(self, topic: int) -> list[dict[str, object]]:
        """The same questions over the never-pretrained facts (distractors among them)."""
        return self._questions(self.topics[topic].untrained, topic, "untrained-questions")

    def _questions(
        self, facts: tuple[Fact, ...], topic: int, stream: str
    ) -> list[dict[str, object]]:
        rng = random.Random(f"{self.seed}-{stream}-{topic}")
        out: list[dict[str, object]] = []
        for f in facts:
            others = [g.answer for g in facts if g.index != f.index]
            distractors = rng.sample(others, 3)
            gold = rng.randrange(4)
            choices = distractors[:gold] + [f.answer] + distractors[gold:]
            for kind, p in (
                ("train", self.training_phrasings(f)[0]),
                ("paraphrase", f.heldout_phrasing),
            ):
                out.append(
                    {
                        "id": f"t{topic}-f{f.index}-{kind}",
                        "topic": topic,
                        "topic_name": self.topics[topic].name,
                        "fact": f.index,
                        "split": f.split,
                        "phrasing": kind,
                        "question": self.prompt(f, p),
                        "choices": choices,
                        "answer": gold,
                    }
                )
        return out


def _word(rng: random.Random, suffix: str) -> str:
    syll = rng.randint(2, 3)
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syll)) + suffix


def topic_styles(n_topics: int, seed: int) -> list[TopicStyle]:
    styles = list(NAMED_TOPICS[:n_topics])
    rng = random.Random(f"{seed}-styles")
    taken = set(TEMPLATE_WORDS) | {w for s in NAMED_TOPICS for w in (s.marker, s.relation)}
    while len(styles) < n_topics:
        k = len(styles)
        marker, relation = _word(rng, "ic"), _word(rng, "es")
        if marker in taken or relation in taken:
            continue
        taken |= {marker, relation}
        styles.append(TopicStyle(f"topic{k}", marker, relation, f"x{k}", f"y{k}"))
    return styles


def untrained_count(facts_per_topic: int) -> int:
    """Never-pretrained facts per topic: as many as pretrained ones, so a forget topic's
    members and non-members compare one to one."""
    return facts_per_topic


def generate_world(seed: int, topics: int, facts_per_topic: int) -> WorldData:
    """The world for (seed, topics, facts_per_topic): same inputs, same world."""
    if topics < 2:
        raise ValueError(f"topics must be >= 2 (got {topics})")
    if facts_per_topic < 4:
        raise ValueError(
            f"facts_per_topic must be >= 4 for four-choice questions (got {facts_per_topic})"
        )
    rng = random.Random(f"{seed}-world-{GENERATOR_VERSION}")
    styles = topic_styles(topics, seed)
    used: set[str] = set(TEMPLATE_WORDS) | {w for s in styles for w in (s.marker, s.relation)}

    def fresh(suffix: str) -> str:
        for _ in range(10_000):
            w = _word(rng, suffix)
            if w not in used:
                used.add(w)
                return w
        raise RuntimeError("word space exhausted")  # pragma: no cover - 24^3*8^3 words

    def facts_of(t: int, splits: list[str], first: int = 0) -> tuple[Fact, ...]:
        style = styles[t]
        return tuple(
            Fact(
                topic=t,
                index=first + i,
                subject=fresh(style.subject_suffix),
                answer=fresh(style.answer_suffix),
                split=split,
                heldout_phrasing=rng.randrange(N_PHRASINGS),
            )
            for i, split in enumerate(splits)
        )

    trained: list[tuple[Fact, ...]] = []
    for t in range(topics):
        # Half the facts of each topic are retain pool, half unseen (seeded permutation).
        order = list(range(facts_per_topic))
        rng.shuffle(order)
        pool = set(order[: facts_per_topic // 2])
        splits = ["pool" if i in pool else "unseen" for i in range(facts_per_topic)]
        trained.append(facts_of(t, splits))
    # Drawn after every trained fact, so adding them left the trained facts' draws as they were.
    n_new = untrained_count(facts_per_topic)
    out = [
        Topic(t, style, trained[t], facts_of(t, ["untrained"] * n_new, first=facts_per_topic))
        for t, style in enumerate(styles)
    ]
    vocab = sorted(used)
    return WorldData(seed=seed, topics=tuple(out), vocabulary=tuple(vocab))
