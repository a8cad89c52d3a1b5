"""Engines, sessions and migrations for SQLite (the embedded default) and PostgreSQL.

SQLite: WAL journal (readers never block the writer), foreign keys on, a busy timeout,
and `lock_for_write` taking the write lock up front (BEGIN IMMEDIATE) for the service's
read-then-write operations, so they are serialised instead of failing mid-way.
PostgreSQL: psycopg 3 (`postgresql+psycopg://`); row locks / SKIP LOCKED where needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic_core import from_json
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.tables import ALL_TABLES

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
UPGRADE_COMMAND = "moe-unlearn db upgrade"


class DatabaseNotMigrated(RuntimeError):
    """The database has no schema, or an older one than this code needs."""


def normalize_url(url: str) -> str:
    """Accept the usual `postgres://` / `postgresql://` spellings and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _json_loads(text: str | bytes) -> Any:
    return from_json(text)


def make_engine(
    url: str,
    *,
    echo: bool = False,
    busy_timeout_s: float = 30.0,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout_s: float = 30.0,
) -> Engine:
    """A new engine for `url` (SQLite file or PostgreSQL). Creates the SQLite file's folder.

    Pool: at most `pool_size + max_overflow` connections; a checkout waits up to
    `pool_timeout_s` for one to come back. Callers must return a connection within the
    call that took it (api/auth.py explains the deadlock otherwise)."""
    url = normalize_url(url)
    u = make_url(url)
    # JSON columns (job specs, event and audit payloads) are decoded with pydantic-core's
    # parser: the same values as json.loads at about twice the speed; listing jobs
    # decodes 50 specs of ~2 KB per request (bench/api_load.py --profile).
    kwargs: dict[str, Any] = {"echo": echo, "future": True, "json_deserializer": _json_loads}
    if u.get_backend_name() != "sqlite" or (u.database and u.database != ":memory:"):
        # A file or server database gets a QueuePool (in-memory SQLite uses a static one).
        kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": busy_timeout_s, "check_same_thread": False}
        engine = create_engine(url, **kwargs)
        timeout_ms = int(busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={timeout_ms}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    kwargs["pool_pre_ping"] = True
    return create_engine(url, **kwargs)


def engine_for(settings: Settings) -> Engine:
    """The engine every process of the service builds from its settings (API, dispatcher,
    CLI): one place for the URL, SQLite's busy timeout and the pool limits."""
    return make_engine(
        settings.database_url,
        echo=settings.db_echo,
        busy_timeout_s=settings.sqlite_busy_timeout_s,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout_s=settings.db_pool_timeout_s,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded objects stay readable after commit (the API serialises them
    after the transaction ended)."""
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_sqlite(session_or_engine: Session | Engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else (
        session_or_engine
    )
    return bind.dialect.name == "sqlite"


def lock_for_write(session: Session) -> None:
    """On SQLite, start the transaction with BEGIN IMMEDIATE (take the database write lock
    now, waiting up to the busy timeout) unless it already writes. Without this, a
    read-then-write transaction can interleave with another writer. No-op on PostgreSQL,
    where the callers use row locks."""
    if not is_sqlite(session):
        return
    dbapi_conn = session.connection().connection.dbapi_connection
    if dbapi_conn is not None and not dbapi_conn.in_transaction:
        dbapi_conn.execute("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Any:
    """Alembic Config built in code (works from an installed package: no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations to `url` (what `moe-unlearn db upgrade` runs)."""
    from alembic import command

    u = make_url(normalize_url(url))
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The newest migration revision this code ships."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_migrated(engine: Engine) -> None:
    """Raise `DatabaseNotMigrated` (naming the command to run) unless the database is at
    the newest migration and has every table."""
    where = engine.url.render_as_string(hide_password=True)
    current = current_revision(engine)
    head = head_revision()
    if current is None:
        raise DatabaseNotMigrated(
            f"database {where} is not initialised: run `{UPGRADE_COMMAND}` "
            "(or set MOE_UNLEARN_MIGRATE_ON_START=1)"
        )
    if current != head:
        raise DatabaseNotMigrated(
            f"database {where} is at migration {current}, this version needs {head}: "
            f"run `{UPGRADE_COMMAND}`"
        )
    missing = set(ALL_TABLES) - set(inspect(engine).get_table_names())
    if missing:
        raise DatabaseNotMigrated(
            f"database {where} lacks tables {sorted(missing)}: run `{UPGRADE_COMMAND}`"
        )
