"""Where a job's base model comes from (issue 12): a local directory, a hub id at an
optional `revision` (a branch, tag or commit), or the output folder of a patch-only job
(`output.model: patch`), whose `base_model.json` names the base it patches.

`resolve` pins a hub id to the commit its revision names (config.json is fetched, or found
in the hub cache offline, and the snapshot folder it lands in is named by the commit), so
that the config, the tokenizer and the weights all load from that one commit, and the
results and the certificate record it. A local directory has a commit only when it is a
hub cache snapshot (`.../snapshots/<sha>/`); a revision given for any other directory is
refused: nothing could check it. Torch-free: the service reads base references too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMIT = re.compile(r"^[0-9a-f]{40}$")
BASE_REF_FILE = "base_model.json"
BASE_REF_FORMAT = "moe-unlearn-base-ref/1"
PATCH_FILE = "expert_patch.safetensors"
MAX_BASE_REF_BYTES = 64 * 1024


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `ref` and `revision` are what from_pretrained gets (a hub id is
    pinned to its commit); `commit` is what the results record (None: a plain directory)."""

    ref: str
    revision: str | None
    commit: str | None


def snapshot_commit(folder: Path) -> str | None:
    """The commit of a hub cache snapshot folder (`.../snapshots/<40 hex>`), else None."""
    if folder.parent.name == "snapshots" and COMMIT.match(folder.name):
        return folder.name
    return None


def _named_commit(snapshot: Path, revision: str) -> str | None:
    """The commit a branch or tag names in the snapshot's cache (refs/<revision>)."""
    if COMMIT.match(revision):
        return revision
    refs = (snapshot.parent.parent / "refs").resolve()
    ref = (refs / revision).resolve()
    if not ref.is_relative_to(refs) or not ref.is_file():
        return None
    text = ref.read_text(encoding="utf-8", errors="replace").strip()
    return text if COMMIT.match(text) else None


def _local(folder: Path, model_ref: str, revision: str | None) -> ModelSource:
    commit = snapshot_commit(folder.resolve())
    if revision is not None:
        if commit is None:
            raise ValueError(
                f"revision {revision!r} was given for model {model_ref!r}, a local directory "
                "that is not a hub cache snapshot (.../snapshots/<commit>/): a revision can "
                "only be checked for a hub id or a snapshot; drop `revision` or name the hub id"
            )
        named = _named_commit(folder.resolve(), revision)
        if named != commit:
            raise ValueError(
                f"model {model_ref!r} is the hub snapshot {commit}, but revision "
                f"{revision!r} names {named or 'no commit this cache knows'}"
            )
    return ModelSource(model_ref, None, commit)


def resolve(model_ref: str, revision: str | None = None) -> ModelSource:
    """A local directory as it is (its commit if it is a hub snapshot), or a hub id pinned
    to the commit `revision` (default: main) names. ValueError when it cannot be found."""
    folder = Path(model_ref)
    if folder.is_dir():
        return _local(folder, model_ref, revision)
    try:
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(model_ref, "config.json", revision=revision))
    except Exception as e:  # noqa: BLE001 - bad id, not cached offline, no such revision
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"model {model_ref!r}{at} could not be loaded: {e}") from e
    commit = snapshot_commit(config.parent)
    return ModelSource(model_ref, commit or revision, commit)


def is_patch_output(folder: Path) -> bool:
    """A patch-only job's output folder: a base reference and an expert patch, no model."""
    return (folder / BASE_REF_FILE).is_file() and (folder / PATCH_FILE).is_file()


def write_base_ref(
    out_dir: Path, model: str, commit: str | None, base_sha256: str, patched_sha256: str
) -> Path:
    """base_model.json of a patch-only job: the base model (path or hub id, and its
    resolved commit) and the hashes the patch turns one into the other."""
    path = out_dir / BASE_REF_FILE
    local = Path(model)
    data = {
        "format": BASE_REF_FORMAT,
        # a directory absolute: the output is loaded later, from wherever
        "model": str(local.resolve()) if local.is_dir() else model,
        "revision": commit,
        "base_model_sha256": base_sha256,
        "patched_model_sha256": patched_sha256,
        "patch": PATCH_FILE,
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def read_base_ref(folder: Path) -> dict[str, Any]:
    """A patch-only output's base reference, checked; ValueError when it is not one."""
    path = folder / BASE_REF_FILE
    try:
        if path.stat().st_size > MAX_BASE_REF_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a base model reference: {e}") from e
    ok = (
        isinstance(data, dict)
        and data.get("format") == BASE_REF_FORMAT
        and isinstance(data.get("model"), str)
        and (data.get("revision") is None or COMMIT.match(str(data["revision"])))
        and all(
            isinstance(data.get(k), str) and re.fullmatch(r"[0-9a-f]{64}", data[k])
            for k in ("base_model_sha256", "patched_model_sha256")
        )
    )
    if not ok:
        raise ValueError(f"{path} is not a base model reference ({BASE_REF_FORMAT})")
    return data


__all__ = [
    "BASE_REF_FILE",
    "COMMIT",
    "PATCH_FILE",
    "ModelSource",
    "is_patch_output",
    "read_base_ref",
    "resolve",
    "snapshot_commit",
    "write_base_ref",
]
