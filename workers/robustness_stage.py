"""The robustness stage of the one pipeline (rank 0, after the "after" evaluation): picks
the batches the checks of `workers.robustness` read and runs the spec's
`evaluation.robustness` list on the baked, unlearned model.

Batches: the forget records, tokenized on their answers when every record has one. When
the corpus is large enough, the first and the last `max_batches x batch_size` records:
the relearning attack trains on the first block and is measured on the last, and the demo
world's corpora list a fact's phrasings together, so the two blocks share no fact.

Never-trained records (membership inference): the check's `holdout` corpus when the job
names one; for the demo world, by default, the forget topic's never-pretrained facts
(`demo: untrained`). A holdout that cannot be read makes that check `not_run` with the
reason: a check never fails the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from workers.data import read_corpus
from workers.job import CorpusResolver, LoadedJob, corpus_path
from workers.robustness import CheckResult, ParamKey, param_name, run_robustness_checks
from workers.spec import CorpusRef, JobSpec, MembershipCheck


def _tokens(records: list) -> str:
    return "answer" if records and all(r.has_answer for r in records) else "all"


def forget_batches(job: LoadedJob, per_block: int) -> list[dict]:
    """The forget records in a fixed order, each in one batch: two blocks of `per_block`
    batches (first and last records) when there are enough records, else all of them."""
    records, bs = job.forget_records, job.spec.training.batch_size
    mode, m = _tokens(records), per_block * bs
    if len(records) >= 2 * m:
        first = job.tokenized(records[:m], mode).in_order(bs)
        return first + job.tokenized(records[-m:], mode).in_order(bs)
    return job.tokenized(records, mode).in_order(bs)


def holdout_batches(
    job: LoadedJob, check: MembershipCheck, resolver: CorpusResolver | None, n: int
) -> tuple[list[dict] | None, str | None]:
    """(never-trained batches, None) or (None, why there are none)."""
    ref = check.holdout
    if ref is None:
        if job.world is None:
            return None, None  # the check's own reason: no holdout corpus was given
        ref = CorpusRef(demo="untrained")
    try:
        records = read_corpus(corpus_path(ref, job.world, resolver), ref.format,
                              ref.text_field, ref.max_records)
    except (ValueError, OSError) as e:
        where = "the demo world's never-pretrained split" if check.holdout is None else "holdout"
        return None, f"{where} could not be read: {str(e)[:300]}"
    if not records:
        return None, "the holdout corpus has no records"
    mode = _tokens(job.forget_records)
    if mode == "answer" and not all(r.has_answer for r in records):
        mode = "all"  # members and non-members must be scored on the same kind of tokens
    bs = job.spec.training.batch_size
    return job.tokenized(records, mode).in_order(bs)[:n], None


PARTITIONED_REASON = (
    "the model trained partitioned (ZeRO-3) and was kept partitioned (output.model patch): "
    "no rank holds a whole copy to attack; run the checks on the patched model with "
    "enough memory for one copy"
)


def not_run_rows(spec: JobSpec, reason: str) -> list[dict[str, Any]]:
    """Each of the spec's checks, `not_run` with `reason`."""
    return [CheckResult(c.check, "not_run", "", {}, reason).to_json()
            for c in spec.evaluation.robustness]  # fmt: skip


def robustness_stage(
    job: LoadedJob,
    original: Mapping[ParamKey, torch.Tensor],
    scope: str,
    selected: Sequence[tuple[int, int]],
    resolver: CorpusResolver | None = None,
) -> list[dict[str, Any]]:
    """Run the spec's checks on `job.model` (baked, unlearned; left bitwise as it is);
    returns their results as JSON rows (`CheckResult.to_json`). `original`: the changed
    parameters before unlearning."""
    checks = job.spec.evaluation.robustness
    if not checks:
        return []
    model = job.model
    params = {n for n, _ in model.named_parameters()}
    # Region snapshots (name, expert) as workers.job.snapshot_regions takes them; tied
    # copies (a name that is not a parameter) are left out.
    original = {k: v for k, v in original.items() if param_name(k) in params}
    batches = forget_batches(job, max(c.max_batches for c in checks))
    holdout, why = None, None
    membership = next((c for c in checks if isinstance(c, MembershipCheck)), None)
    if membership is not None:
        holdout, why = holdout_batches(job, membership, resolver, membership.max_batches)
    results = run_robustness_checks(
        model, job.adapter, checks, original=original, scope=scope, selected=selected,
        forget_batches=batches, holdout_batches=holdout,
    )
    out: list[CheckResult] = []
    for r in results:
        if r.check == "membership_inference" and r.verdict == "not_run" and why:
            r = replace(r, reason=why)
        out.append(r)
    return [r.to_json() for r in out]


__all__ = [
    "PARTITIONED_REASON",
    "forget_batches",
    "holdout_batches",
    "not_run_rows",
    "robustness_stage",
]
