"""Admin commands of `moe-unlearn` (issue 14): API keys and registered models.

    moe-unlearn keys create --role R --tenant T [--expires 30d|ISO] [--platform]
    moe-unlearn keys list [--tenant T]      one line per key (id, tenant, role, created,
                                            expires, revoked); never a secret
    moe-unlearn keys revoke KEY_ID          refused from the next request on (audited)
    moe-unlearn models add ID (--hub-id ORG/NAME --revision REV | --path DIR)
    moe-unlearn models list
    moe-unlearn models remove ID

These act on the database directly (an operator's commands, actor `cli`). User errors
raise ValueError: `api.cli.main` prints them as one line with exit code 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
models_app = typer.Typer(
    help="Models remote clients may name (besides demo and job:<id>).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(models_app, name="models")


@contextmanager
def _session() -> Iterator[Any]:
    from service import db
    from service.errors import ServiceError
    from service.settings import get_settings

    engine = db.engine_for(get_settings())
    try:
        try:
            db.check_migrated(engine)
        except db.DatabaseNotMigrated as e:
            raise ValueError(str(e)) from e
        with db.session_scope(db.make_session_factory(engine)) as s:
            try:
                yield s
            except ServiceError as e:
                raise ValueError(f"{e.field}: {e.reason}") from None
    finally:
        engine.dispose()


_DURATION = re.compile(r"^(\d{1,6})([dhm])$")


def parse_expiry(value: str, now: datetime | None = None) -> datetime:
    """`30d`, `12h`, `90m`, or an ISO-8601 time (UTC if it names no zone)."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}
        return now + delta[unit]
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--expires {value[:40]!r}: give a duration (30d, 12h, 90m) or an ISO-8601 time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="requester, auditor or admin.")],
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    expires: Annotated[
        str | None, typer.Option(help="Stop working after: 30d, 12h, 90m or an ISO-8601 time.")
    ] = None,
    platform: Annotated[
        bool, typer.Option("--platform", help="An admin key that acts for every tenant.")
    ] = False,
) -> None:
    """Create an API key and print it alone on stdout (it is shown only this once)."""
    from service import keys

    when = parse_expiry(expires) if expires else None
    with _session() as s:
        _, secret = keys.create_key(
            s, role, tenant, actor="cli", expires_at=when, platform=platform
        )
    typer.echo(secret)


def _iso(d: datetime | None) -> str:
    return d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if d else "-"


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
) -> None:
    """One line per key: id, tenant, role, created, expires, revoked (never a secret)."""
    from service import keys

    with _session() as s:
        rows = keys.list_keys(s, tenant)
        lines = [
            "\t".join(
                [
                    r.id,
                    r.tenant,
                    r.role + ("(platform)" if r.platform else ""),
                    f"created={_iso(r.created_at)}",
                    f"expires={_iso(r.expires_at)}",
                    f"revoked={_iso(r.revoked_at) if r.revoked else 'no'}",
                ]
            )
            for r in rows
        ]
    for line in lines:
        typer.echo(line)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (k_...).")]) -> None:
    """Revoke a key: refused from the next request on. Audited; repeating is harmless."""
    from service import keys

    with _session() as s:
        keys.revoke_key(s, key_id, actor="cli")
    typer.echo(f"revoked {key_id}", err=True)


@models_app.command("add")
def models_add(
    model_id: Annotated[str, typer.Argument(help="The name clients give as `model`.")],
    hub_id: Annotated[str | None, typer.Option(help="A hub id (org/name).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub commit or tag (with --hub-id).")] = None,
    path: Annotated[
        str | None, typer.Option(help="A directory under MOE_UNLEARN_MODEL_DIR.")
    ] = None,
) -> None:
    """Register a model remote clients may name."""
    from service import models
    from service.settings import get_settings

    with _session() as s:
        models.register(
            s,
            model_id,
            hub_id=hub_id,
            revision=revision,
            path=path,
            actor="cli",
            settings=get_settings(),
        )
    typer.echo(f"registered {model_id}", err=True)


@models_app.command("list")
def models_list() -> None:
    """One line per registered model: id, source, hub id and revision, registered."""
    from service import models

    with _session() as s:
        rows = [models.describe(r) for r in models.list_models(s)]
    for d in rows:
        created = d["created_at"]
        typer.echo(
            "\t".join(
                [
                    str(d["id"]),
                    str(d["source"]),
                    str(d["hub_id"] or "-"),
                    str(d["revision"] or "-"),
                    _iso(created if isinstance(created, datetime) else None),
                ]
            )
        )


@models_app.command("remove")
def models_remove(model_id: Annotated[str, typer.Argument(help="The registered id.")]) -> None:
    """Unregister a model (queued jobs that name it fail when they load it)."""
    from service import models

    with _session() as s:
        models.remove(s, model_id, actor="cli")
    typer.echo(f"removed {model_id}", err=True)
