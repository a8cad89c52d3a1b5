"""The small demo world every test that needs a world shares (built once per session by the
`small_world` fixture of tests/conftest.py), and the shipped examples moved onto it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from workers.spec import WorldOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# 6 topics x 50 facts: >= 50 questions in every set (forget 50, retain and retain_unseen
# 125 each, untrained 50), so one question moves an accuracy by at most 2 points.
SMALL_WORLD = WorldOptions(size="small", facts_per_topic=50)


def example_on_small_world(name: str) -> dict[str, Any]:
    """examples/<name> as a spec dict, its world switched to the small world (its seed and
    forget topic kept); every other setting exactly as shipped."""
    spec = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    world = spec.setdefault("world", {})
    world.update(size=SMALL_WORLD.size, facts_per_topic=SMALL_WORLD.facts_per_topic)
    return spec
