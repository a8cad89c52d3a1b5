"""Proof-of-deletion commands of `moe-unlearn` (registered by api/cli.py):

    moe-unlearn certificate verify FILE [--key PUB]   exit 0 valid, 1 invalid; prints the
                                                      signing key's fingerprint
    moe-unlearn audit export [--to PATH] [--every S]  sign a checkpoint of the chain head
                                                      and write it out (repeat every S s)
    moe-unlearn audit verify --local [--against CKPT] [--signer PUB]
                                                      the same check on the database
                                                      itself (verify_local; the command
                                                      lives in api/cli_client.py)
    moe-unlearn requests check-due                    audit overdue deletion requests

PUB is a public key: a PEM or base64 file, base64 of the raw key, or a fingerprint
`SHA256:<hex>` (as `GET /v1/certificate-key` lists them). Nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

certificate_app = typer.Typer(help="Deletion certificates.", no_args_is_help=True)
requests_app = typer.Typer(help="Deletion requests.", no_args_is_help=True)
MAX_CERTIFICATE_BYTES = 16 * 1024 * 1024


def _read_json(path: Path, what: str, limit: int) -> Any:
    try:
        size = path.stat().st_size
        if size > limit:
            raise ValueError(f"{what} {path} is larger than {limit} bytes")
        return json.loads(path.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not JSON: {e}") from None


def _expected(key: str | None) -> tuple[Any, str | None]:
    """(public key or None, fingerprint or None) of a --key value."""
    from service import signing

    if key is None:
        return None, None
    if key.startswith("SHA256:"):
        return None, key
    path = Path(key)
    text = key
    if len(key) < 4096 and path.is_file():
        text = path.read_text(errors="replace")[:8192]
    try:
        pub = signing.load_public_key(text)
    except signing.KeyFileError as e:
        raise ValueError(f"--key: {e}") from None
    return pub, signing.fingerprint(pub)


@certificate_app.command("verify")
def certificate_verify(
    file: Annotated[Path, typer.Argument(help="The certificate JSON.")],
    key: Annotated[
        str | None, typer.Option("--key", help="The expected public key or fingerprint.")
    ] = None,
) -> None:
    """Check a certificate's signature offline (exit 0 valid, 1 invalid)."""
    from service import signing

    doc = _read_json(file, "certificate", MAX_CERTIFICATE_BYTES)
    pub, expected_fp = _expected(key)
    check = signing.verify_document(doc, pub)
    if check.valid and expected_fp is not None and check.fingerprint != expected_fp:
        check = signing.SignatureCheck(
            False, f"signed by {check.fingerprint}, not by the expected key {expected_fp}",
            check.key_id, check.fingerprint,
        )
    if check.valid:
        typer.echo(f"valid: signed by {check.fingerprint} (key_id {check.key_id})")
        return
    typer.echo(f"INVALID: {check.reason}" + (f" (key {check.fingerprint})"
                                            if check.fingerprint else ""))
    raise typer.Exit(1)


def _session_factory() -> tuple[Any, Any, Any]:
    from service import db
    from service.settings import get_settings

    settings = get_settings()
    engine = db.engine_for(settings)
    try:
        db.check_migrated(engine)
    except db.DatabaseNotMigrated as e:
        engine.dispose()
        raise ValueError(str(e)) from None
    return settings, engine, db.make_session_factory(engine)


def audit_export(
    to: Annotated[
        Path | None,
        typer.Option("--to", help="A file or folder [default: MOE_UNLEARN_AUDIT_CHECKPOINT_DIR "
                     "or <data dir>/audit-checkpoints]."),
    ] = None,
    every: Annotated[
        float | None,
        typer.Option("--every", min=1.0, help="Keep exporting every this many seconds."),
    ] = None,
) -> None:
    """Sign a checkpoint of the audit chain head and write it (path printed on stdout)."""
    from service import checkpoints, db

    settings, engine, factory = _session_factory()
    try:
        while True:
            with db.session_scope(factory) as s:
                try:
                    doc, path = checkpoints.export(s, settings, to)
                except checkpoints.ChainBroken as e:
                    typer.echo(f"refused: {e.reason}", err=True)
                    raise typer.Exit(1) from None
            typer.echo(str(path))
            typer.echo(f"checkpoint of entry {doc['seq']} ({doc['entry_hash']})", err=True)
            if every is None:
                return
            time.sleep(every)
    finally:
        engine.dispose()


def verify_local(against: Path | None, key: str | None) -> None:
    """The operator's check, on the database itself: the chain (and that it still extends
    the checkpoint `against`, signed by `key` when given); exit 0 intact, 1 tampered.
    `moe-unlearn audit verify --local` (api/cli_client.py) calls it."""
    from service import audit, checkpoints, db, signing

    pub, expected_fp = _expected(key)
    doc = None
    if against is not None:
        raw = _read_json(against, "checkpoint", checkpoints.MAX_CHECKPOINT_BYTES)
        doc = checkpoints.parse_checkpoint(json.dumps(raw))
        if expected_fp is not None and pub is None:
            fp = signing.fingerprint_of_b64(str((doc.get("signature") or {}).get("public_key")))
            if fp != expected_fp:
                typer.echo(f"INVALID: checkpoint signed by {fp}, not by {expected_fp}")
                raise typer.Exit(1)
    settings, engine, factory = _session_factory()
    try:
        with db.session_scope(factory) as s:
            if doc is None:
                v = audit.verify(s, settings=settings)
                ok, reason, head = v.ok, v.reason, v.head_seq
                extra = ""
            else:
                r = checkpoints.verify_against(s, doc, pub, settings)
                ok, reason = r.ok, r.reason
                head = r.chain.head_seq if r.chain else None
                extra = f"; checkpoint at entry {r.checkpoint_seq} by {r.checkpoint_fingerprint}"
    finally:
        engine.dispose()
    if ok:
        typer.echo(f"intact: chain head at entry {head}{extra}")
        return
    typer.echo(f"TAMPERED: {reason}")
    raise typer.Exit(1)


@requests_app.command("check-due")
def requests_check_due() -> None:
    """Append `request_overdue` for every open request past its due date (once each);
    prints how many were found."""
    from service import db, requests

    _, engine, factory = _session_factory()
    try:
        with db.session_scope(factory) as s:
            found = requests.report_overdue(s, actor="cli:check-due")
    finally:
        engine.dispose()
    typer.echo(f"{len(found)} request(s) newly overdue")


def register(app: typer.Typer, audit_app: typer.Typer) -> None:
    """`certificate` and `requests`; `audit export` joins the one `audit` group (whose
    `verify` and `events` live in api/cli_client.py)."""
    app.add_typer(certificate_app, name="certificate")
    audit_app.command("export")(audit_export)
    app.add_typer(requests_app, name="requests")
