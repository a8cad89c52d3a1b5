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
- `choose_probe_lr` (lr_policy probe): a few steps at each candidate step size from the
  same start; the largest one that moved forget without breaking the tolerance wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

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
        if self.forget_target is not None and "forget_accuracy" in metrics:
            return metrics["forget_accuracy"] <= self.forget_target
        if self.forget_loss_target is not None and "forget_loss" in metrics:
            return metrics["forget_loss"] >= self.forget_loss_target
        return False

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


@dataclass(frozen=True)
class ProbeResult:
    """A few steps at one learning rate from the job's start state."""

    lr: float
    forget_before: float
    forget_after: float
    drop: float  # utility_drop after the probe


def choose_probe_lr(
    probes: Sequence[ProbeResult], tolerance: float, chance: float | None = None
) -> float:
    """lr_policy probe: the largest learning rate whose probe kept utility within
    `tolerance`, moved forget accuracy, and (with `chance`) did not overshoot below it;
    else the smallest candidate (safest)."""
    if not probes:
        raise ValueError("no probe results")
    ok = [
        p
        for p in probes
        if p.drop <= tolerance
        and p.forget_after < p.forget_before
        and (chance is None or p.forget_after >= chance - 0.05)
    ]
    if ok:
        return max(p.lr for p in ok)
    return min(p.lr for p in probes)
