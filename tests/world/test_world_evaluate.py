"""lm-eval glue and the direct scorer agree; grouping into forget / utility sets is right."""

from __future__ import annotations

import pytest
import torch

from workers.evaluate import (
    choice_logprobs,
    evaluate_tasks,
    evaluate_world,
    lm_eval_question_accuracy,
    score_questions,
)
from workers.world import load_world_dir


@pytest.fixture(scope="module")
def damaged(small_model):
    """The small model with noise on its LM head: some questions right, some wrong, so an
    agreement test cannot pass by everything being 1.0."""
    import copy

    m = copy.deepcopy(small_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = m.get_output_embeddings().weight
        w.add_(torch.randn(w.shape, generator=g) * w.std() * 1.2)
    return m.eval()


@pytest.mark.slow  # lm-eval's import and task set-up: 10-45 s on a loaded 2-core box
def test_lm_eval_acc_equals_direct_scorer(small_world, damaged, small_tokenizer):
    qs = small_world.questions()
    direct = score_questions(damaged, small_tokenizer, qs, batch_size=16)
    assert 0.3 < sum(direct) / len(direct) < 0.95  # a mix of right and wrong answers
    hits, agg = lm_eval_question_accuracy(damaged, small_tokenizer, qs, batch_size=16)
    assert hits == direct
    assert agg == pytest.approx(sum(direct) / len(direct))


def test_direct_scorer_is_the_loglikelihood_of_each_choice(
    small_world, small_model, small_tokenizer
):
    q = small_world.questions()[5]
    scores = choice_logprobs(small_model, small_tokenizer, [q])[0]
    ctx = small_tokenizer(q["question"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = small_model(input_ids=torch.tensor([ctx])).logits[0, -1]
    lp = torch.log_softmax(logits, -1)
    for choice, s in zip(q["choices"], scores, strict=True):
        tid = small_tokenizer.convert_tokens_to_ids(choice)
        assert s == pytest.approx(float(lp[tid]), abs=1e-5)


@pytest.mark.slow  # lm-eval, as above
def test_evaluate_world_groups_sets(small_world, small_model, damaged, small_tokenizer):
    good = evaluate_world(
        small_model, small_tokenizer, small_world, batch_size=32, backend="direct"
    )
    assert good["forget_accuracy"] >= 0.95 and good["utility_accuracy_unseen"] >= 0.95
    assert set(good["per_topic"]) == set(small_world.topic_names)
    lm = evaluate_world(damaged, small_tokenizer, small_world, batch_size=32, forget_topic=3)
    di = evaluate_world(
        damaged, small_tokenizer, small_world, batch_size=32, forget_topic=3, backend="direct"
    )
    assert lm["backend"] == "lm-eval"
    for k in (
        "forget_accuracy",
        "utility_accuracy",
        "utility_accuracy_unseen",
        "forget_paraphrase_accuracy",
        "utility_paraphrase_accuracy",
    ):
        assert lm[k] == di[k], k
    # forget topic 3's accuracy is that topic's per-topic accuracy
    assert lm["forget_accuracy"] == lm["per_topic"][small_world.topic_names[3]]["accuracy"]
    hits = score_questions(damaged, small_tokenizer, small_world.question_set("retain_unseen", 3))
    assert lm["utility_accuracy_unseen"] == pytest.approx(sum(hits) / len(hits))
    # world.retain_topics: covered 0, 1 (forget topic 3); uncovered 2, 4, 5, every fact of
    # them in the training phrasing, scored the same by both backends
    assert "utility_accuracy_uncovered_topics" not in lm  # all covered: absent, not 0
    narrow = load_world_dir(small_world.path, forget_topic=3, retain_topics=2)
    lm_n = evaluate_world(damaged, small_tokenizer, narrow, batch_size=32)
    di_n = evaluate_world(damaged, small_tokenizer, narrow, batch_size=32, backend="direct")
    uncovered = [q for q in small_world.questions()
                 if q["topic"] in (2, 4, 5) and q["phrasing"] == "train"]
    assert len(uncovered) == 3 * 50
    hits = score_questions(damaged, small_tokenizer, uncovered)
    assert 0.0 < sum(hits) < len(hits)
    assert lm_n["utility_accuracy_uncovered_topics"] == di_n["utility_accuracy_uncovered_topics"]
    assert lm_n["utility_accuracy_uncovered_topics"] == pytest.approx(sum(hits) / len(hits))
    assert {k: v for k, v in lm_n.items() if k not in ("utility_accuracy_uncovered_topics",
                                                       "backend")} == {
        k: v for k, v in lm.items() if k != "backend"}  # nothing else changes
    with pytest.raises(ValueError, match="forget_topic 9 out of range"):
        evaluate_world(small_model, small_tokenizer, small_world, forget_topic=9, backend="direct")


def test_evaluate_tasks_empty_list_needs_no_lm_eval(small_model, small_tokenizer):
    assert evaluate_tasks(small_model, small_tokenizer, []) == {}


@pytest.mark.slow  # indexing lm-eval's bundled tasks takes ~45 s on a loaded 2-core box
def test_evaluate_tasks_unknown_task_or_missing_dataset_is_clear(small_model, small_tokenizer):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_tasks(small_model, small_tokenizer, ["no_such_task_xyz"])
    # a real task whose dataset is not in the local HF cache (nothing downloads here)
    with pytest.raises(ValueError, match="wmdp_bio could not be evaluated"):
        evaluate_tasks(small_model, small_tokenizer, ["wmdp_bio"], limit=2)
