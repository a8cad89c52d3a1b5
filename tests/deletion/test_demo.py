"""`make demo`'s code path (api.demo.main, as `python -m api.demo` runs it: serve and
dispatcher as child processes, the job over HTTP on Ray Train with 2 workers) on the
session's small world; its printed report and the files it leaves are checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from api import demo
from tests.small_world import example_on_small_world


@pytest.mark.slow
def test_make_demo_runs_the_example_to_a_verified_deletion(
    small_world, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / demo.DEFAULT_SPEC.name  # the example make demo submits
    spec_file.write_text(yaml.safe_dump(example_on_small_world(demo.DEFAULT_SPEC.name)))
    work = tmp_path / "work"
    rc = demo.main(["--spec", str(spec_file), "--dir", str(work)])  # default: 2 workers
    out = capsys.readouterr().out
    assert rc == 0, out
    job_id = re.search(r"submitted job (\S+) over HTTP", out)
    assert job_id is not None and "Ray Train, 2 CPU workers" in out, out
    res = json.loads((work / "result.json").read_text())
    assert res["distributed"]["num_workers"] == 2
    before, after = res["before"], res["after"]
    assert after["forget_accuracy"] <= 0.30 < before["forget_accuracy"]
    assert after["utility_accuracy_unseen"] >= 0.9 * before["utility_accuracy_unseen"]
    assert res["stopped_by"] == "forget_accuracy"
    # the printed report: the table's numbers, the selected expert, an intact audit chain
    row = re.search(r"forget accuracy \(lower is better\)\D*([\d.]+)\D+([\d.]+)", out)
    assert row is not None, out
    assert float(row[2]) == pytest.approx(after["forget_accuracy"], abs=0.005)
    # The experts num_experts auto selected, or (none qualified on this world) what the job
    # did instead, as the job said it.
    chosen = [(s["layer"], s["expert"]) for s in res["selected"]]
    for layer, expert in chosen:
        assert f"selected expert: layer {layer} expert {expert}" in out
    if not chosen:
        warning = res["selection"]["selection_warning"]
        assert res["scope"] == "full" and "fallback full" in warning
        assert "selection: seuf.num_experts auto:" in out.replace("\n", " "), out
    assert re.search(r"audit chain: intact \([1-9]\d* entries checked\)", out), out
    # the certificate names this job's deletion and the experts it changed
    cert = json.loads((work / "certificate.json").read_text())
    assert cert["job_id"] == job_id[1] and cert["deletion_performed"] is True
    assert [(e["layer"], e["expert"]) for e in cert["experts"]["selected"]] == chosen
    assert cert["parameters_changed"]
    assert job_id[1] in (work / "certificate.html").read_text()
    svg = (work / "expert_map.svg").read_text()  # the console's heatmap, selected outlined
    assert svg.startswith("<svg xmlns=\"http://www.w3.org/2000/svg\"") and "</svg>" in svg
