"""`moe-unlearn plan SPEC`: the per-worker memory estimate of a job, without running it.

Exit 0 when it fits the workers (the Ray cluster at RAY_ADDRESS, else this machine), 2 with
one line of numbers when it does not. torch is imported only for `model: demo` (the demo
world's config lives in its cache directory).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from workers.planner import Capacity
    from workers.spec import JobSpec


def model_config(spec: JobSpec) -> dict[str, Any]:
    """config.json of the spec's model: the demo world's, a local directory's, or a hub id's
    from the local hub cache (nothing is downloaded)."""
    from workers.planner import read_config

    if spec.model == "demo":
        from workers.world import load_world

        return read_config(load_world(spec.world).model_dir)
    if Path(spec.model).is_dir():
        return read_config(spec.model)
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(spec.model, "config.json", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any hub error means: not available here
        raise ValueError(
            f"model {spec.model!r} is neither a local directory nor in the local hub cache"
        ) from e
    return read_config(Path(path).parent)


def capacity_for(spec: JobSpec) -> Capacity:
    """What each worker has: the Ray cluster's nodes with RAY_ADDRESS, else this machine."""
    from workers.planner import local_capacity, ray_capacity

    device, workers = spec.distributed.device, spec.distributed.num_workers
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return local_capacity(device, workers)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = ray.nodes()
    finally:
        ray.shutdown()
    gib = os.environ.get("MOE_UNLEARN_GPU_MEMORY_GIB")
    return ray_capacity(nodes, device, workers, int(float(gib) * 2**30) if gib else None)


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Job spec (YAML/JSON).")],
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the plan as one JSON document.")
        ] = False,
    ) -> None:
        """Estimate each worker's peak memory for SPEC and compare it with what the workers
        have. Exit 0 when it fits, 2 (one line with the numbers) when it does not."""
        from workers.model_shape import shape_from_config
        from workers.planner import GiB, estimate
        from workers.spec import load_spec

        spec = load_spec(spec_path)
        shape = shape_from_config(model_config(spec))
        result = estimate(shape, spec, capacity_for(spec))
        if as_json:
            typer.echo(json.dumps(result.as_dict()))
        else:
            typer.echo(
                f"{shape.family}: {result.total_params:,} parameters, "
                f"{result.trainable_params:,} trainable; {result.workers} worker(s) on "
                f"{result.device}, {result.dtype}"
            )
            for name, n in result.parts.items():
                typer.echo(f"  {name:<18} {n / GiB:8.2f} GiB")
            typer.echo(f"  {'total':<18} {result.per_worker_bytes / GiB:8.2f} GiB")
        if not result.fits:
            raise ValueError(result.line())
        if not as_json:
            typer.echo(result.line())
