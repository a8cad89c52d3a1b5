"""Keys the database does not hold: the Ed25519 signing key of certificates and audit
checkpoints, and the HMAC key that authenticates audit entries.

- Signing key: `MOE_UNLEARN_SIGNING_KEY` names a PEM file (PKCS#8 Ed25519 private key).
  Unset: one is generated into `<keys_dir>/signing-<key_id>.pem` with a warning (the demo
  needs one; production should give its own file, kept off the database host).
- Every signing key the service has used leaves its PUBLIC key in
  `<keys_dir>/public/<key_id>.pem`: that folder is the key history that
  `GET /v1/certificate-key` publishes and that checkpoint verification trusts. Rotating a key
  = pointing `MOE_UNLEARN_SIGNING_KEY` at a new file; old signatures keep verifying by key_id.
- Audit key: `MOE_UNLEARN_AUDIT_KEY` names a file holding at least 32 random bytes. Unset:
  generated into `<keys_dir>/audit.key` with a warning.

A signed document carries `signature: {alg, key_id, public_key, value}`; the value is the
Ed25519 signature of the canonical JSON (`workers.spec.canonical_json`) of the document
without its `signature` field. The fingerprint of a key is `SHA256:<hex of the raw 32-byte
public key's SHA-256>`, and its key_id the first 16 hex digits of that hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from service.settings import Settings, get_settings
from workers.spec import canonical_json

log = logging.getLogger(__name__)

ALG = "Ed25519"
MIN_AUDIT_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 16 * 1024  # a key file is small; anything bigger is not a key


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not a key of the expected kind."""


def keys_dir(settings: Settings) -> Path:
    return settings.keys_dir or settings.data_dir / "keys"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pub: Ed25519PublicKey | bytes) -> str:
    raw = pub if isinstance(pub, bytes) else raw_public(pub)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()


def key_id_of(pub: Ed25519PublicKey | bytes) -> str:
    return fingerprint(pub)[len("SHA256:") :][:16]


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key given as PEM, as base64 of the raw 32 bytes, or as a fingerprint-free
    `public_key` value of a signature. Raises `KeyFileError`."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(_unb64(text))
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"not an Ed25519 public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError("not an Ed25519 public key")
    return key


def _read_small(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{what} {path} is too large to be a key")
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{what} {path} cannot be read: {e.strerror}") from None


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str
    fingerprint: str
    public_b64: str


def _signing_key_from_pem(data: bytes, where: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{where} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where} is not an Ed25519 private key")
    pub = key.public_key()
    return SigningKey(key, key_id_of(pub), fingerprint(pub), _b64(raw_public(pub)))


_lock = threading.Lock()
_cache: dict[tuple[str, str], Any] = {}


def signing_key(settings: Settings | None = None) -> SigningKey:
    """The current signing key (loaded once per process and path)."""
    settings = settings or get_settings()
    kdir = keys_dir(settings)
    cache_key = ("sign", f"{settings.signing_key}|{kdir}")
    with _lock:
        if cache_key in _cache:
            return _cache[cache_key]  # type: ignore[no-any-return]
        if settings.signing_key is not None:
            path = Path(settings.signing_key)
            sk = _signing_key_from_pem(_read_small(path, "signing key"), str(path))
        else:
            existing = sorted(kdir.glob("signing-*.pem")) if kdir.is_dir() else []
            if existing:
                # The newest generated key (by mtime): a rotation by deletion-free renaming.
                path = max(existing, key=lambda p: p.stat().st_mtime)
                sk = _signing_key_from_pem(_read_small(path, "signing key"), str(path))
            else:
                priv = Ed25519PrivateKey.generate()
                pem = priv.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                sk = _signing_key_from_pem(pem, "generated key")
                path = kdir / f"signing-{sk.key_id}.pem"
                _write_secret(path, pem)
                log.warning(
                    "MOE_UNLEARN_SIGNING_KEY is unset: generated signing key %s at %s "
                    "(set MOE_UNLEARN_SIGNING_KEY to a key file kept off the database host)",
                    sk.fingerprint, path,
                )
        _publish(kdir, sk)
        _cache[cache_key] = sk
        return sk


def _publish(kdir: Path, sk: SigningKey) -> None:
    """Keep the public half in the key history (idempotent)."""
    pub_dir = kdir / "public"
    target = pub_dir / f"{sk.key_id}.pem"
    if target.exists():
        return
    pub_dir.mkdir(parents=True, exist_ok=True)
    pem = sk.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(pem)
    os.replace(tmp, target)


@dataclass(frozen=True)
class PublicKeyInfo:
    key_id: str
    fingerprint: str
    public_key: str  # base64 of the raw 32 bytes
    current: bool


def published_keys(settings: Settings | None = None) -> list[PublicKeyInfo]:
    """The current key first, then every past key of the history folder (by key_id)."""
    settings = settings or get_settings()
    cur = signing_key(settings)
    out = [PublicKeyInfo(cur.key_id, cur.fingerprint, cur.public_b64, True)]
    pub_dir = keys_dir(settings) / "public"
    for path in sorted(pub_dir.glob("*.pem")):
        try:
            pub = load_public_key(_read_small(path, "public key").decode())
        except (KeyFileError, UnicodeDecodeError):
            log.warning("ignoring %s: not an Ed25519 public key", path)
            continue
        kid = key_id_of(pub)
        if kid != cur.key_id:
            out.append(PublicKeyInfo(kid, fingerprint(pub), _b64(raw_public(pub)), False))
    return out


def trusted_key_ids(settings: Settings | None = None) -> set[str]:
    return {k.key_id for k in published_keys(settings)}


def sign_document(doc: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """A copy of `doc` with `signature` over the canonical JSON of everything else."""
    sk = signing_key(settings)
    body = {k: v for k, v in doc.items() if k != "signature"}
    value = sk.private.sign(canonical_json(body).encode())
    return {
        **body,
        "signature": {
            "alg": ALG,
            "key_id": sk.key_id,
            "public_key": sk.public_b64,
            "value": _b64(value),
        },
    }


@dataclass(frozen=True)
class SignatureCheck:
    valid: bool
    reason: str | None
    key_id: str | None
    fingerprint: str | None


def verify_document(doc: Any, expected_key: Ed25519PublicKey | None = None) -> SignatureCheck:
    """Check a signed document offline, with the public key it carries (and, if given, that
    this key is `expected_key`). Never raises on malformed input: it is hostile."""
    if not isinstance(doc, dict):
        return SignatureCheck(False, "the document is not a JSON object", None, None)
    sig = doc.get("signature")
    if not isinstance(sig, dict):
        return SignatureCheck(False, "no signature", None, None)
    if sig.get("alg") != ALG:
        return SignatureCheck(False, f"unsupported algorithm {str(sig.get('alg'))[:32]!r}",
                              None, None)
    try:
        pub = load_public_key(str(sig.get("public_key", "")))
        value = _unb64(str(sig.get("value", "")))
    except (KeyFileError, ValueError):
        return SignatureCheck(False, "malformed public key or signature value", None, None)
    kid, fp = key_id_of(pub), fingerprint(pub)
    if sig.get("key_id") != kid:
        return SignatureCheck(False, "key_id does not match the public key", kid, fp)
    if expected_key is not None and raw_public(expected_key) != raw_public(pub):
        return SignatureCheck(
            False, f"signed by {fp}, not by the expected key {fingerprint(expected_key)}",
            kid, fp,
        )
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        pub.verify(value, canonical_json(body).encode())
    except InvalidSignature:
        return SignatureCheck(False, "the signature does not match the content", kid, fp)
    except (TypeError, ValueError) as e:  # content that canonical JSON cannot encode
        return SignatureCheck(False, f"unverifiable content: {e}", kid, fp)
    return SignatureCheck(True, None, kid, fp)


def audit_key(settings: Settings | None = None) -> bytes:
    """The HMAC key of audit entries (loaded once per process and path)."""
    settings = settings or get_settings()
    kdir = keys_dir(settings)
    cache_key = ("audit", f"{settings.audit_key}|{kdir}")
    with _lock:
        if cache_key in _cache:
            return _cache[cache_key]  # type: ignore[no-any-return]
        if settings.audit_key is not None:
            path = Path(settings.audit_key)
            key = _read_small(path, "audit key").strip()
        else:
            path = kdir / "audit.key"
            if path.exists():
                key = _read_small(path, "audit key").strip()
            else:
                key = secrets.token_hex(32).encode()
                _write_secret(path, key + b"\n")
                log.warning(
                    "MOE_UNLEARN_AUDIT_KEY is unset: generated the audit key at %s (set "
                    "MOE_UNLEARN_AUDIT_KEY to a file the database's writers cannot read)",
                    path,
                )
        if len(key) < MIN_AUDIT_KEY_BYTES:
            raise KeyFileError(f"audit key {path} is shorter than {MIN_AUDIT_KEY_BYTES} bytes")
        _cache[cache_key] = key
        return key


def mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, message: str, value: str | None) -> bool:
    return value is not None and hmac.compare_digest(mac(key, message), value)


def clear_cache() -> None:
    """Forget loaded keys (tests that change the key settings)."""
    with _lock:
        _cache.clear()


def fingerprint_of_b64(public_key: str) -> str | None:
    """The fingerprint of a base64 raw public key (None when it is not one)."""
    try:
        return fingerprint(load_public_key(public_key))
    except KeyFileError:
        return None
