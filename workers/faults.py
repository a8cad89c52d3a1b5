"""TEST-ONLY seams of the Ray Train runner (torch-free, so the dispatcher can forward the
settings without importing the engine). Read only through the functions below; unset in
production, where each is a no-op.

Checkpoint seam: with MOE_UNLEARN_TEST_CHECKPOINT_SEAM=<file>[,<hold seconds>] in the
environment of the process that starts the run (the dispatcher forwards it from its own
environment into the attempt, the driver into every rank), every rank appends one JSON line
{"rank", "step", "pid"} to <file> at the moment it is writing a checkpoint (its files are
written, not yet reported to Ray Train), then holds for <hold seconds> (default 0): a test
can SIGKILL that process while the checkpoint is being written.

Legacy kill-self injection (to be removed once the external-kill tests replace it): with
MOE_UNLEARN_FAIL_AT_STEP=k and MOE_UNLEARN_FAIL_MARKER=path, the last rank kills its own
process after step k, the first time only (when the marker does not exist yet).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

CHECKPOINT_SEAM_ENV = "MOE_UNLEARN_TEST_CHECKPOINT_SEAM"
FAIL_AT_ENV = "MOE_UNLEARN_FAIL_AT_STEP"
FAIL_MARKER_ENV = "MOE_UNLEARN_FAIL_MARKER"
SEAM_ENV = (CHECKPOINT_SEAM_ENV, FAIL_AT_ENV, FAIL_MARKER_ENV)


def injection_env() -> dict[str, str]:
    """The seam variables set in this process (empty in production)."""
    return {k: os.environ[k] for k in SEAM_ENV if k in os.environ}


def apply_env(env: dict[str, str]) -> None:
    """Make this (possibly reused) worker process see exactly the seams in `env`."""
    for k in SEAM_ENV:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)


def checkpoint_seam(rank: int, step: int) -> None:
    """Announce (and optionally hold) the moment this rank is writing a checkpoint."""
    value = os.environ.get(CHECKPOINT_SEAM_ENV)
    if not value:
        return
    path, _, hold = value.partition(",")
    line = json.dumps({"rank": rank, "step": step, "pid": os.getpid()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    if hold:
        time.sleep(float(hold))


def before_step(rank: int, world: int, step: int) -> None:
    """Legacy kill-self injection: the last rank dies before step k + 1 (once)."""
    at = os.environ.get(FAIL_AT_ENV)
    if at and step == int(at) and rank == world - 1:
        kill_self_once(Path(os.environ.get(FAIL_MARKER_ENV) or ".injected-failure"), step)


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
