"""Where built worlds live: a directory per settings hash, built once, atomically.

Layout: <root>/worlds/<hash>/ with root = $MOE_UNLEARN_CACHE or ~/.cache/moe-unlearn.
A build runs in a temporary sibling directory and is renamed into place; an exclusive
file lock (<hash>.lock) makes a second process wait for the first build instead of
building the same world again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workers.env import cache_root
from workers.spec import canonical_json

MANIFEST = "manifest.json"


def default_worlds_dir() -> Path:
    return cache_root() / "worlds"


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything that determines a world."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative posix path -> hex), manifest excluded."""
    return {
        p.relative_to(directory).as_posix(): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(worlds_dir: Path, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The directory worlds_dir/key, calling `build(tmp_dir)` to create it if missing.
    Returns (path, built_now). Complete directories are recognised by their manifest."""
    final = worlds_dir / key
    if (final / MANIFEST).is_file():
        return final, False
    with _locked(worlds_dir / f"{key}.lock"):
        if (final / MANIFEST).is_file():  # another process built it while we waited
            return final, False
        if final.exists():  # a leftover without manifest (killed mid-rename): rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=worlds_dir))
        try:
            build(tmp)
            os.rename(tmp, final)  # atomic on one filesystem
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers never see it half written (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
