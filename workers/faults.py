"""TEST-ONLY failure injection for the Ray Train runner (torch-free, so the dispatcher can
forward the settings without importing the engine).

With MOE_UNLEARN_FAIL_AT_STEP=k and MOE_UNLEARN_FAIL_MARKER=path in the environment of the
process that calls `run_job_distributed` (the dispatcher forwards both from its own
environment into the attempt's Ray task), the last rank kills its own process (SIGKILL, as
the kernel's OOM killer or a lost node would) after step k, the first time only: when the
marker file does not exist yet, which it creates first. The next attempt of the same job then
resumes from its checkpoint and succeeds. Never set them in production.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAIL_AT_ENV = "MOE_UNLEARN_FAIL_AT_STEP"
FAIL_MARKER_ENV = "MOE_UNLEARN_FAIL_MARKER"


def injection_env() -> dict[str, str]:
    """The injection variables set in this process (empty in production)."""
    return {k: os.environ[k] for k in (FAIL_AT_ENV, FAIL_MARKER_ENV) if k in os.environ}


def kill_self_once(marker: Path, step: int) -> None:
    """Die like a crashed worker, unless `marker` says this already happened once.

    Called on a Ray Train worker. First waits until Ray Train has committed every
    checkpoint reported so far: a checkpoint counts only once the controller has collected
    every rank's report, and a crash a few milliseconds after `report()` would lose it,
    making "resumes from the last checkpoint" depend on timing."""
    if marker.exists():
        return
    import ray.train
    from ray.train import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    marker.write_text(f"killed at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)
