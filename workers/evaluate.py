"""Evaluation: the demo world's question sets through lm-eval, real lm-eval tasks by name,
and a fast direct scorer for stop-rule checks during training.

- `evaluate_world` writes the world's questions as an lm-eval `multiple_choice` task
  (YAML + JSONL in a temporary task directory) and scores them with
  `lm_eval.simple_evaluate` on the in-memory model wrapped by `HFLM`, offline; the
  per-question `acc` that lm-eval logs is then grouped into forget / utility / unseen /
  paraphrase / per-topic accuracies.
- `evaluate_tasks` runs real lm-eval tasks (mmlu, wmdp_bio...) through the same code path
  when their datasets are available locally; a missing dataset is a clear ValueError.
- `score_questions` is the direct scorer: the same log-likelihood comparison lm-eval's
  `acc` makes (context and continuation tokenised as lm-eval does: the whole string then
  split), batched, with no lm-eval overhead. tests/world checks the two agree exactly.

lm_eval is imported lazily: importing it costs seconds and the training loop only needs
the direct scorer.
"""

from __future__ import annotations

import functools
import json
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from workers.world import World

Question = dict[str, Any]  # {"question": str, "choices": [str, ...], "answer": int, ...}
Backend = Literal["lm-eval", "direct"]


# --- direct scorer --------------------------------------------------------------------
def _encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    # lm-eval's rule (TemplateLM._encode_pair): encode the whole string and split at the
    # context's length, trailing context spaces moved to the continuation.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 64,
    target_delimiter: str = " ",
) -> list[list[float]]:
    """Summed log-probability of every choice of every question (lm-eval's loglikelihood).

    Requests whose model input is identical (every single-token choice of one question:
    input = context + continuation minus its last token) share one forward pass."""
    if not questions:
        return []
    reqs: list[tuple[tuple[int, ...], list[int]]] = []  # (model input, continuation)
    for q in questions:
        for choice in q["choices"]:
            ctx, cont = _encode_pair(tokenizer, str(q["question"]), target_delimiter + choice)
            if not cont:
                raise ValueError(f"choice {choice!r} of question {q.get('id')} has no tokens")
            reqs.append((tuple((ctx + cont)[:-1]), cont))
    inputs = sorted({r[0] for r in reqs}, key=len)
    slot = {inp: i for i, inp in enumerate(inputs)}
    logps: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(inputs), batch_size):
                chunk = inputs[b : b + batch_size]
                width = max(len(x) for x in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, x in enumerate(chunk):  # right padding, as lm-eval's HFLM
                    ids[i, : len(x)] = torch.tensor(x)
                    mask[i, : len(x)] = 1
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
                lp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
                for i, x in enumerate(chunk):
                    logps[b + i] = lp[i, : len(x)]
    finally:
        model.train(was_training)
    scores: list[float] = []
    for inp, cont in reqs:
        lp = logps[slot[inp]]
        pos = torch.arange(len(inp) - len(cont) + 1, len(inp) + 1) - 1
        scores.append(float(lp[pos, torch.tensor(cont)].sum()))
    out_scores: list[list[float]] = []
    k = 0
    for q in questions:
        n = len(q["choices"])
        out_scores.append(scores[k : k + n])
        k += n
    return out_scores


def score_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 64,
) -> list[bool]:
    """Per question: is the gold choice the most likely one (lm-eval's `acc`)?"""
    scores = choice_logprobs(model, tokenizer, questions, batch_size)
    # lm-eval takes np.argmax of the log-likelihoods: first maximum wins ties.
    return [
        max(range(len(s)), key=lambda i, s=s: (s[i], -i)) == int(q["answer"])
        for q, s in zip(questions, scores, strict=True)
    ]


def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 64,
) -> float:
    """Direct-scorer accuracy (for stop rules during training)."""
    if not questions:
        raise ValueError("no questions to score")
    hits = score_questions(model, tokenizer, questions, batch_size)
    return sum(hits) / len(hits)


# --- lm-eval glue ---------------------------------------------------------------------
def write_lm_eval_task(questions: Sequence[Question], task_dir: Path, task_name: str) -> Path:
    """Write `questions` as an lm-eval multiple_choice task (YAML + JSONL) in task_dir."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{task_name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            row = {
                "qid": i,
                "question": str(q["question"]),
                "choices": list(q["choices"]),
                "answer": int(q["answer"]),
            }
            f.write(json.dumps(row) + "\n")
    yaml_text = "\n".join(
        [
            f"task: {task_name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: question",
            "doc_to_choice: choices",
            "doc_to_target: answer",
            'target_delimiter: " "',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )
    path = task_dir / f"{task_name}.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def _default_task_manager() -> Any:
    # Indexing lm-eval's bundled task YAMLs takes tens of seconds: do it once per process.
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _hflm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _answers_elsewhere() -> bool:
    """lm-eval builds its results only where LOCAL_RANK is 0 (its rule for tensor-parallel
    launchers). Under ZeRO-3 every rank of a job runs the same evaluation in lockstep
    (workers.runners.base.Runner.lockstep): the forwards run everywhere, and a rank other
    than the job's rank 0 gets no results, which it does not need (rank 0 reports). The
    environment is left alone: DeepSpeed reads LOCAL_RANK for its device in a forward."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def lm_eval_question_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    batch_size: int = 64,
) -> tuple[list[bool], float] | None:
    """Score questions with lm_eval.simple_evaluate; returns (per-question acc in input
    order, lm-eval's aggregated acc), or None on a rank lm-eval gives no results
    (`_answers_elsewhere`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not questions:
        raise ValueError("no questions to score")
    name = f"moeu_world_{uuid.uuid4().hex[:12]}"
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="moeu-lmeval-") as tmp:
        write_lm_eval_task(questions, Path(tmp), name)
        tm = TaskManager(include_path=tmp, include_defaults=False)
        try:
            res = simple_evaluate(
                model=_hflm(model, tokenizer, batch_size),
                tasks=[name],
                task_manager=tm,
                log_samples=True,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
        finally:
            model.train(was_training)
    if res is None:
        if _answers_elsewhere():
            return None
        raise RuntimeError("lm-eval returned no results")
    hits: list[bool | None] = [None] * len(questions)
    for s in res["samples"][name]:
        hits[int(s["doc"]["qid"])] = bool(s["acc"])
    if any(h is None for h in hits):
        raise RuntimeError("lm-eval did not score every question")
    return [bool(h) for h in hits], float(res["results"][name]["acc,none"])


def _group(
    questions: Sequence[Question], hits: Sequence[bool], forget: int, uncovered: Sequence[int]
) -> dict[str, Any]:
    def acc(pred: Any) -> float | None:
        sel = [h for q, h in zip(questions, hits, strict=True) if pred(q)]
        return sum(sel) / len(sel) if sel else None

    def f(kind: str, split: str | None, forget_side: bool) -> float | None:
        return acc(
            lambda q: (
                (q["topic"] == forget) == forget_side
                and q["phrasing"] == kind
                and (split is None or q["split"] == split)
            )
        )

    per_topic: dict[str, dict[str, float | None]] = {}
    for t in sorted({int(q["topic"]) for q in questions}):
        name = next(str(q["topic_name"]) for q in questions if q["topic"] == t)
        per_topic[name] = {
            "accuracy": acc(lambda q, t=t: q["topic"] == t and q["phrasing"] == "train"),
            "paraphrase_accuracy": acc(
                lambda q, t=t: q["topic"] == t and q["phrasing"] == "paraphrase"
            ),
        }
    out: dict[str, Any] = {
        "forget_accuracy": f("train", None, True),
        "forget_paraphrase_accuracy": f("paraphrase", None, True),
        "utility_accuracy": f("train", "pool", False),
        "utility_paraphrase_accuracy": f("paraphrase", "pool", False),
        "utility_accuracy_unseen": f("train", "unseen", False),
        "utility_unseen_paraphrase_accuracy": f("paraphrase", "unseen", False),
        "per_topic": per_topic,
        "num_questions": len(questions),
    }
    if uncovered:  # absent when the retain corpus covers every other topic
        topics = set(uncovered)
        out["utility_accuracy_uncovered_topics"] = acc(
            lambda q: q["topic"] in topics and q["phrasing"] == "train"
        )
    return out


def evaluate_world(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    world: World,
    batch_size: int = 64,
    forget_topic: int | None = None,
    backend: Backend = "lm-eval",
) -> dict[str, Any]:
    """Accuracies of `model` on the demo world's questions.

    forget_accuracy: the forget topic (all its facts; chance 0.25, lower is better);
    utility_accuracy: retain-pool facts of the other topics (what unlearning may rehearse);
    utility_accuracy_unseen: the other topics' facts unlearning never sees; *_paraphrase_*:
    the same sets asked in each fact's held-out phrasing; per_topic: by topic name;
    utility_accuracy_uncovered_topics (only when world.retain_topics leaves topics out of
    the retain corpus): every fact (pool and unseen) of those topics, training phrasing.
    backend "lm-eval" (default) scores through lm_eval.simple_evaluate, "direct" through
    `score_questions` (same numbers, no lm-eval overhead)."""
    ft = world.forget_topic if forget_topic is None else forget_topic
    if not 0 <= ft < world.num_topics:
        raise ValueError(f"forget_topic {ft} out of range: the world has {world.num_topics} topics")
    questions = world.questions()
    if backend == "lm-eval":
        scored = lm_eval_question_accuracy(model, tokenizer, questions, batch_size)
        if scored is None:
            return {}  # a lockstep rank: rank 0 has the scores
        hits = scored[0]
    elif backend == "direct":
        hits = score_questions(model, tokenizer, questions, batch_size)
    else:
        raise ValueError(f"backend must be 'lm-eval' or 'direct' (got {backend!r})")
    out = _group(questions, hits, ft, world.uncovered_topics(ft))
    out["forget_topic"] = ft
    out["forget_topic_name"] = world.topic_names[ft]
    out["backend"] = backend
    return out


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task_names: Sequence[str],
    limit: int | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Accuracy on real lm-eval tasks by name (e.g. mmlu, wmdp_bio), same code path as the
    world questions ({} on a rank lm-eval gives no results: `_answers_elsewhere`). Needs the
    datasets locally (HF cache; nothing downloads here): an unknown task or a dataset that
    cannot be loaded raises ValueError naming it."""
    from lm_eval import simple_evaluate

    if not task_names:
        return {}
    tm = _default_task_manager()
    unknown = [t for t in task_names if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    was_training = model.training
    try:
        res = simple_evaluate(
            model=_hflm(model, tokenizer, batch_size),
            tasks=list(task_names),
            task_manager=tm,
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    except Exception as e:  # dataset loading errors come in many types (offline, missing)
        raise ValueError(
            f"lm-eval tasks {', '.join(task_names)} could not be evaluated (dataset not "
            f"available offline?): {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    if res is None:
        if _answers_elsewhere():
            return {}  # a lockstep rank: rank 0 has the scores
        raise RuntimeError("lm-eval returned no results")
    out: dict[str, float] = {}
    for name, metrics in res["results"].items():
        val = metrics.get("acc,none")
        if isinstance(val, int | float):
            out[name] = float(val)
    return out
