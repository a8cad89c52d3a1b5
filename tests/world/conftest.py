"""The world tests read the session's small world (tests/conftest.py::small_world)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.world import World


@pytest.fixture(scope="session")
def worlds_dir(world_cache: Path, small_world: World) -> Path:
    return small_world.path.parent


@pytest.fixture(scope="session")
def small_model(small_world: World):
    return small_world.load_model()


@pytest.fixture(scope="session")
def small_tokenizer(small_world: World):
    return small_world.load_tokenizer()
