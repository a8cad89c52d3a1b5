"""Content-addressed blob store on local disk (corpora and job artifacts).

A corpus is stored under its SHA-256 (same bytes = same id, stored once), written to a
temporary file and renamed into place so a reader never sees half a file. Corpora are
checked before storing: strict UTF-8, size and record caps, not empty, and each record
well formed (JSONL objects with a string `text` field, or `prompt` + `answer`; or plain
text, one record per non-empty line). Errors name the field and the reason and never
quote the corpus content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy.orm import Session

from service.errors import NotFound, ServiceError
from service.settings import Settings, get_settings
from service.tables import Corpus, utcnow

CorpusFormat = Literal["jsonl", "text"]
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_JOB_RE = re.compile(r"^[0-9a-fA-F-]{1,36}$")


class CorpusError(ServiceError, ValueError):
    """A corpus the service refuses; `field` is `corpus` or `format`."""


@dataclass(frozen=True)
class CorpusInfo:
    sha256: str
    size: int  # bytes
    records: int
    format: CorpusFormat


@dataclass(frozen=True)
class BlobInfo:
    location: str  # absolute path
    sha256: str
    size: int


def validate_corpus(
    data: bytes,
    *,
    format: str = "auto",
    text_field: str = "text",
    max_bytes: int | None = None,
    max_records: int | None = None,
) -> CorpusInfo:
    """Check a corpus and count its records (raises `CorpusError`)."""
    if format not in ("auto", "jsonl", "text"):
        raise CorpusError("format", f"must be auto, jsonl or text (got {format!r})")
    if max_bytes is not None and len(data) > max_bytes:
        raise CorpusError("corpus", f"{len(data)} bytes is over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise CorpusError("corpus", f"not valid UTF-8 (byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        raise CorpusError("corpus", "contains NUL characters (binary data?)")
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise CorpusError("corpus", "is empty (no non-blank line)")
    if max_records is not None and len(lines) > max_records:
        raise CorpusError("corpus", f"{len(lines)} records is over the limit of {max_records}")
    fmt: CorpusFormat
    if format == "auto":
        fmt = "jsonl" if lines[0][1].lstrip().startswith("{") else "text"
    else:
        fmt = format  # type: ignore[assignment]
    if fmt == "jsonl":
        for lineno, ln in lines:
            _check_record(ln, lineno, text_field)
    return CorpusInfo(hashlib.sha256(data).hexdigest(), len(data), len(lines), fmt)


def _check_record(line: str, lineno: int, text_field: str) -> None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError("corpus", f"line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise CorpusError("corpus", f"line {lineno}: a record must be a JSON object")
    if text_field in rec:
        if not isinstance(rec[text_field], str) or not rec[text_field].strip():
            raise CorpusError(
                "corpus", f"line {lineno}: field `{text_field}` must be a non-empty string"
            )
        return
    if "prompt" in rec or "answer" in rec:
        for k in ("prompt", "answer"):
            if not isinstance(rec.get(k), str) or not rec[k].strip():
                raise CorpusError(
                    "corpus", f"line {lineno}: field `{k}` must be a non-empty string"
                )
        return
    raise CorpusError(
        "corpus", f"line {lineno}: needs a `{text_field}` field or `prompt` and `answer`"
    )


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)  # atomic on one filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BlobStore:
    """Files under `root`: corpora/<sha[:2]>/<sha>, artifacts/<job_id>/<name>."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> BlobStore:
        return cls((settings or get_settings()).data_dir)

    def corpus_path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise CorpusError("corpus_id", "must be a lowercase hex SHA-256 (64 characters)")
        return self.root / "corpora" / sha256[:2] / sha256

    def put_corpus(
        self,
        data: bytes,
        *,
        format: str = "auto",
        max_bytes: int | None = None,
        max_records: int | None = None,
    ) -> CorpusInfo:
        """Validate and store a corpus; the same content twice gives the same id (and is
        written once)."""
        info = validate_corpus(data, format=format, max_bytes=max_bytes, max_records=max_records)
        dest = self.corpus_path(info.sha256)
        if not dest.exists():
            _atomic_write(dest, data)
        return info

    def open_corpus(self, sha256: str) -> BinaryIO:
        """The stored corpus (binary); `NotFound` if it was never stored."""
        path = self.corpus_path(sha256)
        if not path.is_file():
            raise NotFound("corpus_id", f"corpus {sha256} not found")
        return path.open("rb")

    def artifact_dir(self, job_id: str) -> Path:
        if not _JOB_RE.match(job_id):
            raise ValueError(f"job_id {job_id!r} is not a job id")
        return self.root / "artifacts" / job_id

    def artifact_path(self, job_id: str, name: str) -> Path:
        """Where artifact `name` of the job lives (`name`: a plain file name, no folders)."""
        if not _NAME_RE.match(name) or ".." in name:
            raise ValueError(f"artifact name {name!r} must be a plain file name")
        return self.artifact_dir(job_id) / name

    def put_artifact(self, job_id: str, name: str, data: bytes) -> BlobInfo:
        """Write an artifact atomically; returns its location, SHA-256 and size (pass them
        to `jobs.record_artifact`)."""
        dest = self.artifact_path(job_id, name)
        _atomic_write(dest, data)
        return BlobInfo(str(dest), hashlib.sha256(data).hexdigest(), len(data))


def store_corpus(
    session: Session,
    data: bytes,
    *,
    format: str = "auto",
    settings: Settings | None = None,
    store: BlobStore | None = None,
) -> CorpusInfo:
    """What POST /v1/corpora does: validate with the settings' caps, store the blob, and
    register it in the `corpora` table (idempotent). The caller commits."""
    settings = settings or get_settings()
    store = store or BlobStore.from_settings(settings)
    info = store.put_corpus(
        data,
        format=format,
        max_bytes=settings.max_corpus_bytes,
        max_records=settings.max_corpus_records,
    )
    if session.get(Corpus, info.sha256) is None:
        session.add(
            Corpus(
                sha256=info.sha256,
                size=info.size,
                records=info.records,
                format=info.format,
                location=str(store.corpus_path(info.sha256)),
                created_at=utcnow(),
            )
        )
        session.flush()
    return info
