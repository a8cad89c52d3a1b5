"""Model sources (issue 12): a hub id at a revision, resolved offline from a hub cache
built here (refs/ + snapshots/<sha>/ as huggingface_hub lays them out), is pinned to its
commit and the commit is recorded; a revision a plain directory cannot prove is refused;
output.model patch writes no model, and its patch applied to the base gives the recorded
patched model, also when a later job loads it as its base."""

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from tests.engine._tiny_dir import make_tiny_model_dir, tiny_dir_spec
from workers.job import open_model
from workers.model_source import BASE_REF_FILE, resolve
from workers.patch import state_sha256
from workers.run import run_job
from workers.spec import JobSpec

SHA_MAIN = "1" * 40
SHA_V1 = "2" * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def hub(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding org/tiny: main -> SHA_MAIN, tag v1 -> SHA_V1 (weights scaled,
    so the two commits are different models)."""
    from transformers import AutoModelForCausalLM

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(model_dir / "model", repo / "snapshots" / SHA_MAIN)
    v1 = AutoModelForCausalLM.from_pretrained(str(model_dir / "model"))
    with torch.no_grad():
        v1.lm_head.weight.mul_(2.0)
    v1.save_pretrained(repo / "snapshots" / SHA_V1)
    for f in (model_dir / "model").iterdir():
        if "token" in f.name:
            shutil.copy(f, repo / "snapshots" / SHA_V1 / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v1").write_text(SHA_V1)  # refs/<revision as named>, as the hub writes
    # Read at call time by huggingface_hub and transformers; HF_HUB_OFFLINE=1 (conftest).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def _spec(d: Path, **over) -> JobSpec:
    return tiny_dir_spec(d, 3, **({"evaluation": {"robustness": []}} | over))


def test_hub_id_resolves_offline_to_the_commit_its_revision_names(hub: Path) -> None:
    assert resolve("org/tiny") == resolve("org/tiny", "main")
    assert resolve("org/tiny").commit == SHA_MAIN
    src = resolve("org/tiny", "v1")
    assert (src.ref, src.revision, src.commit) == ("org/tiny", SHA_V1, SHA_V1)
    assert resolve("org/tiny", SHA_V1).commit == SHA_V1
    with pytest.raises(ValueError, match="at revision 'nope' could not be loaded"):
        resolve("org/tiny", "nope")
    # The revision reaches from_pretrained: v1's weights, not main's.
    main, _, _ = open_model("org/tiny")
    v1, _, src = open_model("org/tiny", "v1")
    assert src.commit == SHA_V1
    assert torch.equal(v1.lm_head.weight, 2.0 * main.lm_head.weight)


def test_local_directories_and_revisions(hub: Path, model_dir: Path) -> None:
    snap = hub / "snapshots" / SHA_V1
    assert resolve(str(snap)).commit == SHA_V1  # a snapshot knows its commit
    assert resolve(str(snap), "v1").commit == SHA_V1  # refs/v1 names it
    with pytest.raises(ValueError, match="names " + SHA_MAIN):
        resolve(str(snap), "main")
    assert resolve(str(model_dir / "model")).commit is None
    with pytest.raises(ValueError, match="not a hub cache snapshot"):
        resolve(str(model_dir / "model"), "main")


def test_job_on_a_hub_revision_records_the_commit(hub: Path, model_dir: Path, tmp_path) -> None:
    res = run_job(_spec(model_dir, model="org/tiny", revision="v1"), tmp_path / "out")
    assert res.model_revision == SHA_V1
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model_revision"] == SHA_V1
    v1, _, _ = open_model("org/tiny", SHA_V1)
    assert res.base_model_sha256 == state_sha256(v1.state_dict())
    with pytest.raises(ValueError, match="not a hub cache snapshot"):
        run_job(_spec(model_dir, revision="main"), tmp_path / "refused")


def test_patch_output_writes_no_model_and_chains(model_dir: Path, tmp_path) -> None:
    first = tmp_path / "first"
    res = run_job(_spec(model_dir, output={"model": "patch"}), first)
    assert res.output_model == "patch" and res.model_revision is None
    assert not (first / "model").exists()
    ref = json.loads((first / BASE_REF_FILE).read_text())
    assert ref["model"] == str(model_dir / "model")
    assert ref["base_model_sha256"] == res.base_model_sha256
    assert ref["patched_model_sha256"] == res.unlearned_model_sha256
    # The patch applied to the base gives the patched model the job recorded.
    patched, _, _ = open_model(str(first))
    assert state_sha256(patched.state_dict()) == res.unlearned_model_sha256
    # A second patch-only job starts from the first's output: its base is that model.
    second = run_job(_spec(model_dir, model=str(first), output={"model": "patch"}),
                     tmp_path / "second")
    assert second.base_model_sha256 == res.unlearned_model_sha256
    twice, _, _ = open_model(str(tmp_path / "second"))
    assert state_sha256(twice.state_dict()) == second.unlearned_model_sha256
    # A base that changed since is refused, naming the hashes.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    data = json.loads((moved / BASE_REF_FILE).read_text())
    data["base_model_sha256"] = "0" * 64
    (moved / BASE_REF_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the base changed since"):
        open_model(str(moved))
    with pytest.raises(ValueError, match="drop `revision`"):
        open_model(str(first), "main")
