"""Settings come from the environment: DATABASE_URL, the rest prefixed MOE_UNLEARN_."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_DATABASE_URL, Settings, get_settings


def test_defaults(monkeypatch):
    for var in ("DATABASE_URL", "MOE_UNLEARN_DATABASE_URL", "MOE_UNLEARN_LEASE_SECONDS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert s.database_url == DEFAULT_DATABASE_URL == "sqlite:///./var/moe-unlearn.db"
    assert (s.lease_seconds, s.max_attempts, s.migrate_on_start) == (60, 3, False)


def test_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("MOE_UNLEARN_DATA_DIR", "/srv/blobs")
    monkeypatch.setenv("MOE_UNLEARN_MAX_CORPUS_BYTES", "1024")
    monkeypatch.setenv("MOE_UNLEARN_MIGRATE_ON_START", "true")
    s = Settings()
    assert s.database_url == "postgresql://u@h/db"
    assert s.data_dir == Path("/srv/blobs")
    assert (s.max_corpus_bytes, s.migrate_on_start) == (1024, True)
    monkeypatch.setenv("MOE_UNLEARN_LEASE_SECONDS", "0")
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings()


def test_get_settings_is_cached(monkeypatch):
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()
