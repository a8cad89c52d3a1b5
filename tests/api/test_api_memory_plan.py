"""Submit-time memory plan (issues 12 and 14): a job whose per-worker peak memory, as the
planner estimates it from the registered model's config.json and the spec, exceeds what a
worker has is refused with 422 on `model`, giving the numbers and a way out; a job that fits
is accepted. The model here is the real-shape Qwen1.5-MoE-A2.7B with 2 layers (config only:
nothing is loaded at submit)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import FORGET, RETAIN, Keys, spec, upload

QWEN = Path(__file__).resolve().parents[2] / "bench" / "configs" / "qwen1.5-moe-a2.7b.json"


def test_a_job_that_cannot_fit_a_worker_is_refused_with_the_numbers(
    client: TestClient, api_keys: Keys, tight: Any, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "qwen").mkdir(parents=True)
    cfg = {k: v for k, v in json.loads(QWEN.read_text()).items() if not k.startswith("_")}
    (root / "qwen" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    _, c = tight(model_dir=root, worker_memory_gib=24.0)
    name = f"qwen-{uuid.uuid4().hex[:6]}"
    r = c.post("/v1/models", json={"id": name, "path": "qwen"}, headers=Keys.h(api_keys.admin))
    assert r.status_code == 201, r.text
    req = Keys.h(api_keys.requester)
    fid, rid = upload(c, api_keys.requester, FORGET), upload(c, api_keys.requester, RETAIN)

    full = spec(fid, rid, model=name)
    full.update(scope="full", training={"dtype": "float32"})
    r = c.post("/v1/jobs", json=full, headers=req)
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "model"
    assert "GiB per worker" in err["reason"] and "24.0 GiB" in err["reason"]
    assert "bfloat16" in err["reason"]  # a way out

    # The default SEUF job (num_experts auto) is planned at its parameter budget: accepted.
    # Its full-parameter fallback would not fit: the worker stops instead of falling back.
    seuf = spec(fid, rid, model=name)
    seuf["training"] = {"dtype": "bfloat16"}
    r = c.post("/v1/jobs", json=seuf, headers=req)
    assert r.status_code == 202, r.text
    # A budget as large as the model is planned as such: refused, told how to bound it.
    seuf["seuf"] = {"parameter_budget": 1.0}
    r = c.post("/v1/jobs", json=seuf, headers=req)
    assert r.status_code == 422, r.text
    assert "seuf.parameter_budget" in r.json()["errors"][0]["reason"]
    seuf["seuf"] = {"num_experts": 1}
    r = c.post("/v1/jobs", json=seuf, headers=req)
    assert r.status_code == 202, r.text


def test_a_cuda_job_needs_a_gpu_per_worker(
    client: TestClient, api_keys: Keys, tight: Any
) -> None:
    """`distributed.device: cuda` takes one GPU per worker: refused beyond
    MOE_UNLEARN_CLUSTER_GPUS (0 by default), accepted within it."""
    req = Keys.h(api_keys.requester)
    fid = upload(client, api_keys.requester, FORGET)
    body = spec(fid, distributed={"device": "cuda", "num_workers": 2})
    r = client.post("/v1/jobs", json=body, headers=req)
    assert r.status_code == 422, r.text
    err = r.json()["errors"][0]
    assert err["field"] == "distributed.device" and "needs 2 GPUs" in err["reason"]
    _, c = tight(cluster_gpus=2)
    fid = upload(c, api_keys.requester, FORGET)
    ok = c.post("/v1/jobs", json=spec(fid, distributed={"device": "cuda", "num_workers": 2}),
                headers=req)
    assert ok.status_code == 202, ok.text
