"""Database fixtures: every DB test runs on SQLite (a fresh file) and PostgreSQL.

PostgreSQL tests use a database created for this test session (`moeu_test_<random>`,
dropped at the end), so parallel runs and leftovers never collide. A PostgreSQL that
cannot be reached FAILS the tests (CI must not silently skip half of them); set
MOE_UNLEARN_TEST_SKIP_PG=1 to skip them deliberately on a machine without one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, make_session_factory, upgrade

PG_ADMIN_URL = os.environ.get(
    "MOE_UNLEARN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


@dataclass
class Db:
    backend: str
    url: str
    engine: Engine
    factory: sessionmaker[Session]


def _pg_admin() -> Engine:
    eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - any connection failure
        eng.dispose()
        if os.environ.get("MOE_UNLEARN_TEST_SKIP_PG") == "1":
            pytest.skip("PostgreSQL skipped (MOE_UNLEARN_TEST_SKIP_PG=1)")
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {e}", pytrace=False)
    return eng


@pytest.fixture(scope="session")
def pg_factory() -> Iterator[object]:
    """Creates throwaway PostgreSQL databases; drops all of them at the end."""
    created: list[str] = []
    admin: list[Engine] = []

    def new_database() -> str:
        if not admin:
            admin.append(_pg_admin())
        name = f"moeu_test_{uuid.uuid4().hex[:12]}"
        with admin[0].connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield new_database
    if admin:
        with admin[0].connect() as c:
            for name in created:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin[0].dispose()


@pytest.fixture(scope="session")
def pg_migrated_url(pg_factory) -> str:
    url = pg_factory()
    upgrade(url)
    return url


def _reset_pg(engine: Engine) -> None:
    # One migrated database per session, emptied before each test (much faster than
    # migrating a new one per test; DELETE is cheaper than TRUNCATE on tiny tables).
    with engine.begin() as c:
        for table in (
            "deletion_request_jobs", "deletion_requests", "audit_checkpoints",
            "job_events", "expert_maps", "evaluations", "artifacts", "idempotency_keys",
            "jobs", "corpora", "audit_log", "api_keys",
        ):
            c.execute(text(f"DELETE FROM {table}"))
        c.execute(
            text("UPDATE audit_head SET seq = 0, entry_hash = :g, mac = NULL"), {"g": "0" * 64}
        )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """One migrated SQLite file; each test gets a copy (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path: Path) -> Iterator[Db]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "svc.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
        engine = make_engine(url)
    else:
        url = request.getfixturevalue("pg_migrated_url")
        engine = make_engine(url)
        _reset_pg(engine)
    try:
        yield Db(request.param, url, engine, make_session_factory(engine))
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def empty_db_url(request, tmp_path: Path) -> str:
    """A database with no schema at all, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_factory")()
