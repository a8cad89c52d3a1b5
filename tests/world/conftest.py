"""One small demo world (6 topics x 12 facts, hidden-64 model) shared by the world tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.spec import WorldOptions
from workers.world import TINY_SETTINGS, World, build_world

SMALL = WorldOptions(seed=0, topics=6, facts_per_topic=12)


@pytest.fixture(scope="session")
def worlds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worlds")


@pytest.fixture(scope="session")
def small_world(worlds_dir: Path) -> World:
    return build_world(SMALL, cache_dir=worlds_dir, pretrain=TINY_SETTINGS)


@pytest.fixture(scope="session")
def small_model(small_world: World):
    return small_world.load_model()


@pytest.fixture(scope="session")
def small_tokenizer(small_world: World):
    return small_world.load_tokenizer()
