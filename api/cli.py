"""The `moe-unlearn` command line.

    moe-unlearn serve [--host H] [--port P]     the HTTP API (Ray Serve, or --no-ray-serve for
                                                uvicorn; loopback by default)
    moe-unlearn db upgrade                      apply the database migrations
    moe-unlearn keys create --role R --tenant T print a new API key (once, alone on stdout);
                                                keys list|revoke, models add|list|remove:
                                                api/cli_admin.py

Adding a command (e.g. `run`, `world build`, `patch apply|revert`) is additive:

    @app.command()                      # or: world_app = typer.Typer(); app.add_typer(...)
    def run(spec: Path) -> None:
        from workers.run import run_spec  # import lazily: the CLI must start without torch
        run_spec(load_spec(spec))

Errors a user can cause (raise `UserError`, `ValueError`, a pydantic ValidationError, a
bad option) print one line on stderr and exit with code 2; nothing prints a traceback
unless MOE_UNLEARN_DEBUG=1.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Annotated, Any

import typer
from typer.exceptions import Abort, Exit, TyperException

from api import cli_admin, cli_client, cli_engine, cli_plan, cli_proof

app = typer.Typer(
    name="moe-unlearn",
    help="Remove knowledge from Mixture-of-Experts LLMs by unlearning selected experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
cli_admin.register(app)  # keys create|list|revoke, models add|list|remove
# The engine's commands (run, world build, patch apply|revert): api/cli_engine.py, which
# imports torch only inside its commands.
cli_engine.register(app)
cli_plan.register(app)  # `plan`: the memory planner (api/cli_plan.py)
cli_client.register(app)  # jobs and audit on a remote server: api/cli_client.py
cli_proof.register(app, cli_client.audit_app)  # certificate verify, audit export|verify (issue 15)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""


def is_loopback(host: str) -> bool:
    """True if `host` resolves only to loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        raise UserError(f"--host {host!r} does not resolve: {e}") from e
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _engine(settings: Any) -> Any:
    from service import db

    return db.engine_for(settings)


def _check_migrated(engine: Any) -> None:
    from service import db

    try:
        db.check_migrated(engine)
    except db.DatabaseNotMigrated as e:
        raise UserError(str(e)) from e


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to bind [default: MOE_UNLEARN_HOST or 127.0.0.1]."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="TCP port [default: MOE_UNLEARN_PORT or 8000]."),
    ] = None,
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Apply database migrations before starting.")
    ] = False,
    ray_serve: Annotated[
        bool,
        typer.Option(
            "--ray-serve/--no-ray-serve",
            help="Serve through Ray Serve (a local Ray with MOE_UNLEARN_RAY_NUM_CPUS CPUs, "
            "or RAY_ADDRESS); --no-ray-serve runs plain uvicorn without Ray.",
        ),
    ] = True,
    with_dispatcher: Annotated[
        bool,
        typer.Option(
            "--with-dispatcher",
            help="Also run the dispatcher in this process, sharing Ray Serve's Ray (one Ray "
            "on a single machine). Needs Ray Serve.",
        ),
    ] = False,
) -> None:
    """Start the HTTP API (OpenAPI docs at /docs). Without API keys it binds loopback only."""
    from service import db, keys
    from service.settings import get_settings

    settings = get_settings()
    host = host or settings.host
    port = port or settings.port
    if with_dispatcher and not ray_serve:
        raise UserError(
            "--with-dispatcher needs Ray Serve; with --no-ray-serve run `moe-unlearn "
            "dispatcher` beside it"
        )
    if migrate or settings.migrate_on_start:
        db.upgrade(settings.database_url)
    engine = _engine(settings)
    _check_migrated(engine)
    if not is_loopback(host):
        with db.session_scope(db.make_session_factory(engine)) as s:
            if not keys.any_keys(s):
                raise UserError(
                    f"refusing to bind {host}: no API keys exist; create one with "
                    "`moe-unlearn keys create --role admin --tenant T` or bind 127.0.0.1"
                )
    engine.dispose()
    if ray_serve:
        # RAY SERVE MODE: create_app() in a 0-CPU Serve replica; blocks until SIGINT/SIGTERM.
        from api.serve import run_serve

        run_serve(settings, host=host, port=port, with_dispatcher=with_dispatcher)
        return
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all database migrations (idempotent)."""
    from service import db
    from service.settings import get_settings

    db.upgrade(get_settings().database_url)
    typer.echo("database is at the latest revision", err=True)


@app.command()
def dispatcher(
    once: Annotated[
        bool, typer.Option("--once", help="Exit when nothing is queued or running.")
    ] = False,
    max_jobs: Annotated[
        int | None,
        typer.Option("--max-jobs", min=1, help="Exit after this many jobs have ended."),
    ] = None,
) -> None:
    """Run queued jobs on Ray (local Ray with MOE_UNLEARN_RAY_NUM_CPUS CPUs, or RAY_ADDRESS).
    Ctrl-C / SIGTERM stop it; its running jobs go back to the queue (RETRYING)."""
    from service.dispatcher import run_dispatcher
    from service.settings import get_settings

    settings = get_settings()
    engine = _engine(settings)
    _check_migrated(engine)  # a clear one-line error instead of a traceback
    engine.dispose()
    # handle_signals: ray.init replaces SIGTERM's handler; the dispatcher installs its own.
    stats = run_dispatcher(settings, once=once, max_jobs=max_jobs, handle_signals=True)
    typer.echo(
        f"dispatcher: {stats.claimed} attempt(s), {stats.ended} job(s) ended "
        f"{dict(sorted(stats.finished.items()))}",
        err=True,
    )


def _user_error_types() -> tuple[type[BaseException], ...]:
    # TyperException: bad options, missing arguments, unknown commands (typer's click).
    types: list[type[BaseException]] = [UserError, ValueError, TyperException]
    try:
        from pydantic import ValidationError

        types.append(ValidationError)
    except ImportError:  # pragma: no cover - pydantic is a dependency
        pass
    return tuple(types)


def _one_line(e: BaseException) -> str:
    fmt = getattr(e, "format_message", None)
    msg = fmt() if callable(fmt) else str(e)
    return " ".join(msg.split()) or type(e).__name__


def _debug_setting() -> bool:
    # Settings first: a misspelt MOE_UNLEARN_* variable stops every command (exit 2).
    from service.settings import get_settings

    return get_settings().debug


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the process exit code."""
    cmd = typer.main.get_command(app)
    try:
        debug = _debug_setting()
    except ValueError as e:  # an unknown or invalid MOE_UNLEARN_* variable
        print(f"moe-unlearn: error: {_one_line(e)}", file=sys.stderr)
        return _exit(2, argv)
    try:
        rc = cmd.main(args=argv, prog_name="moe-unlearn", standalone_mode=False)
        code = rc if isinstance(rc, int) else 0
    except Abort:
        print("moe-unlearn: aborted", file=sys.stderr)
        code = 130
    except Exit as e:
        code = e.exit_code
    except _user_error_types() as e:
        if debug:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # the help was already printed
            return _exit(2, argv)
        print(f"moe-unlearn: error: {_one_line(e)}", file=sys.stderr)
        code = 2
    except Exception as e:  # noqa: BLE001 - last line of defence: no traceback for users
        if debug:
            raise
        print(
            f"moe-unlearn: internal error: {type(e).__name__}: {_one_line(e)} "
            "(set MOE_UNLEARN_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        code = 1
    return _exit(code, argv)


def _exit(code: int, argv: list[str] | None) -> int:
    # As a console script (argv None) exit the process; called from Python, return.
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
