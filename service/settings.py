"""The one Settings object of the service, read from the environment.

Every variable has the prefix `MOE_UNLEARN_` (e.g. `MOE_UNLEARN_DATA_DIR`), except the
database URL, which is the conventional `DATABASE_URL` (the prefixed name also works),
and the Ray address, which may also be given as the conventional `RAY_ADDRESS`.

Dispatcher settings (`moe-unlearn dispatcher`): ray_address, ray_num_cpus, ray_temp_dir,
checkpoint_dir, dispatcher_poll_s, heartbeat_s, cancel_grace_s, attempt_timeout_s,
dispatcher_concurrency, model_tar_max_bytes (each documented on its field below).

Strict: an unknown `MOE_UNLEARN_*` variable in the environment (a typo, or a setting that
no longer exists) stops `Settings()` with an error naming it and the nearest known name,
instead of being silently ignored. Every declared field is known, whatever branch added it;
`MOE_UNLEARN_TEST_*` is left to the test harness. The worker-side variables
(`MOE_UNLEARN_CACHE`) are declared in workers/env.py and inherited here.
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, AliasPath, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.env import WorkerSettings

DEFAULT_DATABASE_URL = "sqlite:///./var/moe-unlearn.db"
ENV_PREFIX = "MOE_UNLEARN_"
# Variables under this prefix belong to the test suite (e.g. MOE_UNLEARN_TEST_PG_URL).
UNCHECKED_PREFIXES = ("MOE_UNLEARN_TEST_",)
# Read by the command-line client (api/cli_client.py: --server, --key, --retries), not by
# the service: known names, so the strict check lets them through.
CLIENT_ENV = frozenset({"MOE_UNLEARN_URL", "MOE_UNLEARN_KEY", "MOE_UNLEARN_RETRIES"})


class UnknownSettingError(ValueError):
    """An MOE_UNLEARN_* variable that no setting declares (a ValueError: a user error)."""


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every MOE_UNLEARN_* variable name that `cls` reads (upper case): the prefixed field
    name, or the prefixed names among a field's validation aliases."""
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if alias is None:
            names.add(f"{ENV_PREFIX}{name}".upper())
            continue
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for c in choices:
            if isinstance(c, AliasPath):
                c = c.path[0]
            if isinstance(c, str) and c.upper().startswith(ENV_PREFIX):
                names.add(c.upper())
    return names


def check_environment(cls: type[BaseSettings], environ: dict[str, str] | None = None) -> None:
    """Refuse MOE_UNLEARN_* variables that `cls` does not declare."""
    env = os.environ if environ is None else environ
    known = env_names(cls) | CLIENT_ENV
    unknown = sorted(
        k.upper()
        for k in env
        if k.upper().startswith(ENV_PREFIX)
        and k.upper() not in known
        and not k.upper().startswith(UNCHECKED_PREFIXES)
    )
    if not unknown:
        return
    parts = []
    for var in unknown:
        # compared without the shared prefix, which would make every name look close
        suffixes = sorted(k.removeprefix(ENV_PREFIX) for k in known)
        near = difflib.get_close_matches(var.removeprefix(ENV_PREFIX), suffixes, n=1)
        hint = f"did you mean {ENV_PREFIX}{near[0]}?" if near else "no such setting"
        parts.append(f"{var} ({hint})")
    raise UnknownSettingError(
        f"unknown setting{'s' if len(parts) > 1 else ''} in the environment: {', '.join(parts)}"
        "; the settings are listed in service/settings.py"
    )


class Settings(WorkerSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    def __init__(self, **values: Any) -> None:
        # Before parsing, and outside pydantic's ValidationError: its message would echo
        # every value read, DATABASE_URL's password included.
        check_environment(type(self))
        super().__init__(**values)

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
    db_pool_size: int = Field(
        5, ge=1, description="Database connections a process keeps open (SQLAlchemy pool_size)."
    )
    db_max_overflow: int = Field(
        10, ge=0, description="Extra connections a process may open beyond db_pool_size."
    )
    db_pool_timeout_s: float = Field(
        30.0, gt=0, description="How long a caller waits for a free pooled connection."
    )
    db_echo: bool = Field(False, description="Log every SQL statement (debugging).")
    debug: bool = Field(
        False, description="CLI: show the traceback of an error instead of one line."
    )

    # --- dispatcher and Ray (service/dispatcher.py) ---------------------------------------
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("MOE_UNLEARN_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="Ray cluster to use (e.g. ray://head:10001 or head:6379; RAY_ADDRESS also "
        "works). Unset: the dispatcher starts a private local Ray instance.",
    )
    ray_num_cpus: int = Field(
        2, ge=1, description="CPUs of the local Ray instance (ignored with ray_address)."
    )
    ray_temp_dir: Path | None = Field(
        None,
        description="Ray's session/temp folder for the local instance. Unset: <data_dir>/ray "
        "when that path is short enough for Ray's unix sockets, else a fresh /tmp folder.",
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Ray Train storage for checkpoints, one folder per job id (shared storage "
        "on a multi-node cluster); a retried attempt resumes from it, and it is deleted when "
        "the job ends. Unset: <data_dir>/checkpoints.",
    )
    dispatcher_poll_s: float = Field(
        0.5, gt=0, description="How often the dispatcher drains progress and looks for jobs."
    )
    heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="Seconds between lease heartbeats of a running attempt (keep it well "
        "under lease_seconds; a cancel request is noticed at the next heartbeat).",
    )
    cancel_grace_s: float = Field(
        15.0,
        gt=0,
        description="After asking an attempt to stop (cancel, timeout, lost lease), how long "
        "to wait before force-killing its Ray task.",
    )
    attempt_timeout_s: float | None = Field(
        6 * 3600.0,
        gt=0,
        description="Wall-clock limit of one attempt; exceeding it fails the job with "
        "failure class `timeout` (default 6 h; set empty for no limit).",
    )
    dispatcher_concurrency: int = Field(
        1, ge=1, description="Attempts one dispatcher runs at the same time."
    )
    model_tar_max_bytes: int = Field(
        1024**3,
        ge=0,
        description="The unlearned model directory is also packed as model.tar (a downloadable "
        "artifact) when it is at most this big; its file index is always recorded.",
    )

    # --- proof of deletion (service/signing.py, service/checkpoints.py, requests.py) ---
    signing_key: Path | None = Field(
        None,
        description="PEM file of the Ed25519 key that signs certificates and audit "
        "checkpoints. Unset: one is generated into keys_dir with a warning.",
    )
    audit_key: Path | None = Field(
        None,
        description="File holding the HMAC key (>= 32 bytes) of audit entries; keep it "
        "where the database's writers cannot read it. Unset: generated into keys_dir.",
    )
    keys_dir: Path | None = Field(
        None, description="Generated keys and the public-key history. Unset: <data_dir>/keys."
    )
    audit_checkpoint_dir: Path | None = Field(
        None,
        description="Where `moe-unlearn audit export` writes signed checkpoints of the audit "
        "chain head (a place the database's writers cannot rewrite). Unset: "
        "<data_dir>/audit-checkpoints.",
    )
    request_due_days: int = Field(
        30, ge=1, le=366, description="Days from receipt to a deletion request's due date."
    )

    # --- exposure to clients (issue 14; README "Security") -----------------------------
    model_dir: Path | None = Field(
        None,
        description="Model root: an admin may register directories under it as models "
        "(`moe-unlearn models add NAME --path DIR`). Unset: no directory models.",
    )
    model_allowlist: str | None = Field(
        None,
        max_length=1024,
        description="Regular expression (full match) of hub ids any client may name as "
        "`model` without registration. Unset: none.",
    )
    max_corpus_record_bytes: int = Field(
        1024 * 1024, gt=0, description="Longest accepted corpus line (record), in bytes."
    )
    corpus_quota_bytes: int = Field(
        1024**3, ge=0, description="Stored corpus bytes one tenant may hold at a time."
    )
    max_corpus_retention_days: int = Field(
        365, ge=0, description="Largest `retention_days` an upload may ask for."
    )
    max_queued_jobs: int = Field(
        20, ge=1, description="Unfinished jobs (queued, retrying, running) per tenant; more: 429."
    )
    max_streams_per_tenant: int = Field(
        8, ge=1, description="Open event streams per tenant (per API process); more: 429."
    )
    stream_max_s: float = Field(
        1800.0, gt=0, description="Longest life of one event stream; reconnect with Last-Event-ID."
    )
    rate_per_key: float = Field(
        20.0, gt=0, description="Sustained requests per second per API key (token bucket)."
    )
    rate_burst: int = Field(100, ge=1, description="Burst size of the per-key request rate.")
    max_world_seed: int = Field(
        16, ge=0, description="Largest demo `world.seed` a remote client may ask for (each "
        "new seed is a minutes-long world build)."
    )
    cluster_cpus: int | None = Field(
        None, ge=1, description="CPUs a job may use at most. Unset: ray_num_cpus."
    )
    cluster_gpus: int = Field(0, ge=0, description="GPUs a job may use at most.")
    worker_memory_gib: float | None = Field(
        None,
        gt=0,
        le=65536,
        description="Memory of one CPU worker, for the submit-time memory plan "
        "(workers/planner.py). Unset: this machine's memory shared by the job's workers.",
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="Memory of one GPU, for the memory plan of GPU jobs (Ray does not "
        "advertise it). Unset: this machine's GPUs (nvidia-smi), if any.",
    )
    metrics_token: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="If set, GET /metrics needs `Authorization: Bearer <token>`. It only ever "
        "shows tenant-free aggregates.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call `get_settings.cache_clear()` in tests)."""
    return Settings()
