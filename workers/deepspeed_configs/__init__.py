"""The shipped DeepSpeed ZeRO configs (package data, so an installed wheel has them).

zero2.json (stages 1 and 2) and zero3.json: fp32 (CPU), gradient clipping 1.0, concrete
micro batch (the runner overwrites the batch sizes and clipping from the job spec), no
`optimizer` section (the runner passes a client torch AdamW). infra/OPERATIONS.md says how
to switch them to bf16 for GPUs.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

STAGES = (1, 2, 3)


def config_name(stage: int) -> str:
    """The file that holds `stage`: zero3.json for 3, zero2.json for 1 and 2."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage}")
    return "zero3.json" if stage == 3 else "zero2.json"


def load_deepspeed_config(stage: int) -> dict[str, Any]:
    """A fresh copy of the shipped config for `stage` (its `stage` field set to `stage`)."""
    text = resources.files(__package__).joinpath(config_name(stage)).read_text("utf-8")
    cfg: dict[str, Any] = json.loads(text)
    cfg["zero_optimization"]["stage"] = stage
    return cfg
