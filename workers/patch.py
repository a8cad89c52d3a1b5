"""Expert patches: only the tensors (or expert slices) that unlearning changed, with the
values before and after, so a patch can be applied to the base model and reverted bit-exactly.

A patch is one safetensors file. For each changed region it stores `before/<i>` and
`after/<i>` tensors; the metadata (JSON under the key "patch") says which parameter and
which region (`expert` index along dim 0 of a fused expert tensor, or the whole tensor),
with SHA-256 hashes of both, and the hashes of the base and patched models.
Names are those of the in-memory transformers model (fused experts: `...experts.gate_up_proj`),
not of the checkpoint files, which transformers may store unfused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PATCH_FORMAT = "moe-unlearn-expert-patch/1"


def tensor_sha256(t: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (contiguous, CPU), as `dtype` if
    given (the cast is made one tensor at a time)."""
    h = hashlib.sha256()
    t = t.detach().to("cpu", dtype or t.dtype).contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """SHA-256 over every tensor of a state dict, by sorted name: the model's identity
    (floating tensors as `dtype` if given: a model loaded in another dtype than its own)."""
    return items_sha256(((name, state[name]) for name in sorted(state)), dtype)


def items_sha256(
    items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> str:
    """state_sha256 of (name, tensor) pairs given in sorted name order, read one at a time
    (workers.partitioned.model_sha256 gathers each in turn)."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(name.encode())
        h.update(tensor_sha256(t, dtype if dtype and t.is_floating_point() else None).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ChangedRegion:
    """One changed region: a whole parameter (expert None) or one expert's slice [expert]."""

    name: str
    expert: int | None
    shape: tuple[int, ...]
    sha256_before: str
    sha256_after: str


@dataclass(frozen=True)
class ExpertPatch:
    base_model_sha256: str
    patched_model_sha256: str
    regions: list[ChangedRegion]

    def to_json(self) -> dict:
        return {
            "format": PATCH_FORMAT,
            "base_model_sha256": self.base_model_sha256,
            "patched_model_sha256": self.patched_model_sha256,
            "regions": [asdict(r) | {"shape": list(r.shape)} for r in self.regions],
        }


def _region(t: torch.Tensor, expert: int | None) -> torch.Tensor:
    return t if expert is None else t[expert]


def diff_states(
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    expert_dims: dict[str, int] | None = None,
) -> list[tuple[str, int | None]]:
    """The regions that differ bitwise. For fused expert tensors (names in `expert_dims`,
    expert index on dim 0) each changed expert is its own region; other tensors are whole."""
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))[:5]
        raise ValueError(f"state dicts have different parameters, e.g. {missing}")
    expert_dims = expert_dims or {}
    regions: list[tuple[str, int | None]] = []
    for name in sorted(before):
        a, b = before[name], after[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"parameter {name} changed shape or dtype")
        if torch.equal(a, b):
            continue
        if name in expert_dims:
            if expert_dims[name] != 0:
                raise ValueError(f"expert dimension of {name} must be 0")
            changed = (a != b).reshape(a.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            regions.extend((name, int(e)) for e in changed)
        else:
            regions.append((name, None))
    return regions


def write_patch(
    path: str | Path,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    expert_dims: dict[str, int] | None = None,
    base_sha256: str | None = None,
    patched_sha256: str | None = None,
) -> ExpertPatch:
    """Write the patch that turns `before` into `after` and return its description.

    `before`/`after` may hold only the tensors that could have changed; then pass the
    whole models' hashes (`state_sha256`), which apply/revert check against."""
    tensors: dict[str, torch.Tensor] = {}
    regions: list[ChangedRegion] = []
    for i, (name, expert) in enumerate(diff_states(before, after, expert_dims)):
        old = _region(before[name], expert).detach().cpu().contiguous().clone()
        new = _region(after[name], expert).detach().cpu().contiguous().clone()
        tensors[f"before/{i}"] = old
        tensors[f"after/{i}"] = new
        regions.append(
            ChangedRegion(name, expert, tuple(old.shape), tensor_sha256(old), tensor_sha256(new))
        )
    patch = ExpertPatch(
        base_sha256 or state_sha256(before), patched_sha256 or state_sha256(after), regions
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"patch": json.dumps(patch.to_json())})
    tmp.replace(path)
    return patch


RegionKey = tuple[str, int | None]  # (tensor name, expert index along dim 0 or None)


def write_region_patch(
    path: str | Path,
    before: dict[RegionKey, torch.Tensor],
    after: dict[RegionKey, torch.Tensor],
    base_sha256: str,
    patched_sha256: str,
    dtype: torch.dtype | None = None,
) -> ExpertPatch:
    """`write_patch` from the regions alone (an expert's slice, a whole router), so that
    nobody holds copies of whole fused expert tensors; slices written as `dtype` if given."""
    tensors: dict[str, torch.Tensor] = {}
    regions: list[ChangedRegion] = []
    for key in sorted(before, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        a, b = before[key], after[key]
        if a.shape != b.shape:
            raise ValueError(f"parameter {key[0]} changed shape")
        if torch.equal(a, b):
            continue
        i = len(regions)
        old = a.detach().to("cpu", dtype or a.dtype).contiguous()
        new = b.detach().to("cpu", dtype or b.dtype).contiguous()
        tensors[f"before/{i}"], tensors[f"after/{i}"] = old, new
        regions.append(
            ChangedRegion(key[0], key[1], tuple(old.shape), tensor_sha256(old), tensor_sha256(new))
        )
    patch = ExpertPatch(base_sha256, patched_sha256, regions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"patch": json.dumps(patch.to_json())})
    tmp.replace(path)
    return patch


def read_patch(path: str | Path) -> tuple[ExpertPatch, dict[str, torch.Tensor]]:
    """Read a patch file; raises ValueError if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"patch file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("patch")
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise ValueError(f"{path} is not a safetensors expert patch: {e}") from e
    if meta is None:
        raise ValueError(f"{path} has no expert-patch metadata")
    data = json.loads(meta)
    if data.get("format") != PATCH_FORMAT:
        raise ValueError(f"{path}: unknown patch format {data.get('format')!r}")
    regions = [
        ChangedRegion(
            r["name"], r["expert"], tuple(r["shape"]), r["sha256_before"], r["sha256_after"]
        )
        for r in data["regions"]
    ]
    return ExpertPatch(data["base_model_sha256"], data["patched_model_sha256"], regions), tensors


def _swap(
    state: dict[str, torch.Tensor],
    patch: ExpertPatch,
    tensors: dict[str, torch.Tensor],
    src: str,
    dst: str,
) -> None:
    # Check every region first, so a mismatching model is refused before anything changes.
    for r in patch.regions:
        if r.name not in state:
            raise ValueError(f"model has no parameter {r.name}: patch is for another model")
        current = _region(state[r.name], r.expert)
        expected = r.sha256_before if src == "before" else r.sha256_after
        if tuple(current.shape) != r.shape or tensor_sha256(current) != expected:
            where = r.name + (f"[{r.expert}]" if r.expert is not None else "")
            state_word = "base" if src == "before" else "patched"
            raise ValueError(f"{where} does not match the patch's {state_word} values")
    with torch.no_grad():
        for i, r in enumerate(patch.regions):
            _region(state[r.name], r.expert).copy_(tensors[f"{dst}/{i}"])


def apply_patch(state: dict[str, torch.Tensor], path: str | Path) -> ExpertPatch:
    """Apply a patch in place to a state dict holding the base model's values."""
    patch, tensors = read_patch(path)
    _swap(state, patch, tensors, "before", "after")
    return patch


def revert_patch(state: dict[str, torch.Tensor], path: str | Path) -> ExpertPatch:
    """Undo a patch in place on a state dict holding the patched values."""
    patch, tensors = read_patch(path)
    _swap(state, patch, tensors, "after", "before")
    return patch


def patch_model_dir(
    model_dir: str | Path, patch_path: str | Path, out_dir: str | Path, revert: bool = False
) -> ExpertPatch:
    """Load a saved transformers model, apply (or revert) a patch, save it to `out_dir`,
    and check the result's hash equals the one the patch promises."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    state = model.state_dict()
    patch = (revert_patch if revert else apply_patch)(state, patch_path)
    want = patch.base_model_sha256 if revert else patch.patched_model_sha256
    got = state_sha256(state)
    if got != want:
        raise ValueError(
            f"result hash {got[:12]} differs from the patch's {want[:12]}: "
            "the model was not the exact base (or patched) model of this patch"
        )
    out = Path(out_dir)
    model.save_pretrained(str(out))
    try:
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer is still a valid model
    return patch
