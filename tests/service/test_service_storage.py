"""The content-addressed corpus store and its refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.errors import NotFound
from service.settings import Settings
from service.storage import BlobStore, CorpusError, store_corpus, validate_corpus
from service.tables import Corpus

JSONL = b'{"text": "alpha beta"}\n{"text": "gamma"}\n\n{"prompt": "q?", "answer": "a."}\n'


def test_same_content_same_id_and_atomic_files(tmp_path):
    store = BlobStore(tmp_path)
    a = store.put_corpus(JSONL)
    b = store.put_corpus(JSONL)
    assert a == b
    assert a.sha256 == hashlib.sha256(JSONL).hexdigest()
    assert (a.size, a.records, a.format) == (len(JSONL), 3, "jsonl")
    with store.open_corpus(a.sha256) as f:
        assert f.read() == JSONL
    files = [p for p in (tmp_path / "corpora").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [a.sha256]  # stored once, no temp files left
    other = store.put_corpus(JSONL + b'{"text": "delta"}\n')
    assert other.sha256 != a.sha256 and other.records == 4


def test_plain_text_and_explicit_formats(tmp_path):
    store = BlobStore(tmp_path)
    t = store.put_corpus("line one\n\n  line two é\n".encode())
    assert (t.records, t.format) == (2, "text")
    assert store.put_corpus(b'{"text": "x"}\n', format="text").format == "text"
    assert validate_corpus("\ufeff{\"text\": \"bom\"}\n".encode()).format == "jsonl"


@pytest.mark.parametrize(
    ("data", "kw", "field", "needle"),
    [
        (b"\xff\xfe bad", {}, "corpus", "UTF-8"),
        (b"ok\n\xc3(", {}, "corpus", "byte offset 3"),
        (b"", {}, "corpus", "empty"),
        (b"\n  \n\t\n", {}, "corpus", "empty"),
        (b"a\x00b", {}, "corpus", "NUL"),
        (b"x" * 101, {"max_bytes": 100}, "corpus", "over the limit of 100"),
        (b"a\nb\nc\n", {"max_records": 2}, "corpus", "3 records"),
        (b'{"text": "a"}\n{"text": \n', {}, "corpus", "line 2: not valid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', {}, "corpus", "line 2: a record must be a JSON object"),
        (b'{"txt": "a"}\n', {}, "corpus", "line 1: needs a `text` field"),
        (b'{"text": 5}\n', {}, "corpus", "`text` must be a non-empty string"),
        (b'{"text": "  "}\n', {}, "corpus", "`text` must be a non-empty string"),
        (b'{"prompt": "q"}\n', {}, "corpus", "`answer` must be a non-empty string"),
        (b'{"text": "a"}\n', {"format": "csv"}, "format", "auto, jsonl or text"),
        (b"plain words\n", {"format": "jsonl"}, "corpus", "line 1: not valid JSON"),
    ],
)
def test_refusals_name_field_and_reason(tmp_path, data, kw, field, needle):
    with pytest.raises(CorpusError) as ei:
        BlobStore(tmp_path).put_corpus(data, **kw)
    assert ei.value.field == field
    assert needle in ei.value.reason
    assert not (tmp_path / "corpora").exists()  # nothing stored


def test_errors_never_quote_the_corpus(tmp_path):
    secret = "the-launch-code-is-0000"
    for data in (
        json.dumps({"txt": secret}).encode(),
        (json.dumps({"text": secret}) + "\n{" + secret).encode(),
    ):
        with pytest.raises(CorpusError) as ei:
            validate_corpus(data)
        assert secret not in str(ei.value)


def test_bad_ids_and_names(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(CorpusError, match="SHA-256"):
        store.corpus_path("../../etc/passwd")
    with pytest.raises(NotFound):
        store.open_corpus("0" * 64)
    with pytest.raises(ValueError):
        store.artifact_path("0b7c", "../x")
    with pytest.raises(ValueError):
        store.artifact_dir("../../x")
    info = store.put_artifact("0b7c-11", "patch.safetensors", b"abc")
    assert (info.sha256, info.size) == (hashlib.sha256(b"abc").hexdigest(), 3)
    assert open(info.location, "rb").read() == b"abc"


def test_store_corpus_registers_once(db, tmp_path):
    settings = Settings(data_dir=tmp_path, max_corpus_bytes=1000, max_corpus_records=10)
    with session_scope(db.factory) as s:
        a = store_corpus(s, JSONL, settings=settings)
    with session_scope(db.factory) as s:
        b = store_corpus(s, JSONL, settings=settings)
        rows = s.execute(select(Corpus)).scalars().all()
    assert a == b
    assert [(r.sha256, r.size, r.records, r.format) for r in rows] == [
        (a.sha256, len(JSONL), 3, "jsonl")
    ]
    with pytest.raises(CorpusError, match="over the limit of 1000"):
        with session_scope(db.factory) as s:
            store_corpus(s, b"x" * 1001, settings=settings)
