"""Packaging: dependencies (torch exact, the rest ranges), the DeepSpeed configs as package
data checked by DeepSpeed's own config class, a wheel that holds every runtime file and no
bench/tests, and (slow) that wheel installed with --no-deps into a fresh venv which reuses
the installed dependencies, running a DeepSpeed job from outside the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from workers.deepspeed_configs import config_name, load_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- dependencies -----------------------------------------------------------------------


def test_torch_exact_everything_else_a_range() -> None:
    deps = PYPROJECT["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    for d in deps:
        if not d.startswith("torch"):
            assert "==" not in d and ">=" in d and "<" in d, f"{d}: use a compatible range"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(d.startswith("matplotlib") for d in deps)  # the `plot` extra
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    assert "moe-unlearn[plot]" in extras["bench"]
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith("bench") for p in packages)


# --- DeepSpeed configs (package data) ---------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_load_with_deepspeed(stage: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    data = load_deepspeed_config(stage)
    assert '"auto"' not in json.dumps(data)  # "auto" only works through the HF Trainer
    c = DeepSpeedConfig(data)
    assert c.zero_optimization_stage == stage
    assert c.gradient_clipping == 1.0
    assert isinstance(c.train_micro_batch_size_per_gpu, int)
    assert c.train_batch_size == c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps
    assert data["fp16"]["enabled"] is False and data["bf16"]["enabled"] is False
    assert c.zero_allow_untested_optimizer  # a client torch AdamW: no compiled CPU Adam
    if stage == 3:
        # tiny models: shard every parameter (default 1e5 would keep them all unsharded)
        assert c.zero_config.param_persistence_threshold == 0
    # a fresh copy each time: a caller's edits never leak into the next job
    data["zero_optimization"]["stage"] = 99
    assert load_deepspeed_config(stage)["zero_optimization"]["stage"] == stage


def test_deepspeed_config_loader_refuses_unknown_stage_and_validator_bites() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        config_name(4)
    data = load_deepspeed_config(3)
    data["zero_optimization"]["stage3_param_persistance_threshold"] = 0
    with pytest.raises(Exception, match="stage3_param_persistance_threshold"):
        DeepSpeedConfig(data)


def test_runner_takes_the_packaged_config() -> None:
    from workers.runners.deepspeed import deepspeed_config

    cfg = deepspeed_config(3, micro_batch=2, world=4, grad_clip=0.5)
    assert cfg["zero_optimization"] == {**load_deepspeed_config(3)["zero_optimization"]}
    assert (cfg["train_batch_size"], cfg["gradient_clipping"]) == (8, 0.5)


# --- the wheel --------------------------------------------------------------------------


def _tracked(*dirs: str) -> list[str]:
    r = subprocess.run(
        ["git", "ls-files", *dirs], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the tracked files (the build writes its
    scratch folders next to the sources), offline, with the installed setuptools."""
    src = tmp_path_factory.mktemp("src")
    for f in _tracked("."):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = dist.glob("moe_unlearn-*.whl")
    return whl


def test_wheel_holds_every_runtime_file_and_no_bench(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "workers/deepspeed_configs/zero2.json" in names
    assert "workers/deepspeed_configs/zero3.json" in names
    assert "service/migrations/script.py.mako" in names
    # every tracked file under a package ends up in the wheel: a template, config or static
    # file added without a package-data pattern fails here, not on a user's machine
    missing = [f for f in _tracked("api", "service", "workers") if f not in names]
    assert missing == []
    assert not any(n.startswith(("bench/", "tests/", "examples/", "infra/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Dist: torch==2.13.0" in text
    assert 'Requires-Dist: matplotlib<4,>=3.11.2; extra == "plot"' in text


@pytest.mark.slow
def test_wheel_installs_and_runs_a_deepspeed_job(wheel: Path, tmp_path: Path) -> None:
    from tests.engine._tiny_dir import make_tiny_model_dir

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    # reuse the dependencies installed here (torch, ray, deepspeed, ...): appended after the
    # venv's own site-packages, and .pth files there (an editable install of this checkout)
    # are not run, so the project itself can only come from the wheel
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_shared_deps.pth").write_text("\n".join(sorted(shared)) + "\n")
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]

    work = make_tiny_model_dir(tmp_path / "job")
    (work / "spec.yaml").write_text(
        f"model: {work / 'model'}\nalgorithm: gdiff\nforget: {{path: forget.jsonl}}\n"
        "retain: {path: retain.jsonl}\ntraining: {max_steps: 3, batch_size: 8, lr: 0.003}\n"
        "distributed: {num_workers: 1, backend: deepspeed, zero_stage: 2}\n"
    )
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "moe-unlearn" / "torch_extensions")
        ),  # DeepSpeed's compiled CPU comm op, built once per machine
        "MOE_UNLEARN_CACHE": str(tmp_path / "cache"),
    }
    where = subprocess.run(
        [str(py), "-c", "import api, service, workers.deepspeed_configs as d; "
         "print(api.__file__, service.__file__, d.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for f in where.stdout.split():
        assert f.startswith(str(site)), f"{f} does not come from the wheel"

    r = subprocess.run(
        [str(venv / "bin" / "moe-unlearn"), "run", "spec.yaml", "--json", "--output-dir", "out"],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["distributed"]["backend"] == "deepspeed" and res["steps"] == 3
    assert res["after"]["forget_nll"] > res["before"]["forget_nll"]
    assert (work / "out" / "model").is_dir()

    # the migrations ship too: a fresh database upgrades from the installed package
    db = subprocess.run(
        [str(venv / "bin" / "moe-unlearn"), "db", "upgrade"],
        cwd=tmp_path, env=env | {"DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert db.returncode == 0, db.stderr[-2000:]
