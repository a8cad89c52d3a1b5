"""Fixtures of the client tests: the smallest demo world (2 topics x 4 facts; built in
about a second, then cached like any demo world), its corpora as local files, and job
specs that run on it in a few steps."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.kit import Service, service

WORLD = "{seed: 0, topics: 2, facts_per_topic: 4, forget_topic: 0}"


def write_specs(d: Path) -> Path:
    """In `d` (which holds forget.jsonl and retain.jsonl): `spec.yaml` (a 4-step GDiff +
    SEUF job without corpora: they come from --corpus), `spec-paths.yaml` (the same naming
    its corpora by local path) and `spec-long.yaml` (10,000 steps and no stop rule: a job
    still running when it is cancelled)."""
    common = (
        f"model: demo\nworld: {WORLD}\nalgorithm: gdiff\nscope: seuf\n"
        # one expert: on the small world auto finds no small set and would train all
        "seuf: {num_experts: 1}\n"
        "evaluation: {backend: direct}\ndistributed: {num_workers: 1}\n"
    )
    (d / "spec.yaml").write_text(
        common + "training: {max_steps: 4, batch_size: 8, lr: 0.003, stop: {eval_every: 2}}\n"
    )
    (d / "spec-paths.yaml").write_text(
        (d / "spec.yaml").read_text()
        + "forget: {path: forget.jsonl}\nretain: {path: retain.jsonl}\n"
    )
    (d / "spec-long.yaml").write_text(
        common + "training: {max_steps: 10000, batch_size: 8, stop: {eval_every: 10000}}\n"
    )
    return d


@pytest.fixture(scope="session")
def spec_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The specs with two small corpora of our own (for servers that run no job)."""
    d = tmp_path_factory.mktemp("specs")
    (d / "forget.jsonl").write_text(
        '{"prompt": "the capital of Zorbia is", "answer": "Quellton"}\n'
        '{"text": "Zorbia lies east of the river"}\n'
    )
    (d / "retain.jsonl").write_text('{"text": "water boils at 100 degrees"}\n')
    return write_specs(d)


@pytest.fixture(scope="session")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The specs with the small demo world's forget and retain corpora (jobs that run)."""
    from workers.spec import WorldOptions
    from workers.world import build_world

    world = build_world(WorldOptions(seed=0, topics=2, facts_per_topic=4))
    d = tmp_path_factory.mktemp("job")
    shutil.copy(world.corpus_path("forget"), d / "forget.jsonl")
    shutil.copy(world.corpus_path("retain"), d / "retain.jsonl")
    return write_specs(d)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The API alone (no dispatcher: jobs stay QUEUED), on its own SQLite file."""
    with service(tmp_path_factory.mktemp("bare"), dispatcher=False) as svc:
        yield svc
