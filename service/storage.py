"""Content-addressed blob store on local disk (corpora and job artifacts).

A corpus is stored under its SHA-256 (same bytes = same id, stored once). It is checked
while it streams in (`CorpusValidator`: memory bounded by the longest accepted record),
written to a temporary file and renamed into place so a reader never sees half a file.
Checks: strict UTF-8, size, record and record-length caps, not empty, and each record
well formed (JSONL objects with a string `text` field, or `prompt` + `answer`; or plain
text, one record per non-empty line). Errors name the field and the reason and never
quote the corpus content. Who holds a corpus, and when it is deleted: `service.corpora`.
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

# Records are flat objects: bounded nesting and integers keep json.loads and int() cheap
# (a 5,000-deep line raised RecursionError, a 5,000-digit integer ValueError: both 500s).
MAX_RECORD_DEPTH = 32
MAX_INT_DIGITS = 100


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


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _depth_ok(value: object, depth: int = 0) -> bool:
    if depth > MAX_RECORD_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


class CorpusValidator:
    """Checks a corpus fed in chunks, holding at most one record (line) in memory.

    Records are split on `\\n` only (`\\r\\n` accepted): valid JSON may hold U+2028 or
    U+0085, which `str.splitlines` splits. Raises `CorpusError` as soon as something is
    wrong: bad UTF-8 (with its byte offset), NUL, a line over `max_record_bytes`, more than
    `max_records` records or `max_bytes` bytes, a malformed JSONL record."""

    def __init__(
        self,
        *,
        format: str = "auto",
        text_field: str = "text",
        max_bytes: int | None = None,
        max_records: int | None = None,
        max_record_bytes: int | None = None,
    ) -> None:
        if format not in ("auto", "jsonl", "text"):
            raise CorpusError("format", f"must be auto, jsonl or text (got {format!r})")
        self.text_field = text_field
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.max_record_bytes = max_record_bytes
        self._hash = hashlib.sha256()
        self._partial = b""
        self._offset = 0  # byte offset of the start of the next line
        self._lineno = 0
        self.size = 0
        self.records = 0
        self._fmt: str | None = None if format == "auto" else format

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise CorpusError("corpus", f"{self.size} bytes is over the limit of {self.max_bytes}")
        self._hash.update(chunk)
        data = self._partial + chunk if self._partial else chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)
        if self.max_record_bytes is not None and len(self._partial) > self.max_record_bytes:
            self._too_long(self._lineno + 1)

    def finish(self) -> CorpusInfo:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self.records == 0:
            raise CorpusError("corpus", "is empty (no non-blank line)")
        fmt: CorpusFormat = "jsonl" if self._fmt == "jsonl" else "text"
        return CorpusInfo(self._hash.hexdigest(), self.size, self.records, fmt)

    def _too_long(self, lineno: int) -> None:
        raise CorpusError(
            "corpus",
            f"line {lineno}: longer than the record limit of {self.max_record_bytes} bytes",
        )

    def _line(self, raw: bytes) -> None:
        self._lineno += 1
        start = self._offset
        self._offset += len(raw) + 1
        if self.max_record_bytes is not None and len(raw) > self.max_record_bytes:
            self._too_long(self._lineno)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            where = start + e.start
            raise CorpusError("corpus", f"not valid UTF-8 (byte offset {where})") from None
        if self._lineno == 1 and text.startswith("\ufeff"):
            text = text[1:]
        if "\x00" in text:
            raise CorpusError("corpus", "contains NUL characters (binary data?)")
        if not text.strip():
            return
        self.records += 1
        if self.max_records is not None and self.records > self.max_records:
            raise CorpusError(
                "corpus", f"{self.records} records is over the limit of {self.max_records}"
            )
        if self._fmt is None:
            self._fmt = "jsonl" if text.lstrip().startswith("{") else "text"
        if self._fmt == "jsonl":
            _check_record(text, self._lineno, self.text_field)


def validate_corpus(
    data: bytes,
    *,
    format: str = "auto",
    text_field: str = "text",
    max_bytes: int | None = None,
    max_records: int | None = None,
    max_record_bytes: int | None = None,
) -> CorpusInfo:
    """Check a whole corpus and count its records (raises `CorpusError`)."""
    v = CorpusValidator(
        format=format,
        text_field=text_field,
        max_bytes=max_bytes,
        max_records=max_records,
        max_record_bytes=max_record_bytes,
    )
    v.feed(data)
    return v.finish()


def _check_record(line: str, lineno: int, text_field: str) -> None:
    try:
        rec = json.loads(line, parse_int=_bounded_int, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise CorpusError("corpus", f"line {lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise CorpusError(
            "corpus", f"line {lineno}: nested deeper than {MAX_RECORD_DEPTH} levels"
        ) from None
    except ValueError as e:  # our hooks' refusals: their text never quotes the record
        raise CorpusError("corpus", f"line {lineno}: not accepted ({e})") from None
    if not isinstance(rec, dict):
        raise CorpusError("corpus", f"line {lineno}: a record must be a JSON object")
    if not _depth_ok(rec):
        raise CorpusError("corpus", f"line {lineno}: nested deeper than {MAX_RECORD_DEPTH} levels")
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


class CorpusUpload:
    """One corpus arriving in chunks: validated and hashed as it comes, written to a
    temporary file under `<root>/incoming`; `commit()` renames it to its content address.
    Use as a context manager: leaving without commit removes the temporary file."""

    def __init__(self, store: BlobStore, validator: CorpusValidator) -> None:
        self.store = store
        self.validator = validator
        incoming = store.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=incoming, prefix=".tmp-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self.info: CorpusInfo | None = None

    def __enter__(self) -> CorpusUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def feed(self, chunk: bytes) -> None:
        self.validator.feed(chunk)
        self._file.write(chunk)

    def finish(self) -> CorpusInfo:
        """Validate the end of the corpus; the file is complete on disk (not yet placed)."""
        self.info = self.validator.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.info

    def commit(self) -> Path:
        """Move the finished file to its content address (call under the database write
        lock: `service.corpora.register`, so a concurrent deletion cannot interleave)."""
        assert self.info is not None, "finish() first"
        dest = self.store.corpus_path(self.info.sha256)
        if not self._tmp.exists() and dest.is_file():
            return dest  # committed by an earlier try of the same transaction
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, dest)
        return dest

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


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
        max_record_bytes: int | None = None,
    ) -> CorpusInfo:
        """Validate and store a corpus; the same content twice gives the same id (and is
        written once)."""
        info = validate_corpus(
            data,
            format=format,
            max_bytes=max_bytes,
            max_records=max_records,
            max_record_bytes=max_record_bytes,
        )
        dest = self.corpus_path(info.sha256)
        if not dest.exists():
            _atomic_write(dest, data)
        return info

    def delete_corpus(self, sha256: str) -> bool:
        """Remove a corpus blob; True if there was one."""
        path = self.corpus_path(sha256)
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return existed

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


def register_blob(session: Session, info: CorpusInfo, location: Path) -> None:
    """Add the blob's row to the `corpora` table if it is not there (the caller commits)."""
    if session.get(Corpus, info.sha256) is None:
        session.add(
            Corpus(
                sha256=info.sha256,
                size=info.size,
                records=info.records,
                format=info.format,
                location=str(location),
                created_at=utcnow(),
            )
        )
        session.flush()


def store_corpus(
    session: Session,
    data: bytes,
    *,
    format: str = "auto",
    settings: Settings | None = None,
    store: BlobStore | None = None,
) -> CorpusInfo:
    """Validate with the settings' caps, store the blob, and register it in the `corpora`
    table (idempotent; no tenant holds it: trusted local callers and tests). The API
    uploads through `service.corpora`. The caller commits."""
    settings = settings or get_settings()
    store = store or BlobStore.from_settings(settings)
    info = store.put_corpus(
        data,
        format=format,
        max_bytes=settings.max_corpus_bytes,
        max_records=settings.max_corpus_records,
        max_record_bytes=settings.max_corpus_record_bytes,
    )
    register_blob(session, info, store.corpus_path(info.sha256))
    return info
