"""Session-wide test settings: nothing downloads, everything stays on this machine."""

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

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


# One local Ray per test session, shared by every test that needs it (ray.init can run
# only once per process); 2 CPUs, a private temp folder, always shut down.
@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """ray.init(num_cpus=2) once per session in a private temp folder (short path: Ray
    puts unix sockets there); always shut down."""
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
