"""The engine's commands of `moe-unlearn` (library mode, no server):

    moe-unlearn run SPEC [--output-dir D] [--json]   unlearn as a job spec says (several
                                                     workers: on a private local Ray Train)
    moe-unlearn world build [--seed S] [--topics N] [--facts-per-topic F] [--arch A]
    moe-unlearn patch apply|revert --model DIR --patch FILE --out DIR

torch and the engine are imported inside the commands, so `moe-unlearn serve` stays light.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:  # the engine is imported inside the commands (module docstring)
    from workers.run import Reporter
    from workers.spec import JobSpec

world_app = typer.Typer(help="The built-in demo world.", no_args_is_help=True)
patch_app = typer.Typer(help="Expert patches.", no_args_is_help=True)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class _RichReporter:
    """Stages as a status line and unlearning steps as a progress bar, on stderr."""

    def __init__(self, max_steps: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=_console(),
            transient=False,
        )
        self.max_steps = max_steps
        self.task: Any = None

    def __enter__(self) -> _RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, name: str) -> None:
        if name == "unlearning":
            self.task = self.progress.add_task("unlearning", total=self.max_steps)
        else:
            self.progress.console.print(f"[bold]{name.replace('_', ' ')}[/bold]")

    def event(self, kind: str, step: int, payload: dict[str, Any]) -> None:
        if kind == "step" and self.task is not None:
            loss = payload.get("loss", 0.0)
            acc = payload.get("metrics", {}).get("forget_accuracy")
            desc = f"unlearning loss {loss:+.3f}"
            if acc is not None:
                desc += f" forget {acc:.2f}"
            self.progress.update(self.task, completed=step, description=desc)
        elif kind == "experts_selected":
            sel = ", ".join(f"L{s['layer']}E{s['expert']}" for s in payload["selected"]) or "-"
            self.progress.console.print(f"  {payload['method']} attribution selected: {sel}")


def before_after_table(res: dict[str, Any]) -> Any:
    """The before/after table a person reads (rich Table)."""
    from rich.table import Table

    t = Table(title=f"{res['algorithm']} / {res['scope']}: before -> after")
    t.add_column("measure", no_wrap=True)  # a long verdict wraps, not the labels
    t.add_column("before", justify="right")
    t.add_column("after", justify="right", overflow="fold")
    rows = [
        ("forget accuracy (lower is better)", "forget_accuracy"),
        ("utility accuracy (retain pool)", "utility_accuracy"),
        ("utility accuracy (never seen by unlearning)", "utility_accuracy_unseen"),
        ("utility accuracy (topics retain never covers)", "utility_accuracy_uncovered_topics"),
    ]
    for label, key in rows:
        b, a = res["before"].get(key), res["after"].get(key)
        if b is not None or a is not None:
            t.add_row(label, _fmt(b), _fmt(a))
    for task, v in res["after"].get("tasks", {}).items():
        t.add_row(f"lm-eval {task}", _fmt(res["before"].get("tasks", {}).get(task)), _fmt(v))
    t.add_row("routing overlap on forget data", "1.000", _fmt(res["routing_overlap_forget"]))
    if res.get("routing_overlap_retain_from_target") is not None:
        t.add_row("routing overlap on retain data (target layer up)", "1.000",
                  _fmt(res["routing_overlap_retain_from_target"]))
    t.add_row(
        "trainable parameters",
        "",
        f"{res['trainable_parameters']:,} / {res['total_parameters']:,}"
        f" ({100 * res['tunable_ratio']:.2f}%)",
    )
    sel = ", ".join(f"layer {s['layer']} expert {s['expert']}" for s in res["selected"]) or "all"
    t.add_row("unlearned", "", sel)
    t.add_row("steps (stopped by)", "", f"{res['steps']} ({res['stopped_by']})")
    for check in res.get("robustness") or []:  # the verdicts the certificate will carry
        why = check.get("reason") if check["verdict"] != "pass" else None
        verdict = check["verdict"] + (f" ({why})" if why else "")
        t.add_row(f"robustness: {check['check']}", "", verdict)
    met = res.get("target_met")
    if met is not None:  # the service ends such a job FAILED (target_not_met)
        t.add_row("forget target", "", "met" if met else "NOT met: the deletion is incomplete")
    return t


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (libraries log there, e.g. DeepSpeed on import)
    to stderr at the file-descriptor level, so stdout carries only our result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON.")],
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where outputs go.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Unlearn as SPEC says: evaluate, attribute, unlearn, evaluate, write model + patch."""
    from workers.spec import load_spec

    job = load_spec(spec)
    from workers.run import run_job

    out = output_dir or Path("runs") / f"{spec.stem}-{job.spec_hash()[:10]}"
    with _stdout_to_stderr(), _RichReporter(job.training.max_steps) as rep:
        if job.distributed.uses_ray_train:
            res = _run_on_ray_train(job, out, rep).to_json()
        else:
            res = run_job(job, out, reporter=rep).to_json()
    if as_json:
        sys.stdout.write(json.dumps(res, default=str) + "\n")
    else:
        from rich.console import Console

        Console().print(before_after_table(res))
        Console().print(f"outputs in {res['output_dir']}")


def _run_on_ray_train(job: JobSpec, out: Path, rep: Reporter) -> Any:  # a JobResult
    """Several workers or DeepSpeed: a private local Ray with one CPU per worker, a Ray
    Train run checkpointed under OUT/checkpoints (the same command resumes it after a
    crash: the run name is the spec's hash), all of it gone when the run ends."""
    import shutil
    import tempfile

    import ray

    from workers.runners.ray_train import run_job_distributed

    tmp = tempfile.mkdtemp(prefix="moeu-run-")  # short: Ray puts unix sockets there
    storage = Path(out) / "checkpoints"
    ray.init(
        address="local",
        num_cpus=job.distributed.num_workers,
        _temp_dir=tmp,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        res = run_job_distributed(
            job, out, rep, None, storage, run_name=f"run-{job.spec_hash()[:12]}"
        )
        shutil.rmtree(storage, ignore_errors=True)
        return res
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@world_app.command("build")
def world_build(
    seed: Annotated[int, typer.Option(min=0)] = 0,
    topics: Annotated[int, typer.Option(min=2, max=32)] = 6,
    facts_per_topic: Annotated[int, typer.Option(min=4, max=2000)] = 100,
    arch: Annotated[str, typer.Option(help="MoE family (model_type).")] = "qwen2_moe",
    size: Annotated[
        Literal["full", "small"], typer.Option(help="small: the fast test-size model.")
    ] = "full",
    topic_router_margin: Annotated[
        int | None,
        typer.Option(min=0, max=64, help="Seed one expert per topic this hard (24: localised)."),
    ] = None,
) -> None:
    """Build (or reuse from the cache) the demo world and print its directory."""
    from workers.spec import WorldOptions
    from workers.world import build_world

    con = _console()
    opts = WorldOptions(
        seed=seed,
        topics=topics,
        facts_per_topic=facts_per_topic,
        arch=arch,
        size=size,
        topic_router_margin=topic_router_margin,
    )
    with _stdout_to_stderr():
        world = build_world(opts, progress=lambda kind, info: con.print(_progress_line(kind, info)))
    typer.echo(str(world.path))


def _progress_line(kind: str, info: dict[str, Any]) -> str:
    """One line of world-build progress: 'pretrain: epoch 3, loss 1.234, ...'."""
    parts = [f"{k.replace('_', ' ')} {f'{v:.3f}' if isinstance(v, float) else v}"
             for k, v in info.items()]  # fmt: skip
    return f"{kind}: " + ", ".join(parts)


def _patch(model: Path, patch: Path, out: Path, revert: bool) -> None:
    from workers.patch import patch_model_dir

    if not model.is_dir():
        raise ValueError(f"--model {model} is not a directory")
    p = patch_model_dir(model, patch, out, revert=revert)
    verb = "reverted" if revert else "applied"
    _console().print(f"{verb} {len(p.regions)} region(s); model written to {out}")


@patch_app.command("apply")
def patch_apply(
    model: Annotated[Path, typer.Option(help="Base model directory.")],
    patch: Annotated[Path, typer.Option(help="expert_patch.safetensors")],
    out: Annotated[Path, typer.Option(help="Where the patched model is written.")],
) -> None:
    """Apply an expert patch to its base model (checked by hash, bit-exact)."""
    _patch(model, patch, out, revert=False)


@patch_app.command("revert")
def patch_revert(
    model: Annotated[Path, typer.Option(help="Patched model directory.")],
    patch: Annotated[Path, typer.Option(help="expert_patch.safetensors")],
    out: Annotated[Path, typer.Option(help="Where the restored base model is written.")],
) -> None:
    """Undo an expert patch: the base model comes back bit-exactly."""
    _patch(model, patch, out, revert=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.add_typer(world_app, name="world")
    app.add_typer(patch_app, name="patch")
