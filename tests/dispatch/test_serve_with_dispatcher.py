"""The whole service in one process on one Ray: `moe-unlearn serve --with-dispatcher` serves
the API from a 0-CPU Ray Serve replica and runs the dispatcher beside it, whose Ray Train
job takes both CPUs of the same local Ray. SIGINT leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.client import Client
from service import db
from tests.api.serve_kit import ray_serve_process
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, corpus_bytes
from tests.dispatch.kit import http_spec, register_tiny

pytestmark = pytest.mark.slow


def test_serve_with_dispatcher_runs_a_ray_train_job_on_one_ray(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with ray_serve_process(
        tmp_path, "--with-dispatcher", MOE_UNLEARN_DISPATCHER_POLL_S="0.2"
    ) as served:
        engine = db.make_engine(f"sqlite:///{tmp_path / 'serve.db'}")
        register_tiny(db.make_session_factory(engine), tiny_model_dir)
        engine.dispose()
        with Client(served.base, api_key=served.key) as c:
            forget = c.upload_corpus(corpus_bytes(FORGET_SUBJECTS, 12))["id"]
            retain = c.upload_corpus(corpus_bytes(RETAIN_SUBJECTS, 12))["id"]
            job = c.submit(http_spec(tiny_model_dir, forget, retain, 4, num_workers=2))
            final = c.wait(job["id"], timeout=300, interval=0.5)
            assert final["state"] == "SUCCEEDED", (final, served.log.read_text()[-3000:])
            evs = c.events(job["id"])["items"]
            (att,) = [e for e in evs if e["kind"] == "attempt_started"]
            assert att["payload"]["runner"] == "ray_train"
            assert [e["step"] for e in evs if e["kind"] == "step"] == [1, 2, 3, 4]
        names = served.record_children()
        assert "ServeReplica" in names and "raylet" in names, names
        # One Ray: no second raylet was started for the dispatcher.
        assert sum(p.name() == "raylet" for p in served.started) == 1, names
        text = served.stop()
        assert "running the dispatcher in this process" in text
