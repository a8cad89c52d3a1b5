"""`moe-unlearn world build` as `make demo` runs it: a real process, progress lines on
stderr, the world's directory alone on stdout; a second call reuses the cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from api.cli import main; main()"]


def _build(cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "world", "build", "--topics", "2", "--facts-per-topic", "4", "--size", "small"],
        env=os.environ | {"MOE_UNLEARN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # two CLI processes (torch + transformers imports) and a world build
def test_world_build_prints_progress_then_the_directory(tmp_path: Path) -> None:
    first = _build(tmp_path)
    assert first.returncode == 0, first.stderr
    world = Path(first.stdout.strip())
    assert world.parent == tmp_path / "worlds"
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["settings"]["topics"] == 2 and manifest["settings"]["facts_per_topic"] == 4
    assert "pretrain: epoch 1, loss " in first.stderr and "built: hash " in first.stderr
    again = _build(tmp_path)  # from the cache: same directory, nothing trained
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "pretrain:" not in again.stderr
