"""Shared helpers of the service tests (not a test module)."""

from __future__ import annotations

from typing import Any

from workers.spec import JobSpec


def demo_spec(**over: Any) -> JobSpec:
    data: dict[str, Any] = {"forget": {"demo": "forget"}, "retain": {"demo": "retain"}}
    data.update(over)
    return JobSpec.model_validate(data)
