"""Jobs with several workers through the whole product: a request over real HTTP, the
dispatcher, a Ray Train TorchTrainer with 2 CPU workers (gloo) on the session's real local
Ray, and SQLite or PostgreSQL. Also the ways such a job is interrupted: a training worker
killed mid-run (the next attempt resumes from the checkpoint) and the dispatcher process
itself killed (a new dispatcher recovers the job once its lease expires). Workers killed
from outside and a dispatcher stopped by SIGTERM: test_interruptions.py; a cancel:
test_dispatcher.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import create_app
from api.client import Client
from service import keys
from service.db import session_scope
from service.dispatcher import checkpoint_root
from service.settings import Settings
from tests.api.conftest import serve_in_thread
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, Db, corpus_bytes
from tests.dispatch.kit import (
    Dispatching,
    actions,
    audit_ok,
    dispatcher_process,
    events,
    free_cpus,
    http_spec,
    job_row,
    make_settings,
    submit,
    wait_for,
)
from workers.patch import read_patch

pytestmark = pytest.mark.slow

TWO_WORKERS = {"num_workers": 2, "backend": "ddp", "checkpoint_every": 2}


@pytest.fixture
def served(db: Db, tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    """The API app on the test's database, served by uvicorn on a loopback port."""
    settings = make_settings(db, tmp_path)
    app = create_app(settings)
    try:
        with serve_in_thread(app) as url:
            yield settings, url
    finally:
        app.state.engine.dispose()


def test_http_request_runs_on_ray_train_with_two_workers(
    db, served, tmp_path, ray_cluster, tiny_model_dir
):
    settings, url = served
    with session_scope(db.factory) as s:
        requester = keys.create_key(s, "requester", "acme", actor="test")[1]
        auditor = keys.create_key(s, "auditor", "acme", actor="test")[1]
    steps = 6
    with Client(url, api_key=requester) as c:
        forget = c.upload_corpus(corpus_bytes(FORGET_SUBJECTS, 12))["id"]
        retain = c.upload_corpus(corpus_bytes(RETAIN_SUBJECTS, 12))["id"]
        job = c.submit(
            http_spec(tiny_model_dir, forget, retain, steps, **TWO_WORKERS),
            idempotency_key="ray-train-1",
        )
        assert job["state"] == "QUEUED"
        with Dispatching(settings, max_jobs=1) as d:
            final = c.wait(job["id"], timeout=300, interval=0.5)
            stats = d.join(60)
        assert stats.finished == {"SUCCEEDED": 1}
        assert (final["state"], final["attempt"], final["failure_class"]) == (
            "SUCCEEDED", 1, None,
        )  # fmt: skip

        evs = c.events(job["id"])["items"]
        (started,) = [e for e in evs if e["kind"] == "attempt_started"]
        assert started["payload"]["runner"] == "ray_train"
        assert started["payload"]["num_workers"] == 2
        assert [e["step"] for e in evs if e["kind"] == "step"] == list(range(1, steps + 1))
        (result,) = [e for e in evs if e["kind"] == "result"]
        assert result["payload"]["steps"] == steps

        emap = c.expert_map(job["id"])["items"]
        assert len(emap) == 3 * 8  # 3 MoE layers x 8 routed experts, sharded then reduced
        assert [x["rank"] for x in emap if x["selected"]] == [1]
        (chosen,) = [(x["layer"], x["expert"]) for x in emap if x["selected"]]
        evals = {(e["phase"], e["task"], e["metric"]): e["value"]
                 for e in c.evaluations(job["id"])["items"]}  # fmt: skip
        assert evals[("after", "forget", "nll")] > evals[("before", "forget", "nll")]
        assert ("after", "forget", "routing_overlap") in evals

        # The patch holds exactly the selected expert's slices, downloaded over HTTP.
        arts = {a["kind"]: a for a in c.artifacts(job["id"])}
        assert {"expert_patch", "expert_map", "result", "model"} <= set(arts)
        patch = c.download(job["id"], arts["expert_patch"]["id"], tmp_path / "patch.st")
        layer, expert = chosen
        meta, _ = read_patch(patch)
        prefix = f"model.layers.{layer}.mlp."
        assert sorted((r.name, r.expert) for r in meta.regions) == [
            (prefix + "experts.down_proj", expert),
            (prefix + "experts.gate_up_proj", expert),
            (prefix + "gate.weight", None),
        ]
        cert = c.certificate(job["id"])
        assert cert["experts"]["selected"][0]["layer"] == layer
        assert cert["experts"]["selected"][0]["expert"] == expert
        assert {p["slice"] for p in cert["parameters_changed"] if "experts" in p["name"]} == {
            f"[{expert}]"
        }
    with Client(url, api_key=auditor) as a:
        assert a.audit_verify()["ok"] is True
    assert not (checkpoint_root(settings) / job["id"]).exists()  # dropped when it ended
    wait_for(lambda: free_cpus() == 2.0, 30, "the CPUs to be free")


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_killed_dispatcher_process_job_is_recovered_by_a_new_one(db, tmp_path, tiny_model_dir):
    """SIGKILL of the dispatcher process mid-training (its Ray goes with it): its lease
    expires, a second dispatcher process reclaims the job, and attempt 2 resumes from the
    checkpoint the first one left."""
    # The lease must expire for the second dispatcher to take over: short, but 20
    # heartbeats (0.5 s) long, so a loaded machine does not lose it while the first runs.
    settings = make_settings(db, tmp_path, lease_seconds=10)
    # Long enough (a checkpoint every 2 steps) that the first dispatcher is still mid-run
    # when the test kills it.
    job_id = submit(db, settings, tiny_model_dir, max_steps=200, distributed=TWO_WORKERS)
    first = dispatcher_process(settings)
    try:
        wait_for(
            lambda: any(e.kind == "step" and e.step >= 6 for e in events(db, job_id)),
            300,
            "training steps under the first dispatcher",
        )
        assert job_row(db, job_id).state == "RUNNING"
        os.killpg(first.pid, signal.SIGKILL)  # the dispatcher and every process it started
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = max(e.step for e in events(db, job_id) if e.kind == "step")
    second = dispatcher_process(settings, "--max-jobs", "1")
    try:
        assert second.wait(timeout=600) == 0
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    job = job_row(db, job_id)
    assert (job.state, job.attempt) == ("SUCCEEDED", 2)
    acts = actions(db, job_id)
    assert acts.count("job_claimed") == 2 and "lease_expired" in acts
    evs = events(db, job_id)
    # Attempt 1's recorded steps are a prefix of what it did: the progress it sent after
    # the dispatcher's last write died with the dispatcher, while its checkpoints (written by
    # the workers) are on disk, so attempt 2 may resume past the last recorded step.
    assert [e.step for e in evs if e.kind == "step" and e.attempt == 1] == list(
        range(1, killed_at + 1)
    )
    (resumed,) = [e for e in evs if e.kind == "resumed"]
    assert resumed.attempt == 2 and 2 <= resumed.payload["from_step"] < 200
    assert resumed.payload["from_step"] % TWO_WORKERS["checkpoint_every"] == 0
    steps2 = [e.step for e in evs if e.kind == "step" and e.attempt == 2]
    assert steps2 == list(range(resumed.payload["from_step"] + 1, 201))
    audit_ok(db)
