"""TEST-ONLY seams of the Ray Train runner (torch-free, so the dispatcher can forward the
settings without importing the engine). Read only through the functions below; unset in
production, where each is a no-op.

Checkpoint seam: with MOE_UNLEARN_TEST_CHECKPOINT_SEAM=<file>[,<hold seconds>] in the
environment of the process that starts the run (the dispatcher forwards it from its own
environment into the attempt, the driver into every rank), every rank appends one JSON line
{"rank", "step", "pid"} to <file> at the moment it is writing a checkpoint (its files are
written, not yet reported to Ray Train; every earlier checkpoint is committed), then holds
for <hold seconds> (default 0): a test can SIGKILL that process while the checkpoint is
being written, and the run resumes from exactly the checkpoint before.
"""

from __future__ import annotations

import json
import os
import time

CHECKPOINT_SEAM_ENV = "MOE_UNLEARN_TEST_CHECKPOINT_SEAM"
SEAM_ENV = (CHECKPOINT_SEAM_ENV,)


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
    # Announced only once every checkpoint reported before is committed (Ray Train counts
    # one when its controller has collected every rank's report): a kill at the seam then
    # loses exactly the checkpoint being written, never timing-dependently the one before.
    import ray.train
    from ray.train import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    path, _, hold = value.partition(",")
    line = json.dumps({"rank": rank, "step": step, "pid": os.getpid()})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    if hold:
        time.sleep(float(hold))
