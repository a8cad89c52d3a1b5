"""The few environment settings the worker side reads, declared once and torch-free.

`workers` may not import `service`, yet a worker process (a Ray node, `moe-unlearn run`)
needs the demo-world cache. This class declares those variables; the service's `Settings`
inherits it, so each variable has one declaration, the service rejects misspelt ones
(service/settings.py), and a worker parses it with the same type and default.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    # extra="ignore": a worker sees the service's variables too; checking them is the
    # service's job (Settings refuses unknown MOE_UNLEARN_* names).
    model_config = SettingsConfigDict(env_prefix="MOE_UNLEARN_", extra="ignore")

    cache: Path | None = Field(
        None,
        description="Root of the demo-world cache (`<cache>/worlds/<hash>/`); share it between "
        "every Ray node and the service. Unset: ~/.cache/moe-unlearn.",
    )


def cache_root() -> Path:
    """`MOE_UNLEARN_CACHE`, else ~/.cache/moe-unlearn (read at each call: tests change it)."""
    root = WorkerSettings().cache
    return root.expanduser() if root else Path.home() / ".cache" / "moe-unlearn"
