"""The utility guard and the step-size policy (issue 13): unlearning must not depend on a
learning rate tuned on one world, and must stop before it damages what it should keep.

Both are small typed objects the training loop calls at its stop checks (every
`training.stop.eval_every` steps), with the metrics the stop check measured:

- `UtilityGuard`: remembers the best state that met the forget target (lowest utility
  damage), and says stop when utility falls by more than `utility_drop_tolerance` from the
  start (utility accuracy, absolute; or, without accuracy, the retain NLL's relative rise).
  The caller then restores `guard.restore_state()`: the best state that met the target,
  else the best state seen within tolerance (kept as the job's artifact; the outcome is
  `target_not_met`, and the certificate must say the deletion is incomplete).
- `lr_scale` (lr_policy decay): the step size shrinks as forget accuracy nears its target,
  so the last steps cannot overshoot far below chance (where utility goes with it).
- `GuardedSteps`: what the training loop (workers/train.py) does with both on every rank:
  the baseline, rank 0's verdict, snapshots of the trainable tensors, the restore, the lr
  factor, and the state a resumable checkpoint carries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from workers.devices import MasterWeights
from workers.spec import TrainingOptions

Verdict = Literal["continue", "target", "utility_guard"]
Outcome = Literal["target_met", "target_not_met"]
UTILITY_KEYS = ("utility_accuracy", "retain_loss")


def utility_drop(baseline: Mapping[str, float], now: Mapping[str, float]) -> float:
    """How much utility was lost since `baseline`: the absolute drop of utility_accuracy
    when both have it, else the relative rise of retain_loss (NLL per token)."""
    if "utility_accuracy" in baseline and "utility_accuracy" in now:
        return float(baseline["utility_accuracy"] - now["utility_accuracy"])
    if "retain_loss" in baseline and "retain_loss" in now:
        b = float(baseline["retain_loss"])
        return float((now["retain_loss"] - b) / max(abs(b), 1e-8))
    raise ValueError(
        "the utility guard needs utility_accuracy or retain_loss in the stop check's metrics"
    )


@dataclass
class Checkpoint:
    step: int
    metrics: dict[str, float]
    drop: float
    state: Any  # whatever the caller's snapshot returned (trainable tensors)


@dataclass
class UtilityGuard:
    """Stop before the damage; keep the best state.

    tolerance: allowed utility drop (see `utility_drop`); None = the guard only keeps the
    best state (no stop). forget_target: forget accuracy at or below which the deletion is
    done (None: a forget_loss target, `forget_loss >= forget_loss_target`)."""

    baseline: dict[str, float]
    tolerance: float | None
    forget_target: float | None = None
    forget_loss_target: float | None = None
    best: Checkpoint | None = None  # met the target, least damage
    fallback: Checkpoint | None = None  # within tolerance, lowest forget accuracy / most loss
    history: list[dict[str, float]] = field(default_factory=list)

    def met(self, metrics: Mapping[str, float]) -> bool:
        # Either target, as the loop's stop rule reads them.
        acc, loss = metrics.get("forget_accuracy"), metrics.get("forget_loss")
        if self.forget_target is not None and acc is not None and acc <= self.forget_target:
            return True
        return (
            self.forget_loss_target is not None
            and loss is not None
            and loss >= self.forget_loss_target
        )

    def start(self, snapshot: Callable[[], Any]) -> None:
        """The state before step 1 is the first fallback: if the first check is already past
        the tolerance, the untouched weights are what is put back."""
        self.history.append({"step": 0.0, "drop": 0.0, **self.baseline})
        self.fallback = Checkpoint(0, dict(self.baseline), 0.0, snapshot())

    def check(
        self, step: int, metrics: Mapping[str, float], snapshot: Callable[[], Any]
    ) -> Verdict:
        """At a stop check: 'utility_guard' (stop: utility fell past the tolerance),
        'target' (the forget target is met within tolerance), or 'continue'.
        `snapshot()` is called only when this state may be restored later."""
        drop = utility_drop(self.baseline, metrics)
        self.history.append({"step": float(step), "drop": drop, **metrics})
        within = self.tolerance is None or drop <= self.tolerance
        if not within:
            return "utility_guard"
        if self.met(metrics):
            if self.best is None or drop < self.best.drop:
                self.best = Checkpoint(step, dict(metrics), drop, snapshot())
            return "target"
        if self.fallback is None or _progress(metrics) > _progress(self.fallback.metrics):
            self.fallback = Checkpoint(step, dict(metrics), drop, snapshot())
        return "continue"

    @property
    def outcome(self) -> Outcome:
        return "target_met" if self.best is not None else "target_not_met"

    def restore_state(self) -> Checkpoint | None:
        """The state to put back when training ends on the guard or the step budget: the
        best that met the target, else the most forgetting seen within tolerance."""
        return self.best or self.fallback

    def to_json(self) -> dict[str, Any]:
        keep = self.restore_state()
        return {
            "tolerance": self.tolerance,
            "baseline": self.baseline,
            "outcome": self.outcome,
            "restored_step": None if keep is None else keep.step,
            "restored_metrics": None if keep is None else keep.metrics,
            "history": self.history,
        }


    def state_dict(self) -> dict[str, Any]:
        """Everything but the snapshots' values (a resumable checkpoint carries those)."""
        return asdict(self)

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> UtilityGuard:
        def point(v: Mapping[str, Any] | None) -> Checkpoint | None:
            return None if v is None else Checkpoint(**v)

        return cls(**{**d, "best": point(d["best"]), "fallback": point(d["fallback"]),
                      "history": list(d["history"])})  # fmt: skip


def _progress(metrics: Mapping[str, float]) -> float:
    # More forgetting is more progress: lower accuracy, else higher forget NLL.
    if "forget_accuracy" in metrics:
        return -float(metrics["forget_accuracy"])
    return float(metrics.get("forget_loss", float("-inf")))


def lr_scale(forget_now: float, forget_start: float, target: float, floor: float = 0.2) -> float:
    """lr_policy decay: the factor on the learning rate at a stop check, linear in the
    remaining way to the target: 1.0 at the start, `floor` at (or past) the target."""
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    span = forget_start - target
    if span <= 0:
        return floor
    left = min(max((forget_now - target) / span, 0.0), 1.0)
    return floor + (1.0 - floor) * left


# The lr factor travels between ranks as an int (run.agree reduces int64 by max).
SCALE_QUANTUM = 10**9
Snapshot = tuple[list[torch.Tensor], list[torch.Tensor] | None]  # trainables, float32 masters


class GuardedSteps:
    """The training loop's side of the utility guard and lr_policy decay, on every rank.

    Rank 0 decides at each stop check (`propose`: its guard's stop verdict and the numbers
    every rank acts on), `run.agree` hands those numbers to every rank, and `apply` acts on
    them: snapshot the trainable tensors (and float32 masters) when the guard says this
    state may be put back, drop snapshots it no longer needs, take the new lr factor. At the
    end, `restore_code` (rank 0) and `restore` (every rank) put the guard's state back.
    Snapshots stay on the tensors' device: a few expert slices for SEUF, the model for
    scope full (at most two kept at a time, plus the start until something better)."""

    def __init__(
        self,
        options: TrainingOptions,
        params: list[torch.Tensor],
        master: MasterWeights | None,
        baseline: Mapping[str, float],
        resumed: Mapping[str, Any] | None = None,
    ) -> None:
        stop = options.stop
        self.params, self.master, self.stop = params, master, stop
        self.decay = options.lr_policy == "decay"
        self.baseline = dict(baseline)
        self.guard: UtilityGuard | None = None
        self.scale = 1.0
        self.snaps: dict[int, Snapshot] = {}
        if resumed is not None:  # a resumable checkpoint's `state_dict()`
            self.baseline, self.scale = dict(resumed["baseline"]), float(resumed["scale"])
            self.snaps = {int(k): v for k, v in resumed["snaps"].items()}
            g = resumed["guard"]
            self.guard = UtilityGuard.from_state(g) if g is not None else None
        elif stop.utility_drop_tolerance is not None:
            self.guard = UtilityGuard(
                self.baseline,
                stop.utility_drop_tolerance,
                stop.forget_accuracy_target,
                stop.forget_loss_target,
            )
            self.guard.start(lambda: 0)
            self.snaps[0] = self._take()

    def lr_factor(self, metrics: Mapping[str, float]) -> float:
        """lr_scale from the start's forget score to the target (forget NLL rises to its
        target: negated, so both run downwards)."""
        acc_t, loss_t = self.stop.forget_accuracy_target, self.stop.forget_loss_target
        if acc_t is not None and "forget_accuracy" in metrics:
            return lr_scale(metrics["forget_accuracy"], self.baseline["forget_accuracy"], acc_t)
        assert loss_t is not None  # the spec refuses decay without a target
        return lr_scale(-metrics["forget_loss"], -self.baseline["forget_loss"], -loss_t)

    def propose(self, step: int, checked: Mapping[str, float]) -> tuple[bool, list[int]]:
        """Rank 0, after every step: (whether the guard says stop, the numbers to agree)."""
        stop, snap = False, 0
        if checked and self.guard is not None:
            stop = self.guard.check(step, checked, lambda: step) == "utility_guard"
            snap = int(any(c is not None and c.step == step for c in self._points()))
        scale = self.lr_factor(checked) if checked and self.decay else self.scale
        keep = [0 if c is None else c.step + 1 for c in self._points()]
        agreed = [snap, *keep, round(scale * SCALE_QUANTUM)]
        self.apply(step, agreed)  # now: a state() taken in this step's callback includes it
        return stop, agreed

    def apply(self, step: int, agreed: list[int]) -> None:
        """Every rank: act on rank 0's agreed numbers (see `propose`; idempotent)."""
        snap, best, fallback, scale = agreed
        if snap and step not in self.snaps:
            self.snaps[step] = self._take()
        keep = {k - 1 for k in (best, fallback) if k}
        self.snaps = {s: v for s, v in self.snaps.items() if s in keep}
        self.scale = scale / SCALE_QUANTUM

    @contextmanager
    def scaled(self, opt: torch.optim.Optimizer) -> Iterator[None]:
        """The optimizer steps at the scheduler's lr times the factor; the group lr is put
        back before sched.step() (chainable torch schedulers read it)."""
        kept = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * self.scale
        try:
            yield
        finally:
            for g, lr in zip(opt.param_groups, kept, strict=True):
                g["lr"] = lr

    def restore_code(self) -> int:
        """Rank 0: the step whose state to put back, + 1 (0: none)."""
        keep = self.guard.restore_state() if self.guard is not None else None
        return 0 if keep is None else keep.step + 1

    @torch.no_grad()
    def restore(self, code: int) -> dict[str, float] | None:
        """Every rank: put back the snapshot `restore_code` named; its metrics (rank 0)."""
        if not code:
            return None
        values, masters = self.snaps[code - 1]
        for p, v in zip(self.params, values, strict=True):
            p.copy_(v)
        if self.master is not None and masters is not None:
            self.master.load_state_dict(masters)
        keep = self.guard.restore_state() if self.guard is not None else None
        return None if keep is None else dict(keep.metrics)

    def state_dict(self) -> dict[str, Any]:
        """For a resumable checkpoint: the baseline, the factor, rank 0's guard and the
        snapshots it may still put back (a resumed run keeps all of them)."""
        return {
            "baseline": self.baseline,
            "scale": self.scale,
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "snaps": dict(self.snaps),
        }

    def to_json(self) -> dict[str, Any] | None:
        return self.guard.to_json() if self.guard is not None else None

    def _points(self) -> tuple[Checkpoint | None, Checkpoint | None]:
        g = self.guard
        return (None, None) if g is None else (g.best, g.fallback)

    def _take(self) -> Snapshot:
        values = [p.detach().clone() for p in self.params]
        return values, self.master.state_dict() if self.master is not None else None
