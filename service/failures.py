"""How an attempt ended, and the ONE function that turns an exception into a failure class.

Classes: `user_input` (a ValueError from the engine or the spec: never retried),
`out_of_memory` (MemoryError, torch's OutOfMemoryError, Ray's memory monitor: retried),
`infrastructure` (a worker, node or Ray Train run died, Ray or the network failed, the
dispatcher stopped: retried; a Ray Train job resumes from its checkpoint), `timeout` (set by
the dispatcher, never raised), `internal` (any other exception from the engine, i.e. a
bug: not retried) and `target_not_met` (never raised: the engine finished, its result says
the forget target was not met; service.recording records its outputs, then FAILED). A
cooperative or forced stop is not a failure: `classify` reports it as
`cancelled`, and the dispatcher decides what a stop it did not ask for means.

Classification is by exception TYPE, through every wrapper Ray puts around the engine's own
exception (a task error's `cause`, a Ray Train run's per-worker failures, `__cause__`), so
it is the same whether it runs inside the attempt's task or on the dispatcher's `ray.get`.
Torch and the engine are never imported for it: an exception of a type whose module was
never loaded in this process cannot be raised here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from workers.results import JobResult

FailureClass = Literal[
    "user_input", "infrastructure", "out_of_memory", "timeout", "internal", "target_not_met"
]
RETRYABLE: frozenset[FailureClass] = frozenset({"infrastructure", "out_of_memory"})
MAX_MESSAGE = 2000


@dataclass(frozen=True)
class AttemptOutcome:
    """How an attempt ended. `result`: the engine's JobResult (succeeded only)."""

    status: Literal["succeeded", "failed", "cancelled"]
    result: JobResult | None = None
    failure_class: FailureClass | None = None
    message: str = ""


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """`module.name` if that module is already imported in this process (else nothing of
    that type can have been raised here, so there is no need to import it)."""
    mod = sys.modules.get(module)
    t = getattr(mod, name, None) if mod is not None else None
    return t if isinstance(t, type) and issubclass(t, BaseException) else None


def _types(*names: tuple[str, str]) -> tuple[type[BaseException], ...]:
    return tuple(t for m, n in names if (t := _loaded(m, n)) is not None)


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and every exception it wraps (a Ray task error's cause, a Ray Train run's
    per-worker failures, `raise ... from`), each once, outermost first."""
    seen: set[int] = set()
    out: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(x for x in failures.values() if isinstance(x, BaseException))
        for attr in ("cause", "controller_failure", "__cause__"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return out


def classify(err: BaseException) -> AttemptOutcome:
    """The outcome of an attempt that raised `err` (inside its task, or from `ray.get`)."""
    chain = _chain(err)
    ray_error = _types(("ray.exceptions", "RayError"))
    # A Ray Train run that failed: a dead worker shows up as whatever its peers saw.
    train_failure = _types(
        ("ray.train", "TrainingFailedError"), ("workers.runners.ray_train", "WorkerFailure")
    )
    oom = (
        MemoryError,
        *_types(("torch", "OutOfMemoryError"), ("ray.exceptions", "OutOfMemoryError")),
    )
    infra = (ConnectionError, OSError, *ray_error, *train_failure)

    if any(isinstance(e, _types(("ray.exceptions", "TaskCancelledError"))) for e in chain):
        return AttemptOutcome("cancelled", message="the attempt was force-stopped")
    # The engine's contract: a user's mistake is a ValueError, wherever it surfaced (a Ray
    # task error is also an instance of its cause's type: skip it, report the cause).
    for e in chain:
        if isinstance(e, ValueError) and not isinstance(e, ray_error):
            return AttemptOutcome("failed", failure_class="user_input", message=_text(e, False))
    if any(isinstance(e, oom) for e in chain):
        return AttemptOutcome("failed", failure_class="out_of_memory", message=_text(err))
    root = chain[-1]  # the innermost exception: from the engine's own code = a bug
    if not any(isinstance(e, train_failure) for e in chain) and not isinstance(root, infra):
        return AttemptOutcome("failed", failure_class="internal", message=_text(root))
    return AttemptOutcome("failed", failure_class="infrastructure", message=_text(err))


def _text(e: BaseException, with_type: bool = True) -> str:
    return (f"{type(e).__name__}: {e}" if with_type else str(e))[:MAX_MESSAGE]


__all__ = ["RETRYABLE", "AttemptOutcome", "FailureClass", "classify"]
