"""Issue 14 in the service layer: fair claiming across tenants, the streaming corpus
validator's memory bound, the rate limiter, and `moe-unlearn keys|models` on the CLI."""

from __future__ import annotations

import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest

from api.cli import main
from service import db as dbmod
from service import jobs, keys
from service.db import session_scope
from service.limits import RateLimiter, Throttled
from service.settings import get_settings
from service.storage import CorpusError, CorpusValidator
from service.tables import utcnow
from tests.service.helpers import demo_spec


def _submit(db, tenant: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        with session_scope(db.factory) as s:
            out.append(jobs.submit_job(s, demo_spec(), tenant, "t").job.id)
    return out


def test_claiming_is_fair_across_tenants(db):
    flood = _submit(db, "flood", 5)  # one tenant queues first and many
    late = _submit(db, "late", 2)
    order = []
    for i in range(4):
        with session_scope(db.factory) as s:
            order.append(jobs.claim_next(s, f"w{i}", 60).id)
    # Oldest-first would give flood's 4 first; fewest-running-first alternates.
    assert order == [flood[0], late[0], flood[1], late[1]]
    with session_scope(db.factory) as s:
        jobs.finish_job(s, late[0], "w1", "succeeded")
        jobs.finish_job(s, late[1], "w3", "succeeded")
        # late has none running, flood two: flood's next job still comes (late has none
        # queued), oldest first.
        assert jobs.claim_next(s, "w4", 60).id == flood[2]


def test_validator_memory_is_bounded_by_one_record():
    v = CorpusValidator(max_records=10**9, max_record_bytes=1024)
    chunk = b"a short line\n" * 5000  # 65 KB
    tracemalloc.start()
    for _ in range(300):  # 19.5 MB in all
        v.feed(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    info = v.finish()
    assert info.records == 1_500_000 and info.size == 300 * len(chunk)
    # The old code held every line as a str (~50 bytes each: 75 MB here).
    assert peak < 2 * 1024 * 1024, peak


def test_validator_refuses_at_the_first_record_over_the_count():
    v = CorpusValidator(max_records=3)
    with pytest.raises(CorpusError, match="4 records is over the limit of 3"):
        v.feed(b"a\n" * 1000)
    v = CorpusValidator(max_record_bytes=10)
    v.feed(b"0123456789")
    with pytest.raises(CorpusError, match="line 1: longer than the record limit of 10"):
        v.feed(b"x")  # the partial line alone is over the limit: no need to wait for \n


def test_rate_limiter_refills():
    rl = RateLimiter(rate=2.0, burst=2)
    rl.take("k", now=0.0)
    rl.take("k", now=0.0)
    with pytest.raises(Throttled) as ei:
        rl.take("k", now=0.0)
    assert ei.value.retry_after == 1
    rl.take("k", now=0.6)  # 1.2 tokens refilled
    small = RateLimiter(rate=1.0, burst=1, max_keys=2)
    for k in ("a", "b", "c"):
        small.take(k, now=0.0)
    assert len(small._buckets) == 2  # bounded memory


@pytest.fixture
def env_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("MOE_UNLEARN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MOE_UNLEARN_MODEL_DIR", str(tmp_path / "models"))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    get_settings.cache_clear()
    dbmod.upgrade(url)
    yield url
    get_settings.cache_clear()


def _factory(url: str):
    return dbmod.make_session_factory(dbmod.make_engine(url))


def test_cli_keys_create_list_revoke(env_db, capsys):
    assert main(["keys", "create", "--role", "admin", "--tenant", "ops", "--platform"]) == 0
    assert (
        main(["keys", "create", "--role", "requester", "--tenant", "acme", "--expires", "2d"]) == 0
    )
    secret = capsys.readouterr().out.splitlines()[-1]
    assert main(["keys", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    admin, req = (ln.split("\t") for ln in lines)
    assert admin[1:3] == ["ops", "admin(platform)"] and admin[4] == "expires=-"
    assert req[1:3] == ["acme", "requester"] and req[5] == "revoked=no"
    expires = req[4].removeprefix("expires=")
    assert expires[:10] == (utcnow() + timedelta(days=2)).strftime("%Y-%m-%d")
    assert secret not in "\n".join(lines)
    f = _factory(env_db)
    with session_scope(f) as s:
        assert keys.authenticate(s, secret) is not None
    assert main(["keys", "revoke", req[0]]) == 0
    with session_scope(f) as s:
        assert keys.authenticate(s, secret) is None  # the next request is refused
    assert main(["keys", "list", "--tenant", "acme"]) == 0
    assert "revoked=20" in capsys.readouterr().out
    # User errors: one line, exit 2.
    assert main(["keys", "revoke", "k_0000000000000000"]) == 2
    assert main(["keys", "create", "--role", "auditor", "--tenant", "a", "--platform"]) == 2
    assert main(["keys", "create", "--role", "auditor", "--tenant", "a", "--expires", "soon"]) == 2
    err = capsys.readouterr().err
    assert "key_id: key not found" in err and "platform" in err and "--expires" in err
    assert "Traceback" not in err


def test_cli_models_add_list_remove(env_db, capsys):
    assert main(["models", "add", "tiny", "--path", "tiny"]) == 0
    assert main(["models", "add", "hub1", "--hub-id", "org/m", "--revision", "v1"]) == 0
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[:4] for ln in out] == [
        ["hub1", "hub", "org/m", "v1"],
        ["tiny", "directory", "-", "-"],
    ]
    assert main(["models", "add", "bad", "--path", "/etc"]) == 2
    assert main(["models", "add", "tiny", "--path", "tiny"]) == 2
    assert main(["models", "remove", "tiny"]) == 0
    assert main(["models", "remove", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "under the model root" in err and "already registered" in err


def test_job_model_chains_to_the_unlearned_directory(db, tmp_path):
    with session_scope(db.factory) as s:
        first = jobs.submit_job(s, demo_spec(), "acme", "t").job.id
    with session_scope(db.factory) as s:
        jobs.claim_next(s, "w", 60)
    out = tmp_path / "artifacts" / first / "attempt-1"
    (out / "model").mkdir(parents=True)
    (out / "expert_patch.safetensors").write_bytes(b"p")
    with session_scope(db.factory) as s:
        jobs.record_artifact(
            s,
            first,
            "w",
            kind="expert_patch",
            name="expert_patch.safetensors",
            location=str(out / "expert_patch.safetensors"),
            sha256="0" * 64,
            size=1,
        )
        jobs.finish_job(s, first, "w", "succeeded")
    spec = demo_spec(model=f"job:{first}", forget={"path": "/x"}, retain={"path": "/y"})
    with session_scope(db.factory) as s:
        second = jobs.submit_job(s, spec, "acme", "t", allow_local_paths=True).job.id
    with session_scope(db.factory) as s:
        claimed = jobs.claim_next(s, "w2", 60)
        assert claimed.id == second and claimed.spec["model"] == str(out / "model")
    with session_scope(db.factory) as s:
        # The stored spec keeps the client's name.
        assert jobs.get_job(s, second).spec["model"] == f"job:{first}"


def test_registered_hub_model_runs_at_its_registered_revision(db, tmp_path):
    from service import models
    from service.errors import SpecRejected
    from service.settings import Settings
    from workers.spec import JobSpec

    settings = Settings(data_dir=tmp_path)
    spec = JobSpec.model_validate({"model": "hub1", "forget": {"path": "/f"}, "algorithm": "ga"})
    with session_scope(db.factory) as s:
        models.register(s, "hub1", hub_id="org/m", revision="v1", actor="admin",
                        settings=settings)
    with session_scope(db.factory) as s:
        with pytest.raises(SpecRejected) as e:
            models.check_remote(s, "hub1", "acme", settings, "main")
        assert e.value.field == "revision" and "(v1)" in e.value.reason
        models.check_remote(s, "hub1", "acme", settings, "v1")  # the same one is fine
        job = jobs.submit_job(s, spec, "acme", "t", allow_local_paths=True).job.id
    with session_scope(db.factory) as s:
        claimed = jobs.claim_next(s, "w", 60)
        assert claimed.id == job
        assert (claimed.spec["model"], claimed.spec["revision"]) == ("org/m", "v1")
    with session_scope(db.factory) as s:  # the stored spec keeps the client's name
        assert jobs.get_job(s, job).spec["model"] == "hub1"
        assert jobs.get_job(s, job).spec["revision"] is None
