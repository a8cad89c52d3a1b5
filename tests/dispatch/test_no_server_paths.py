"""No server path ever reaches a client (house rule: a client never names a server path and
is never shown one). Jobs run through the real dispatcher loop, the real engine and the
real recording, with the attempt run inline in this process (Ray's transport is left out:
it carries the same messages); then everything a client can read is fetched through the
real API and console, as a hostile client would, and searched for the server's folders
(the blob store, the model root, the world cache: all under pytest's base temp folder).

The jobs: a registered model directory (full output: model.tar), `job:<A>` of it written
as a patch only (base_model.json), `job:<B>` of that patch-only output (its base is read
back from the server's own base_model.json, which keeps the path), the demo model as a
patch (its base is the world cache's folder), and a registered model whose directory is
gone (the engine's "could not be loaded: <path>" failure)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service import keys, models, signing
from service.db import session_scope
from service.dispatcher import Dispatcher
from service.failures import AttemptOutcome, classify
from service.recording import CLIENT_DIR
from service.settings import Settings
from tests.console.kit import sign_in
from tests.dispatch.conftest import FORGET_SUBJECTS, RETAIN_SUBJECTS, corpus_bytes
from tests.dispatch.kit import TINY_MODEL, http_spec, make_settings, register_tiny
from tests.small_world import SMALL_WORLD
from workers.progress import JobEvent, Message, StageStarted
from workers.spec import JobSpec

pytestmark = pytest.mark.slow


class _Collect:
    """A workers.job.Reporter that keeps the messages (what the channel actor carries)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def stage(self, name: str) -> None:
        self.messages.append(StageStarted(name))

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.messages.append(JobEvent(kind, int(step), payload))


class _Finished:
    """The handle of an attempt that already ran (service.executor.AttemptHandle)."""

    placement_group = None

    def __init__(self, outcome: AttemptOutcome, messages: list[Message]) -> None:
        self._outcome, self._messages = outcome, messages

    def drain(self, final: bool = False) -> list[Message]:
        out, self._messages = self._messages, []
        return out

    def done(self) -> bool:
        return True

    def outcome(self) -> AttemptOutcome:
        return self._outcome

    def request_stop(self) -> None:
        pass

    def force_stop(self) -> None:
        pass

    def release(self) -> None:
        pass


class InlineExecutor:
    """Runs the attempt with the engine in this process when it starts (the same run_job
    and outcome classification as the Ray task)."""

    def start(
        self, job_id: str, attempt: int, spec: JobSpec, output_dir: Path,
        corpus_paths: Mapping[str, str],
    ) -> _Finished:  # fmt: skip
        from workers.run import run_job

        rep = _Collect()
        try:
            res = run_job(spec, output_dir, rep, lambda cid: Path(corpus_paths[cid]))
            outcome = AttemptOutcome("succeeded", result=res)
        except Exception as e:  # noqa: BLE001 - classified as the Ray task does
            outcome = classify(e)
        return _Finished(outcome, rep.messages)


def _dispatch(settings: Settings, factory: Any) -> None:
    Dispatcher(settings, factory, InlineExecutor(), owner="leak-test").run(once=True)


@pytest.fixture
def served(db, tmp_path, tiny_model_dir, small_world) -> Any:
    settings = make_settings(db, tmp_path, rate_per_key=1e6, rate_burst=1_000_000,
                             model_dir=tiny_model_dir.parent)  # fmt: skip
    register_tiny(db.factory, tiny_model_dir)
    gone = tiny_model_dir.parent / f"gone-{tmp_path.name}"
    shutil.copytree(tiny_model_dir, gone)
    with session_scope(db.factory) as s:
        models.register(s, "gone", path=str(gone), actor="test", settings=settings)
        secrets = {role: keys.create_key(s, role, "acme", actor="test")[1]
                   for role in ("requester", "auditor")}  # fmt: skip
    shutil.rmtree(gone)  # registered, then removed: the job fails to load it
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield settings, client, secrets
    app.state.engine.dispose()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _get(client: TestClient, key: str, url: str, **params: Any) -> Any:
    r = client.get(url, headers=_h(key), params=params)
    assert r.status_code == 200, (url, r.text)
    return r


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # no database in what is tested
def test_no_client_visible_output_names_a_server_path(db, served, tmp_path_factory) -> None:
    settings, client, secrets = served
    req, aud = secrets["requester"], secrets["auditor"]

    def upload(data: bytes) -> str:
        r = client.post("/v1/corpora", content=data, headers=_h(req))
        assert r.status_code == 201, r.text
        return r.json()["id"]

    quick = {"batch_size": 8, "robustness": [{"check": "router_restored"}]}

    def run(body: dict[str, Any]) -> dict[str, Any]:
        r = client.post("/v1/jobs", json=body, headers=_h(req))
        assert r.status_code == 202, r.text
        _dispatch(settings, db.factory)
        return _get(client, req, f"/v1/jobs/{r.json()['id']}").json()

    def tiny(model: str, output: str) -> dict[str, Any]:
        # corpora each time: a finished job's forget corpus is deleted
        forget, retain = upload(corpus_bytes(FORGET_SUBJECTS, 12)), upload(
            corpus_bytes(RETAIN_SUBJECTS, 12))  # fmt: skip
        body = http_spec(Path(), forget, retain, 2)
        return {**body, "model": model, "evaluation": quick, "output": {"model": output}}

    a = run(tiny(TINY_MODEL, "full"))
    b = run(tiny(f"job:{a['id']}", "patch"))
    c = run(tiny(f"job:{b['id']}", "patch"))  # loads B: base_model.json read back
    demo = run({
        "model": "demo", "world": SMALL_WORLD.model_dump(),
        "forget": {"demo": "forget"}, "retain": {"demo": "retain"}, "algorithm": "gdiff",
        "training": {"max_steps": 2, "batch_size": 8},
        "evaluation": {"backend": "direct", "robustness": [{"check": "router_restored"}]},
        "output": {"model": "patch"},
    })  # fmt: skip
    failed = run(tiny("gone", "full"))
    for job in (a, b, c, demo):
        assert job["state"] == "SUCCEEDED", job
    assert failed["state"] == "FAILED" and failed["failure_class"] == "user_input", failed

    seen: list[tuple[str, bytes]] = []  # (what, bytes) of everything a client read
    served_json: dict[tuple[str, str], dict[str, Any]] = {}
    jobs = {"A": a, "B": b, "C": c, "demo": demo, "failed": failed}
    for label, job in jobs.items():
        jid = job["id"]
        for url in ("", "/events", "/evaluations", "/expert-map", "/artifacts",
                    "/robustness", "/lineage", "/certificate"):  # fmt: skip
            r = _get(client, req, f"/v1/jobs/{jid}{url}", limit=1000)
            seen.append((f"{label} {url or '/'}", r.content))
        seen.append((f"{label} cert.html", _get(client, req, f"/v1/jobs/{jid}/certificate",
                                       format="html").content))  # fmt: skip
        cert = _get(client, req, f"/v1/jobs/{jid}/certificate").json()
        assert signing.verify_document(cert).valid
        signed = {x["name"]: x["sha256"] for x in cert["artifacts"]}
        for art in _get(client, req, f"/v1/jobs/{jid}/artifacts").json()["items"]:
            r = _get(client, req, f"/v1/jobs/{jid}/artifacts/{art['id']}")
            digest = hashlib.sha256(r.content).hexdigest()
            # The certificate signs what is served, and the header says so too.
            assert digest == r.headers["X-Content-SHA256"] == art["sha256"] == signed[
                art["name"]]  # fmt: skip
            seen.append((f"{label} {art['name']}", r.content))
            if art["name"].endswith(".json"):
                served_json[(jid, art["kind"])] = json.loads(r.content)
            if art["name"] == "model.tar":  # every file of the model, read too
                with tarfile.open(fileobj=BytesIO(r.content)) as tar:
                    for m in tar.getmembers():
                        f = tar.extractfile(m)
                        seen.append((f"{label} model.tar:{m.name}", f.read() if f else b""))
        seen.append((f"{label} console", _console_page(client, req, jid)))
        page = client.get(f"/console/jobs/{jid}/certificate")
        seen.append((f"{label} console cert", page.content))
    for url in ("/v1/jobs", "/v1/models"):
        seen.append((url, _get(client, req, url, limit=100).content))
    seen.append(("audit", _get(client, aud, "/v1/audit/events", limit=1000).content))

    forbidden = {str(tmp_path_factory.getbasetemp()), str(settings.data_dir),
                 str(settings.model_dir), "pytest-of-"}  # fmt: skip
    leaks = sorted({what for what, data in seen for f in forbidden if f.encode() in data})
    assert not leaks, "; ".join(leaks)

    # The engine said "model '<dir>' could not be loaded": the client reads its own name.
    assert "'gone' could not be loaded" in failed["failure_message"], failed

    # The served JSON names every model as the client did, the output as job:<id>.
    for job, model in ((a, TINY_MODEL), (b, f"job:{a['id']}"), (c, f"job:{b['id']}"),
                       (demo, "demo")):  # fmt: skip
        res = served_json[(job["id"], "result")]
        assert res["model"] == model and res["output_dir"] == f"job:{job['id']}"
        assert served_json[(job["id"], "spec")]["model"] == model
    for job, base in ((b, f"job:{a['id']}"), (c, f"job:{b['id']}"), (demo, "demo")):
        assert served_json[(job["id"], "base_model")]["model"] == base
    # The server's own base_model.json keeps the path a later job:<id> loads from (C did).
    out_b = settings.data_dir / "artifacts" / b["id"] / "attempt-1"
    kept = json.loads((out_b / "base_model.json").read_text())["model"]
    assert Path(kept).is_absolute() and (Path(kept) / "config.json").is_file()
    assert (out_b / CLIENT_DIR / "base_model.json").is_file()


def _console_page(client: TestClient, key: str, job_id: str) -> bytes:
    if not client.cookies.get("mu_console"):
        assert sign_in(client, key).status_code in (302, 303)
    r = client.get(f"/console/jobs/{job_id}")
    assert r.status_code == 200, r.text[:300]
    return r.content
