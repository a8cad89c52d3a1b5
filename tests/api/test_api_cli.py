"""The `moe-unlearn` command line: db upgrade, keys create, serve (and its refusals).
User errors exit with code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.cli import is_loopback, main
from service import db, keys
from service.settings import get_settings
from tests.api.conftest import free_port

MOE_UNLEARN = str(Path(sys.executable).with_name("moe-unlearn"))


@pytest.fixture
def env_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh, unmigrated SQLite database named by DATABASE_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("MOE_UNLEARN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_db_upgrade_then_keys_create(env_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Before the upgrade: a clear one-line refusal naming the command to run.
    assert main(["keys", "create", "--role", "admin", "--tenant", "ops"]) == 2
    assert "moe-unlearn db upgrade" in _one_error_line(capsys.readouterr().err)

    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--role", "auditor", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # the key alone, on one line
    secret = out.strip()
    engine = db.make_engine(env_db)
    with db.session_scope(db.make_session_factory(engine)) as s:
        p = keys.authenticate(s, secret)
    engine.dispose()
    assert p is not None and (p.role, p.tenant) == ("auditor", "acme")


def test_keys_create_on_each_backend(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        assert main(["keys", "create", "--role", "requester", "--tenant", "cli-t"]) == 0
    finally:
        get_settings.cache_clear()
    secret = capsys.readouterr().out.strip()
    engine = db.make_engine(db_url)
    with db.session_scope(db.make_session_factory(engine)) as s:
        p = keys.authenticate(s, secret)
    engine.dispose()
    assert p is not None and p.tenant == "cli-t"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["keys", "create", "--role", "root", "--tenant", "acme"], "role"),
        (["keys", "create", "--role", "admin"], "--tenant"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--host", "0.0.0.0"], "refusing to bind 0.0.0.0"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    env_db: str, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db.upgrade(env_db)  # no keys exist: a non-loopback bind must be refused
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert needle in _one_error_line(captured.err)
    assert captured.out == ""


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


@pytest.mark.slow
def test_serve_subprocess(tmp_path: Path) -> None:
    """The console script: db upgrade, keys create (stdout = the key), then serve on a
    loopback port and answer over HTTP; a bad option exits 2 with one line."""
    env = dict(os.environ)
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'srv.db'}"
    env["MOE_UNLEARN_DATA_DIR"] = str(tmp_path / "data")
    run = subprocess.run([MOE_UNLEARN, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    run = subprocess.run(
        [MOE_UNLEARN, "keys", "create", "--role", "requester", "--tenant", "acme"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.count("\n") == 1
    secret = run.stdout.strip()
    bad = subprocess.run(
        [MOE_UNLEARN, "serve", "--port", "nope"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    port = free_port()
    proc = subprocess.Popen(
        [MOE_UNLEARN, "serve", "--no-ray-serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert r.json()["status"] == "ready"
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {secret}"}
        )
        assert r.status_code == 200 and r.json()["items"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_app_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    from api.app import create_app
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(db.DatabaseNotMigrated, match="moe-unlearn db upgrade"):
        create_app(Settings(database_url=url, data_dir=tmp_path / "d"))
    # Told to, it migrates on start instead.
    app = create_app(Settings(database_url=url, data_dir=tmp_path / "d", migrate_on_start=True))
    db.check_migrated(app.state.engine)
    app.state.engine.dispose()


def test_database_down_is_503_json_not_a_traceback(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'up.db'}"
    db.upgrade(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path / "d"))
    app.state.engine.dispose()
    # Point the running app at a database that does not exist (as if it went away).
    gone = db.make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/mu_no_such_database")
    app.state.engine = gone
    app.state.session_factory = db.make_session_factory(gone)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        r = c.get("/v1/jobs", headers={"Authorization": "Bearer mu_x"})
        assert r.status_code == 503 and r.json()["errors"][0]["field"] == "database"
        assert "Traceback" not in r.text
        assert "moe_unlearn_database_up 0" in c.get("/metrics").text
    gone.dispose()
