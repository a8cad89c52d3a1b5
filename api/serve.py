"""The HTTP API as a Ray Serve deployment with a FastAPI ingress (`moe-unlearn serve`).

    moe-unlearn serve [--host 127.0.0.1] [--port 8000]     # Ray Serve (default)
    moe-unlearn serve --with-dispatcher                     # + the dispatcher, same Ray
    moe-unlearn serve --no-ray-serve                        # plain uvicorn, no Ray

`run_serve(settings, host, port)` starts (or joins, with `settings.ray_address`) Ray,
deploys `ApiDeployment` (one replica running `api.app.create_app(settings)`) behind Serve's
HTTP proxy on host:port, and blocks until SIGINT or SIGTERM; then it deletes the
application, shuts Serve down and, if it started Ray, stops Ray, so no process is left.

CPU budget. The replica is an actor with `num_cpus=0` (REPLICA_NUM_CPUS): it still runs and
uses CPU time, but it reserves no logical CPU, so all of Ray's `ray_num_cpus` stay free
for the training workers. A fraction is not harmless: with 0.1 CPU reserved, a 2 x 1-CPU
TorchTrainer on a 2-CPU Ray waits forever for its placement group (measured, see
/work/scratch/ray/FINDINGS.md section 4). Serve's controller and HTTP proxy reserve 0 CPUs
by default as well. To give the API guaranteed CPUs on a cluster, run more Ray CPUs than
training uses and pass `replica_num_cpus`.

Ray's files (session logs, sockets) go to `service.executor.ray_temp_dir(settings)`:
`settings.ray_temp_dir`, else `<data_dir>/ray` when that path is short enough for unix
sockets, else `/tmp/moeu-ray-<hash of the data dir>`; Serve's access logs are under
`<temp dir>/session_latest/logs/serve/`.

The same deployment runs under `serve run` / a KubeRay RayService through `app_builder`
(import path `api.serve:app`, an alias), with settings read from the replica's environment.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from ray import serve
from sqlalchemy.engine import make_url

from service.settings import Settings

log = logging.getLogger(__name__)

APP_NAME = "moe-unlearn"
DEPLOYMENT_NAME = "moe-unlearn-api"
# Reserve no logical CPU: the training workers need every CPU Ray has (module docstring).
REPLICA_NUM_CPUS = 0.0
# Serve's default is 5 concurrent requests per replica; SSE event streams hold a request
# open for the life of a job, so 5 watchers would block every other call.
MAX_ONGOING_REQUESTS = 256


@serve.deployment(
    name=DEPLOYMENT_NAME,
    num_replicas=1,
    ray_actor_options={"num_cpus": REPLICA_NUM_CPUS},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
)
@serve.ingress()  # FastAPI ingress, late-bound: the app is built in the replica (below)
class ApiDeployment:
    """One Serve replica serving `create_app(settings)`. The app is built inside the replica
    process (`__serve_build_asgi_app__`), not pickled from the driver: it owns a database
    engine and connection pool, which must be created where they are used."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        from api.app import create_app

        return create_app(self._settings)


def absolute_paths(settings: Settings) -> Settings:
    """`settings` with the data dir and a SQLite database path made absolute: Ray's worker
    processes need not share the driver's working directory."""
    update: dict[str, Any] = {"data_dir": settings.data_dir.expanduser().resolve()}
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_path = Path(url.database).expanduser().resolve()
        update["database_url"] = url.set(database=str(db_path)).render_as_string(
            hide_password=False
        )
    return settings.model_copy(update=update)


def app_builder(args: dict[str, str]) -> Any:
    """Serve application builder for `serve run api.serve:app_builder` or a RayService
    (`import_path: api.serve:app_builder`): settings come from the replica's environment
    (DATABASE_URL, MOE_UNLEARN_*). `args` may set `replica_num_cpus`."""
    settings = absolute_paths(Settings())
    cpus = float(args.get("replica_num_cpus", REPLICA_NUM_CPUS))
    return ApiDeployment.options(ray_actor_options={"num_cpus": cpus}).bind(settings)


# The import path a KubeRay RayService would name (infra/k8s runs the api as a Deployment).
app = app_builder


class _StopFlag:
    """Set by SIGINT/SIGTERM; the main thread polls it. The handlers only set a flag, so
    a signal can never interrupt the shutdown sequence half-way."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum
        self.event.set()

    def install(self) -> None:
        # ray.init() installs its own SIGTERM handler (sys.exit): install ours after it.
        signal.signal(signal.SIGINT, self.handler)
        signal.signal(signal.SIGTERM, self.handler)


def run_serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    replica_num_cpus: float = REPLICA_NUM_CPUS,
    with_dispatcher: bool = False,
) -> None:
    """Serve the API through Ray Serve on host:port until SIGINT/SIGTERM, then shut down
    Serve and (if this call started it) Ray. Must run on the main thread (signals).

    with_dispatcher: also run the dispatcher loop in this process, on the same Ray (one
    Ray for the API and the training workers on a single machine; else the dispatcher
    would start a second Ray). On a signal it hands its running job back (RETRYING)."""
    import ray

    from service.executor import init_ray, ray_temp_dir

    if replica_num_cpus < 0:
        raise ValueError(f"replica_num_cpus must be >= 0, got {replica_num_cpus}")
    settings = absolute_paths(settings)
    stop = _StopFlag()
    started_ray = False
    deployed = False
    try:
        if not settings.ray_address:
            settings = settings.model_copy(update={"ray_temp_dir": ray_temp_dir(settings)})
        started_ray = init_ray(settings)
        stop.install()
        where = settings.ray_address or (
            f"local, {settings.ray_num_cpus} CPUs, temp dir {settings.ray_temp_dir}"
        )
        _say(f"Ray ready ({where}); deploying the API on Ray Serve ...")
        serve.start(http_options={"host": host, "port": port})
        application = ApiDeployment.options(ray_actor_options={"num_cpus": replica_num_cpus}).bind(
            settings
        )
        deployed = True
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        _say(f"serving on http://{host}:{port} (Ray Serve; OpenAPI docs at /docs)")
        if with_dispatcher:
            from service.dispatcher import run_dispatcher

            _say("running the dispatcher in this process, on the same Ray")
            run_dispatcher(settings, stop_event=stop.event)  # returns once the flag is set
        while not stop.event.wait(0.5):
            pass
        _say(f"received signal {stop.signal}; shutting down")
    except KeyboardInterrupt:  # SIGINT before our handler was installed (during ray.init)
        _say("interrupted; shutting down")
    finally:
        # A second Ctrl-C must not cut the clean-up short (it would leave Ray running).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                _stop_serve(own_ray=started_ray, deployed=deployed)
        finally:
            if started_ray:
                ray.shutdown()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_serve(*, own_ray: bool, deployed: bool) -> None:
    try:
        if own_ray:
            serve.shutdown()  # our private Ray: take all of Serve down with it
        elif deployed:
            # A shared cluster may serve other applications: remove only ours.
            serve.delete(APP_NAME)
    except Exception as e:  # noqa: BLE001 - shutting down anyway; ray.shutdown() follows
        log.warning("Ray Serve shutdown: %s: %s", type(e).__name__, e)


def _say(msg: str) -> None:
    print(f"moe-unlearn serve: {msg}", file=sys.stderr, flush=True)


__all__ = ["APP_NAME", "ApiDeployment", "absolute_paths", "app", "app_builder", "run_serve"]
