"""`moe-unlearn serve` in its default Ray Serve mode: a real local Ray, the FastAPI app in a
Serve replica, real HTTP; SIGINT shuts Serve and Ray down and leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api.serve import absolute_paths
from service.settings import Settings
from tests.api.conftest import FORGET, sha256, spec
from tests.api.serve_kit import ray_serve_process


def test_absolute_paths_resolves_sqlite_and_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray's worker processes need not share the driver's cwd: relative paths must go.
    monkeypatch.chdir(tmp_path)
    s = absolute_paths(Settings(database_url="sqlite:///./var/x.db", data_dir=Path("d")))
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'x.db'}"
    assert s.data_dir == tmp_path / "d"
    pg = "postgresql+psycopg://u:secret@db:5432/mu"
    assert absolute_paths(Settings(database_url=pg)).database_url == pg  # password kept


@pytest.mark.slow
def test_serve_on_ray_serve_then_sigint_leaves_nothing(tmp_path: Path) -> None:
    with ray_serve_process(tmp_path) as served:
        base = served.base
        names = served.record_children()
        # It really is Ray Serve: a Serve replica and Serve's HTTP proxy, under a local Ray.
        assert "ServeReplica" in names and "ProxyActor" in names and "raylet" in names, names

        auth = {"Authorization": f"Bearer {served.key}"}
        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            r = c.post("/v1/corpora", content=FORGET)
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            assert cid == sha256(FORGET)
            r = c.post("/v1/jobs", json=spec(cid))
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["state"] == "QUEUED" and r.headers["location"] == f"/v1/jobs/{job['id']}"
            r = c.get(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["id"] == job["id"]
            assert r.json()["spec"]["forget"]["corpus_id"] == cid
            assert c.get("/v1/jobs").json()["items"][0]["id"] == job["id"]
            # Errors come back as the app's JSON 4xx through the Serve proxy too.
            r = httpx.get(f"{base}/v1/jobs", timeout=10)
            assert r.status_code == 401 and r.json()["errors"][0]["field"] == "Authorization"

        text = served.stop()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/healthz", timeout=2)
        assert "received signal 2; shutting down" in text
