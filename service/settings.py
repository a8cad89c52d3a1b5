"""The one Settings object of the service, read from the environment.

Every variable has the prefix `MOE_UNLEARN_` (e.g. `MOE_UNLEARN_DATA_DIR`), except the
database URL, which is the conventional `DATABASE_URL` (the prefixed name also works).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/moe-unlearn.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOE_UNLEARN_", extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "MOE_UNLEARN_DATABASE_URL"),
        description="SQLAlchemy URL: sqlite:///path.db (default) or "
        "postgresql+psycopg://user@host:5432/db (plain postgresql:// is accepted).",
    )
    data_dir: Path = Field(
        Path("./var/data"), description="Root of the blob store (corpora, artifacts)."
    )
    max_corpus_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest accepted corpus upload, in bytes."
    )
    max_corpus_records: int = Field(
        1_000_000, gt=0, description="Most records (lines) accepted in one corpus."
    )
    lease_seconds: int = Field(
        60, gt=0, description="How long a claimed job stays leased without a heartbeat."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts (claims) before a job whose lease expired is FAILED."
    )
    migrate_on_start: bool = Field(
        False, description="Apply database migrations when the API starts (else refuse to "
        "start on an unmigrated database)."
    )
    host: str = Field("127.0.0.1", description="Address `moe-unlearn serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `moe-unlearn serve` binds to.")
    page_size: int = Field(50, ge=1, le=1000, description="Default page size of list endpoints.")
    max_page_size: int = Field(500, ge=1, description="Largest page size a client may ask.")
    sqlite_busy_timeout_s: float = Field(
        30.0, gt=0, description="How long SQLite waits for a write lock before failing."
    )
    db_echo: bool = Field(False, description="Log every SQL statement (debugging).")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call `get_settings.cache_clear()` in tests)."""
    return Settings()
