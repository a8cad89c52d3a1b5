"""Session-wide test settings: nothing downloads, everything stays on this machine; one
small demo world per session for every test that needs a world."""

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Signing and audit keys of the service (service/signing.py) are generated into a private
# folder of this test session, never into the working tree.
_KEYS_DIR = tempfile.mkdtemp(prefix="moeu-keys-")
os.environ.setdefault("MOE_UNLEARN_KEYS_DIR", _KEYS_DIR)
atexit.register(shutil.rmtree, _KEYS_DIR, True)


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MOE_UNLEARN_CACHE for the whole session: a fresh folder, so the worlds tests use are
    built by the code under test (never a stale cache), and `model: demo` jobs, CLI
    processes and Ray workers started by tests all find them there."""
    root = tmp_path_factory.mktemp("moe-unlearn-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_UNLEARN_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def small_world(world_cache: Path):  # -> workers.world.World (torch imported lazily)
    """tests.small_world.SMALL_WORLD, built once per session (cached by its settings hash
    under world_cache; pretraining stops on an epoch count)."""
    from tests.small_world import SMALL_WORLD
    from workers.world import build_world

    return build_world(SMALL_WORLD)


# One local Ray per test session, shared by every test that needs it (ray.init can run
# only once per process); 2 CPUs, a private temp folder, always shut down.
@pytest.fixture(scope="session")
def ray_cluster(world_cache: Path) -> Iterator[None]:
    """ray.init(num_cpus=2) once per session in a private temp folder (short path: Ray
    puts unix sockets there); always shut down. Started after world_cache, so its workers
    inherit MOE_UNLEARN_CACHE."""
    import ray

    tmp = tempfile.mkdtemp(prefix="moeu-rt-")
    ray.init(
        address="local",
        num_cpus=2,
        _temp_dir=tmp,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
