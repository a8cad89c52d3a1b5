"""Settings refuse MOE_UNLEARN_* variables that no field declares, naming the nearest one;
the worker side reads MOE_UNLEARN_CACHE through the same declaration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from service.settings import Settings, UnknownSettingError, check_environment, env_names
from workers.env import WorkerSettings, cache_root
from workers.world.cache import default_worlds_dir

ROOT = Path(__file__).resolve().parents[2]


def test_misspelt_variable_is_refused_with_the_nearest_name(monkeypatch):
    monkeypatch.setenv("MOE_UNLEARN_LEASE_SECOND", "5")
    with pytest.raises(UnknownSettingError) as e:
        Settings()
    msg = str(e.value)
    assert "MOE_UNLEARN_LEASE_SECOND " in msg
    assert "did you mean MOE_UNLEARN_LEASE_SECONDS?" in msg


def test_every_unknown_variable_is_named_and_no_value_is_echoed(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret-pw@h/db")
    monkeypatch.setenv("MOE_UNLEARN_MODELS_ROOT", "/data/models")  # read by nothing
    monkeypatch.setenv("moe_unlearn_data_dri", "/x")  # names are case-insensitive
    monkeypatch.setenv("MOE_UNLEARN_ZZZZZZ", "1")
    with pytest.raises(UnknownSettingError) as e:
        Settings()
    msg = str(e.value)
    assert "MOE_UNLEARN_DATA_DRI (did you mean MOE_UNLEARN_DATA_DIR?)" in msg
    assert "MOE_UNLEARN_MODELS_ROOT" in msg
    assert "MOE_UNLEARN_ZZZZZZ (no such setting)" in msg
    assert "secret-pw" not in msg


def test_declared_names_aliases_and_test_variables_pass(monkeypatch):
    for k, v in {
        "MOE_UNLEARN_RAY_ADDRESS": "ray://h:10001",
        "MOE_UNLEARN_DATABASE_URL": "sqlite:///x.db",
        "MOE_UNLEARN_CACHE": "/tmp/cache",
        "MOE_UNLEARN_DEBUG": "1",
        "MOE_UNLEARN_TEST_PG_URL": "postgresql://x",  # the test harness's own
        "RAY_ADDRESS": "ray://other:10001",  # not ours: never checked
    }.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.ray_address == "ray://h:10001" and s.database_url == "sqlite:///x.db"
    assert s.cache == Path("/tmp/cache") and s.debug is True
    assert "RAY_ADDRESS" not in env_names(Settings)


def test_the_mechanism_accepts_any_declared_field(monkeypatch):
    # a field another branch adds is known without touching the check
    class More(Settings):
        signing_key_file: Path | None = Field(None)

    monkeypatch.setenv("MOE_UNLEARN_SIGNING_KEY_FILE", "/k")
    assert More().signing_key_file == Path("/k")
    with pytest.raises(UnknownSettingError, match="MOE_UNLEARN_SIGNING_KEY_FILE"):
        Settings()
    check_environment(More, {"MOE_UNLEARN_SIGNING_KEY_FILE": "/k"})


def test_cache_is_one_declaration_for_service_and_workers(monkeypatch, tmp_path):
    assert "cache" in WorkerSettings.model_fields and issubclass(Settings, WorkerSettings)
    monkeypatch.setenv("MOE_UNLEARN_CACHE", str(tmp_path))
    assert cache_root() == tmp_path == Settings().cache
    assert default_worlds_dir() == tmp_path / "worlds"
    monkeypatch.delenv("MOE_UNLEARN_CACHE")
    assert cache_root() == Path.home() / ".cache" / "moe-unlearn"


def test_cli_refuses_a_misspelt_variable_in_one_line():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MOE_UNLEARN_DEBGU": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "api.cli", "db", "upgrade"],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "moe-unlearn: error: unknown setting in the environment: MOE_UNLEARN_DEBGU "
        "(did you mean MOE_UNLEARN_DEBUG?); the settings are listed in service/settings.py"
    ]


def test_the_command_line_clients_variables_are_known(monkeypatch):
    """MOE_UNLEARN_URL / _KEY / _RETRIES are the client's (`moe-unlearn jobs ...`): every
    command starts with them set."""
    monkeypatch.setenv("MOE_UNLEARN_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("MOE_UNLEARN_KEY", "mu_secret")
    monkeypatch.setenv("MOE_UNLEARN_RETRIES", "2")
    Settings()
