"""The world generator and tokenizer: determinism, unique answers, held-out paraphrases."""

from __future__ import annotations

from transformers import AutoTokenizer

from workers.world.generate import N_PHRASINGS, PHRASINGS, generate_world
from workers.world.tokenizer import build_tokenizer


def test_generator_is_deterministic_per_seed():
    a, b = generate_world(3, 6, 20), generate_world(3, 6, 20)
    assert a == b
    assert [a.training_records(t) for t in range(6)] == [b.training_records(t) for t in range(6)]
    assert [a.question_records(t) for t in range(6)] == [b.question_records(t) for t in range(6)]
    c = generate_world(4, 6, 20)
    assert [f.answer for f in c.topics[0].facts] != [f.answer for f in a.topics[0].facts]


def test_answers_and_subjects_unique_and_answer_follows_subject():
    w = generate_world(0, 8, 60)  # beyond the 6 default topics
    answers = [f.answer for t in w.topics for f in t.facts]
    subjects = [f.subject for t in w.topics for f in t.facts]
    assert len(set(answers)) == len(answers) == 8 * 60
    assert len(set(subjects)) == len(subjects)
    assert not set(answers) & set(subjects)
    for t in w.topics:
        rel = t.style.relation
        for r in w.training_records(t.index):
            words = str(r["text"]).split()
            fact = t.facts[int(r["fact"])]
            # ... <subject> <relation> <answer>: the answer is two tokens after its subject
            assert words[-3:] == [fact.subject, rel, fact.answer]
            assert r["text"] == f"{r['prompt']} {r['answer']}"
            assert t.style.marker in words  # topic marker word in every sentence


def test_scales_to_many_topics_and_facts():
    w = generate_world(1, 32, 300)
    answers = {f.answer for t in w.topics for f in t.facts}
    assert len(answers) == 32 * 300
    assert len({t.style.relation for t in w.topics}) == 32
    assert len({t.style.marker for t in w.topics}) == 32


def test_questions_distractors_same_topic_and_paraphrase_held_out():
    w = generate_world(0, 6, 12)
    for t in w.topics:
        topic_answers = {f.answer for f in t.facts}
        trained = {(r["fact"], r["prompt"]) for r in w.training_records(t.index)}
        qs = w.question_records(t.index)
        assert len(qs) == 2 * len(t.facts)
        for q in qs:
            fact = t.facts[int(q["fact"])]
            assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert set(q["choices"]) <= topic_answers
            assert q["choices"][q["answer"]] == fact.answer
            if q["phrasing"] == "train":
                assert (q["fact"], q["question"]) in trained
            else:  # the held-out phrasing never appears in training for this fact
                assert (q["fact"], q["question"]) not in trained
                assert q["question"] == w.prompt(fact, fact.heldout_phrasing)
        # every phrasing is trained on for some facts (the paraphrase tests transfer)
        used = {int(r["phrasing"]) for r in w.training_records(t.index)}
        assert used == set(range(N_PHRASINGS))
        splits = [f.split for f in t.facts]
        assert splits.count("pool") == splits.count("unseen") == 6


def test_tokenizer_round_trip_via_autotokenizer(tmp_path):
    w = generate_world(0, 6, 12)
    build_tokenizer(w.vocabulary).save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(w.vocabulary)
    for t in range(6):
        for r in w.training_records(t):
            ids = tok(str(r["text"]))["input_ids"]
            assert tok.unk_token_id not in ids
            assert len(ids) == len(str(r["text"]).split())  # one token per word, no BOS added
            assert tok.decode(ids) == r["text"]
    for f in w.topics[0].facts:
        assert len(tok(" " + f.answer, add_special_tokens=False)["input_ids"]) == 1
    assert tok("zzz-not-a-word")["input_ids"] == [tok.unk_token_id]
    assert len(PHRASINGS) == N_PHRASINGS


def test_untrained_facts_are_never_in_training_and_drawn_like_the_others():
    w = generate_world(0, 6, 12)
    trained_words = {x for t in range(6) for r in w.training_records(t) for x in r["text"].split()}
    for t in w.topics:
        assert len(t.untrained) == len(t.facts) and {f.split for f in t.untrained} == {"untrained"}
        # fact ids continue after the trained ones: (topic, fact) names one fact
        assert [f.index for f in t.untrained] == list(range(12, 24))
        for f in t.untrained:
            assert f.subject not in trained_words and f.answer not in trained_words
            assert {f.subject, f.answer} <= set(w.vocabulary)  # the tokenizer knows them
            # the same kind of word as the topic's trained facts (suffix of its style)
            assert f.subject.endswith(t.style.subject_suffix)
            assert f.answer.endswith(t.style.answer_suffix)
        rows = w.untrained_records(t.index)
        assert len(rows) == 12 * (N_PHRASINGS - 1)
        assert {r["split"] for r in rows} == {"untrained"}
        assert all(r["prompt"].split()[-1] == t.style.relation for r in rows)
        qs = w.untrained_question_records(t.index)
        answers = {f.answer for f in t.untrained}
        assert len(qs) == 2 * 12 and all(set(q["choices"]) <= answers for q in qs)
        assert all(q["choices"][q["answer"]] == t.untrained[q["fact"] - 12].answer for q in qs)
