"""The one progress channel between a running job and whoever watches it (torch-free: the
dispatcher imports it without the engine).

`ProgressChannel` is a plain class made into a 0-CPU Ray actor by `start_channel()`. It is
used twice with the same type: by the dispatcher (one per attempt: the attempt's task puts,
the dispatcher drains and may request a stop) and by a Ray Train run (its ranks put, the
driver drains and forwards to its Reporter, and rank 0 hands over how the run ended).
Calls from one caller run in submission order, so the buffer keeps each sender's order.

What crosses it is typed (frozen dataclasses, pickled by Ray):
    StageStarted(name)               a job stage began (workers.pipeline.STAGES)
    JobEvent(kind, step, payload)    a progress event (step, evaluation, rank_started...)
    AttemptStarted(pid, host, ...)   the attempt's process is up (the dispatcher's record)
    RunOutcome(status, step, ...)    how a Ray Train run ended (set by rank 0, read once)

Stopping: `ChannelReporter.should_stop` is what a runner passes as `should_stop`; the one
pipeline polls it every training step and at every stage boundary (raising JobCancelled),
so a reporter never raises to ask for a stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.events import RANK_STARTED, RANK_STOPPED  # re-exported: every runner emits them


@dataclass(frozen=True)
class StageStarted:
    name: str


@dataclass(frozen=True)
class JobEvent:
    kind: str
    step: int
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptStarted:
    pid: int
    host: str
    num_workers: int
    runner: Literal["process", "ray_train"]


Message = StageStarted | JobEvent | AttemptStarted


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, handed from rank 0 to the driver. `message`: for "failed"."""

    status: Literal["succeeded", "cancelled", "failed"]
    step: int = 0
    message: str = ""


class ProgressChannel:
    """Ordered progress messages, the stop flag, and the outcome hand-off."""

    def __init__(self) -> None:
        self._items: list[Message] = []
        self._stop = False
        self._outcome: RunOutcome | None = None

    def put(self, item: Message) -> None:
        self._items.append(item)

    def drain(self) -> list[Message]:
        items, self._items = self._items, []
        return items

    def request_stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop

    def ping(self) -> bool:
        """Returns once every earlier call of the same caller has run (a flush)."""
        return True

    def set_outcome(self, outcome: RunOutcome) -> None:
        self._outcome = outcome

    def outcome(self) -> RunOutcome | None:
        return self._outcome


def start_channel() -> Any:
    """A new ProgressChannel actor (0 CPUs, never restarted: a lost channel is a lost run)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressChannel).remote()


class ChannelReporter:
    """A workers.pipeline.Reporter that forwards to a channel actor (fire-and-forget, in
    order), and a `should_stop` that reads its stop flag at most every `poll_s` seconds
    (it is polled every training step)."""

    def __init__(self, channel: Any, poll_s: float = 0.2) -> None:
        self.channel = channel
        self.poll_s = poll_s
        self._checked = float("-inf")
        self._stop = False

    def stage(self, name: str) -> None:
        self._checked = float("-inf")  # ask again at the next boundary check
        self.channel.put.remote(StageStarted(name))

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        self.channel.put.remote(JobEvent(kind, int(step), payload))

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.poll_s:
            import ray

            self._checked = now
            self._stop = bool(ray.get(self.channel.should_stop.remote()))
        return self._stop

    def flush(self) -> None:
        import ray

        ray.get(self.channel.ping.remote())


__all__ = [
    "RANK_STARTED",
    "RANK_STOPPED",
    "AttemptStarted",
    "ChannelReporter",
    "JobEvent",
    "Message",
    "ProgressChannel",
    "RunOutcome",
    "StageStarted",
    "start_channel",
]
