"""Signed checkpoints of the audit chain head, exported to a place the database's writers
cannot rewrite, and the check of the chain against one.

A checkpoint is `{schema, kind, seq, entry_hash, time, signature}` (service/audit.py,
`signed_checkpoint`). `verify_against` first checks the checkpoint's signature (and, if
given, that it was made by the expected key), then the whole chain (`audit.verify`), then
that entry `seq` of the chain still has the checkpoint's hash: whoever rewrote an entry at
or before `seq` - even with the audit key, recomputing every hash and MAC up to a new head -
changed that hash, and cannot sign a new checkpoint without the signing key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import audit, signing
from service.errors import InvalidArgument, ServiceError
from service.settings import Settings, get_settings
from service.tables import AuditCheckpoint, AuditEntry

MAX_CHECKPOINT_BYTES = 4096  # a checkpoint is ~500 bytes; anything larger is not one


class ChainBroken(ServiceError):
    """The chain does not verify: no checkpoint vouches for a broken chain."""


def checkpoint_dir(settings: Settings) -> Path:
    return settings.audit_checkpoint_dir or settings.data_dir / "audit-checkpoints"


def current_checkpoint(session: Session, settings: Settings | None = None) -> dict[str, Any]:
    """A freshly signed checkpoint of the chain head (the chain is verified first)."""
    settings = settings or get_settings()
    v = audit.verify(session, settings=settings)
    if not v.ok:
        raise ChainBroken("audit", f"the chain does not verify: {v.reason}")
    return audit.signed_checkpoint(v.head_seq, v.head_hash, "export", settings)


def export(
    session: Session, settings: Settings | None = None, to: Path | None = None
) -> tuple[dict[str, Any], Path]:
    """Sign a checkpoint of the head, keep a copy in the database and write it to `to` (a
    file, or a folder: `checkpoint-<seq>.json` in it; default: the checkpoint folder)."""
    settings = settings or get_settings()
    doc = current_checkpoint(session, settings)
    audit.store_checkpoint(session, doc)
    target = to if to is not None else checkpoint_dir(settings)
    if target.is_dir() or to is None:
        stamp = doc["time"].replace(":", "").replace("-", "")[:15]
        target = target / f"checkpoint-{doc['seq']:012d}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return doc, target


def list_checkpoints(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Stored checkpoints (anchors and exports), newest first."""
    rows = session.execute(
        select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(limit)
    ).scalars()
    return [dict(r.document) for r in rows]


def parse_checkpoint(raw: str | bytes) -> dict[str, Any]:
    """A checkpoint from hostile bytes (size-bounded JSON object); `InvalidArgument`."""
    if len(raw) > MAX_CHECKPOINT_BYTES:
        raise InvalidArgument("against", f"a checkpoint is at most {MAX_CHECKPOINT_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument("against", f"not JSON: {e}") from None
    except RecursionError:  # `[[[[...`: within the size bound, deeper than the parser goes
        raise InvalidArgument("against", "not a checkpoint: nested too deep") from None
    if not isinstance(doc, dict) or doc.get("schema") != audit.CHECKPOINT_SCHEMA:
        raise InvalidArgument("against", f"not an audit checkpoint ({audit.CHECKPOINT_SCHEMA})")
    seq, h = doc.get("seq"), doc.get("entry_hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**62:
        raise InvalidArgument("against.seq", "must be an integer >= 0")
    if not isinstance(h, str) or len(h) != 64:
        raise InvalidArgument("against.entry_hash", "must be 64 hex characters")
    return doc


@dataclass(frozen=True)
class AgainstResult:
    ok: bool
    reason: str | None
    first_bad_seq: int | None
    checkpoint_seq: int
    checkpoint_fingerprint: str | None
    chain: audit.VerifyResult | None


def verify_against(
    session: Session,
    doc: dict[str, Any],
    expected_key: Ed25519PublicKey | None = None,
    settings: Settings | None = None,
) -> AgainstResult:
    """Verify the chain and that it still extends the checkpoint `doc`."""
    settings = settings or get_settings()
    seq = int(doc["seq"])
    sig = signing.verify_document(doc, expected_key)
    if not sig.valid:
        return AgainstResult(False, f"checkpoint signature: {sig.reason}", None, seq,
                             sig.fingerprint, None)
    if expected_key is None and sig.key_id not in signing.trusted_key_ids(settings):
        return AgainstResult(
            False, f"the checkpoint was signed by {sig.fingerprint}, not a key of this "
            "service (pass the expected key to check another)", None, seq, sig.fingerprint,
            None,
        )
    v = audit.verify(session, settings=settings)
    if not v.ok:
        return AgainstResult(False, v.reason, v.first_bad_seq, seq, sig.fingerprint, v)
    if seq == 0:
        return AgainstResult(True, None, None, seq, sig.fingerprint, v)
    if v.head_seq < seq:
        return AgainstResult(
            False, f"the chain ends at entry {v.head_seq}, before the checkpoint's entry "
            f"{seq}: entries were removed", v.head_seq + 1, seq, sig.fingerprint, v,
        )
    row = session.execute(
        select(AuditEntry.entry_hash).where(AuditEntry.seq == seq)
    ).scalar_one_or_none()
    if row != doc["entry_hash"]:
        return AgainstResult(
            False, f"entry {seq} differs from the checkpoint: the chain was rewritten at or "
            f"before entry {seq}", seq, seq, sig.fingerprint, v,
        )
    return AgainstResult(True, None, None, seq, sig.fingerprint, v)
