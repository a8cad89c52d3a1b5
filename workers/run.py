"""One unlearning job, start to finish, in one process (library mode, no server): the one
pipeline (workers/pipeline.py) with the one-process runner.

`run_job(spec, output_dir)` is what `moe-unlearn run` calls; the service's attempt task
calls it too (Ray Train jobs: workers.runners.ray_train.run_job_distributed, which returns
the same JobResult). Progress goes to a `Reporter` (stages and per-step events), never to
stdout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workers.devices import out_of_memory_with_plan
from workers.job import CorpusResolver, JobCancelled, Reporter, SilentReporter
from workers.pipeline import STAGES, run_pipeline
from workers.results import JobResult
from workers.runners.base import LocalRunner
from workers.spec import JobSpec


def run_job(
    spec: JobSpec,
    output_dir: str | Path,
    reporter: Reporter | None = None,
    corpus_resolver: CorpusResolver | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> JobResult:
    """Run one unlearning job and write its outputs to `output_dir` (result.json holds the
    returned JobResult). `should_stop()` is polled every step and at every stage boundary
    (JobCancelled). User errors raise ValueError."""
    with out_of_memory_with_plan(spec):  # reported with the planner's numbers
        res = run_pipeline(spec, output_dir, LocalRunner(), reporter, corpus_resolver, should_stop)
    assert res is not None  # one process: always rank 0
    return res


__all__ = ["STAGES", "JobCancelled", "JobResult", "Reporter", "SilentReporter", "run_job"]
