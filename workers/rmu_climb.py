"""RMU's projected fallback steers one layer higher when forgetting stalls (issue 13).

Under auto's full fallback with every matrix projected (workers/projected_fallback.py),
RMU steers layer n_layers // 4 (seuf_plan.fallback_rmu_layer). On most worlds that
forgets; on some builds of a world, forgetting stalls just above the target there while
the next layer up forgets (qwen2_moe s4069 on one build: 0.40 after 1000 steps at layer
1, 0.30 in 81 at layer 2; layer 2 in turn stalled on two other worlds). No one layer
served every world. So when forget accuracy has made no new low for
`seuf.fallback_rmu_patience` steps, the objective steers the next decoder layer's MoE
block, up to the last layer; each climb gets a patience of its own.

The higher block's retain reference is taken from the model at the climb, not from the
original model: the original weights are gone by then, and keeping every layer's retain
activations from the start would multiply RMU's largest memory cost by the layer count.
Under the projection the retain activations at every layer stay where they were (retain
routing overlap 0.93-0.99 on the sweep), so the model at the climb stands in for the
original closely, and the climb is recorded (result.json `fallback_rmu_climbs`, an event,
the certificate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from workers.data import TokenizedCorpus
from workers.moe.base import MoEAdapter
from workers.objectives import Objective
from workers.reference import set_rmu_reference
from workers.train import RESTORING_STOPS

Climb = dict[str, float]


@dataclass
class RmuClimb:
    """Watches the forget check (workers.train's `observer`) and moves RMU's steered block
    up one layer after `patience` steps without progress (a new low of forget accuracy;
    without accuracy, a new high of the forget loss)."""

    objective: Objective
    model: nn.Module
    adapter: MoEAdapter
    retain: TokenizedCorpus
    patience: int
    layer: int  # the layer steered now
    seed: int = 0  # RMU's direction seed (the same direction at every layer)
    batch_size: int = 16
    notify: Callable[[Climb], None] | None = None
    best: float = float("inf")  # the lowest score seen: forget accuracy, or -forget loss
    since: int = 0  # the step of that low, or of the last climb
    climbs: list[Climb] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.patience <= 0:
            raise ValueError("RmuClimb needs a patience of at least one step")
        if self.objective.name != "rmu" or self.objective.capture is None:
            raise ValueError("RmuClimb steers RMU's captured block: objective 'rmu' only")
        if self.objective.capture is not self._block(self.layer):
            raise ValueError(f"RMU does not steer layer {self.layer}'s MoE block")

    @property
    def top(self) -> int:
        return len(self.adapter.decoder_layers()) - 1

    def observe(self, step: int, checked: Mapping[str, float]) -> None:
        """After a forget check that did not stop training (not at the last step).
        Progress is a new low of forget accuracy, or, where the check measures no accuracy
        (a real model's job stops on forget_loss), a new high of the forget loss."""
        acc, loss = checked.get("forget_accuracy"), checked.get("forget_loss")
        if acc is None and loss is None:
            return
        score = float(acc) if acc is not None else -float(loss)  # type: ignore[arg-type]
        if score < self.best:
            self.best, self.since = score, step
            return
        if self.layer >= self.top or step - self.since < self.patience:
            return
        climb: Climb = {
            "step": step,
            "from_layer": self.layer,
            "to_layer": self.layer + 1,
            # forget accuracy, or minus the forget loss where no accuracy is measured
            "forget_accuracy" if acc is not None else "minus_forget_loss": score,
            "best_forget_accuracy" if acc is not None else "best_minus_forget_loss": self.best,
        }
        self.steer(self.layer + 1)
        self.since = step
        self.climbs.append(climb)
        if self.notify is not None:
            self.notify(climb)

    def steer(self, layer: int) -> None:
        """Steer `layer`'s MoE block from now on, with its retain reference from the model
        as it is now."""
        if self.objective.reference is None:
            raise ValueError("RmuClimb needs the objective's reference (prepare_reference)")
        module = self._block(layer)
        set_rmu_reference(
            self.objective.reference, self.model, module, self.retain, self.seed, self.batch_size
        )
        self.objective.capture = module
        self.layer = layer

    def _block(self, layer: int) -> nn.Module:
        if not 0 <= layer <= self.top:
            raise ValueError(f"layer {layer} out of range: the model has {self.top + 1} layers")
        return self.adapter.decoder_layers()[layer].mlp

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "best": self.best,
            "since": self.since,
            "climbs": [dict(c) for c in self.climbs],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A resumed run steers where the checkpoint did. Its reference is taken from the
        restored model (the one at the climb's step is not kept: one layer's retain
        activations can be gigabytes), so after a climb a resumed run is close to the
        uninterrupted one, not bit-identical."""
        if int(state["layer"]) != self.layer:
            self.steer(int(state["layer"]))
        self.best, self.since = float(state["best"]), int(state["since"])
        self.climbs = [dict(c) for c in state["climbs"]]


def kept_climbs(
    climb: RmuClimb | None, stopped_by: str, guard: Mapping[str, Any] | None
) -> list[Climb]:
    """The climbs that shaped the weights the job keeps: where the utility guard put back
    an earlier state (on its stop or the step budget: workers/train.py), those before
    that state's step; else all."""
    if climb is None:
        return []
    kept = (guard or {}).get("restored_step") if stopped_by in RESTORING_STOPS else None
    return [c for c in climb.climbs if kept is None or c["step"] < kept]
