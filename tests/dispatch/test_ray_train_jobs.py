"""Jobs with several workers through the whole product: a request over real HTTP, the
dispatcher, a Ray Train TorchTrainer with 2 CPU workers (gloo) on the session's real local
Ray, and SQLite or PostgreSQL. Interruptions (workers killed from outside, a dispatcher
process stopped by SIGTERM or SIGKILL): test_interruptions.py; a cancel: test_dispatcher.py.
"""

from __future__ import annotations

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
    free_cpus,
    http_spec,
    make_settings,
    register_tiny,
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
    register_tiny(db.factory, tiny_model_dir)
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
