"""Migrations create the schema; an unmigrated database is refused with the command to run."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from service.db import (
    UPGRADE_COMMAND,
    DatabaseNotMigrated,
    check_migrated,
    current_revision,
    head_revision,
    make_engine,
    normalize_url,
    upgrade,
)
from service.tables import ALL_TABLES


def test_unmigrated_database_is_refused_then_upgrade_creates_every_table(empty_db_url):
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(DatabaseNotMigrated) as ei:
            check_migrated(engine)
        assert UPGRADE_COMMAND in str(ei.value)
        assert "moe-unlearn db upgrade" in str(ei.value)
        assert current_revision(engine) is None

        upgrade(empty_db_url)
        check_migrated(engine)  # no error now
        assert current_revision(engine) == head_revision()
        names = set(inspect(engine).get_table_names())
        assert set(ALL_TABLES) <= names
        assert {
            "jobs", "job_events", "corpora", "expert_maps", "evaluations", "artifacts",
            "audit_log", "audit_head", "api_keys", "idempotency_keys",
        } <= names
        upgrade(empty_db_url)  # idempotent: a second upgrade is a no-op
        with engine.connect() as c:
            head = c.execute(text("SELECT seq, entry_hash FROM audit_head")).all()
        assert head == [(0, "0" * 64)]
    finally:
        engine.dispose()


def test_a_missing_table_is_refused(empty_db_url):
    # Its own database: dropping a table must not break the shared test database.
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as c:
            c.execute(text("DROP TABLE idempotency_keys"))
        with pytest.raises(DatabaseNotMigrated, match="idempotency_keys"):
            check_migrated(engine)
    finally:
        engine.dispose()


def test_job_events_unique_key_exists(db):
    uniques = inspect(db.engine).get_unique_constraints("job_events")
    assert any(
        sorted(u["column_names"]) == ["attempt", "job_id", "kind", "step"] for u in uniques
    )


def test_sqlite_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = make_engine(url, busy_timeout_s=7.5)
    with engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert c.execute(text("PRAGMA busy_timeout")).scalar() == 7500
    engine.dispose()


def test_postgres_urls_use_psycopg3():
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_migrations_match_the_models(db):
    # A model change without a migration (or the reverse) shows up here.
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from service.tables import Base

    with db.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []


def test_pool_limits_are_applied(db):
    """make_engine's pool bound: pool_size + max_overflow connections, then a checkout
    waits pool_timeout_s and fails (the API's db_pool_* settings feed these)."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    engine = make_engine(db.url, pool_size=1, max_overflow=1, pool_timeout_s=0.2)
    try:
        held = [engine.connect(), engine.connect()]
        with pytest.raises(PoolTimeout):
            engine.connect()
        held.pop().close()
        with engine.connect() as c:  # a returned connection is handed out again
            assert c.execute(text("SELECT 1")).scalar_one() == 1
        for c in held:
            c.close()
    finally:
        engine.dispose()
