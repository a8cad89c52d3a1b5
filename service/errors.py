"""Errors the service raises. Each names the field (or object) at fault and the reason, so
the API can turn it into a 4xx body and the CLI into one line without a traceback."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `field` is a dotted path into the request (or an object name)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(ServiceError):
    """The object does not exist, or belongs to another tenant (reported identically)."""


class IllegalTransition(ServiceError):
    """A job state/stage change that the state machine forbids, or that lost a race."""

    def __init__(self, job_id: str, current: str, target: str, why: str = "") -> None:
        reason = f"cannot move from {current} to {target}" + (f": {why}" if why else "")
        super().__init__("state", reason)
        self.job_id = job_id
        self.current = current
        self.target = target


class IdempotencyConflict(ServiceError):
    """The Idempotency-Key was already used by this tenant with a different request body."""


class LeaseLost(ServiceError):
    """The caller no longer holds the job's lease (expired and reclaimed, or never held)."""


class InvalidArgument(ServiceError, ValueError):
    """A query argument the service cannot use (unknown state filter, bad limit...)."""


class InvalidCursor(InvalidArgument):
    """A pagination cursor that this service did not produce."""


class SpecRejected(ServiceError, ValueError):
    """A job spec that is valid pydantic but that the service refuses (unknown corpus...)."""


class UnsafePayload(ServiceError, ValueError):
    """An event/audit payload that could carry corpus text (long strings, text fields)."""
