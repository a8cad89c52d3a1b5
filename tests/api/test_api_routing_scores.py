"""Issue 13 through the real path: a small-world job whose retain corpus covers 2 of the 5
non-forget topics (`world.retain_topics`) runs in the engine (`run_job`); the dispatcher's
own recording functions write its outputs to the API's database (SQLite and PostgreSQL),
and they are read back over HTTP: the evaluations' `routing` block, the certificate (JSON
and HTML) and the console's job page carry the retain routing overlap per layer and from
the target layer up, and `utility_accuracy_uncovered_topics` equals a direct count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.client import Client
from service import jobs
from service.db import session_scope
from service.recording import read_outputs, record_success
from service.routing_scores import summary
from tests.api.conftest import Driver, Keys
from tests.console.kit import sign_in
from tests.small_world import example_on_small_world
from workers.results import JobResult, overlap_from_target, target_layer
from workers.spec import JobSpec

UNCOVERED = (3, 4, 5)  # forget topic 0; retain_topics 2 covers topics 1 and 2


@pytest.fixture(scope="module")
def narrow_job(small_world, tmp_path_factory) -> tuple[dict[str, Any], JobResult, Path]:
    """The shipped GDiff + SEUF example on the small world, its retain corpus narrowed to
    two topics, the expert chosen in the upper layer (so that layer 0 is frozen and the
    overlap from the target layer up differs from the overall one), 6 steps, direct
    scoring, no robustness checks."""
    from workers.run import run_job

    spec = example_on_small_world("demo-gdiff-seuf.yaml")
    spec["world"]["retain_topics"] = 2
    spec["training"]["max_steps"] = 6
    # No forget target: 6 steps measure routing, not a deletion (a job that set a target and
    # missed it would end FAILED, target_not_met).
    spec["training"]["stop"] = {"forget_accuracy_target": None, "eval_every": 3}
    spec["seuf"].update(selection="in_layer", layer=1)
    spec["evaluation"] = {"backend": "direct", "robustness": []}
    out = tmp_path_factory.mktemp("narrow") / "out"
    return spec, run_job(JobSpec.model_validate(spec), out), out


def _uncovered_accuracy(model: Any, tok: Any, world: Any) -> float:
    from workers.evaluate import score_questions

    qs = [q for q in world.questions() if q["topic"] in UNCOVERED and q["phrasing"] == "train"]
    assert len(qs) == len(UNCOVERED) * 50  # every fact of those topics, pool and unseen
    hits = score_questions(model, tok, qs)
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_narrow_retain_corpus_and_uncovered_utility(narrow_job, small_world) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.job import load_job

    spec, res, out = narrow_job
    job = load_job(JobSpec.model_validate(spec))
    pool = [json.loads(x) for t in (1, 2)
            for x in small_world.corpus_path("forget", forget_topic=t).read_text().splitlines()]
    expected = [(r["prompt"], r["answer"]) for r in pool if r["split"] == "pool"]
    assert [(r.prompt, r.answer) for r in job.retain_records] == expected  # topics 1, 2 only
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    after = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    before = _uncovered_accuracy(small_world.load_model(), tok, small_world)
    assert res.before["utility_accuracy_uncovered_topics"] == before
    assert res.after["utility_accuracy_uncovered_topics"] == _uncovered_accuracy(
        after, tok, small_world)
    assert before >= 0.9  # the world knew them
    # the other sets keep their meaning: retain pool and unseen facts of every other topic
    assert res.after["num_questions"] == len(small_world.questions())
    per = res.routing_overlap_retain_per_layer
    assert [s["layer"] for s in res.selected] == [1] and set(per) == {"0", "1"}
    assert per["0"] == 1.0  # frozen below the target: kept for free, lifting the mean
    assert res.routing_overlap_retain_from_target == per["1"] < res.routing_overlap_retain


def test_overlap_from_target_skips_only_the_frozen_layers() -> None:
    per = {"0": 1.0, "1": 0.8, "2": 0.6}
    assert overlap_from_target(per, target_layer("seuf", [{"layer": 1, "expert": 3}])) == (
        pytest.approx(0.7))
    # every layer trains with full parameters, also when auto fell back to it
    assert target_layer("full", [{"layer": 1, "expert": 3}]) is None
    assert overlap_from_target(per, None) == pytest.approx(0.8)
    assert overlap_from_target(None, 1) is None and summary([]) is None


@pytest.mark.slow
def test_routing_overlap_per_layer_in_db_api_certificate_and_console(
    narrow_job, app: FastAPI, client: TestClient, api_keys: Keys, driver: Driver
) -> None:
    spec, res, out = narrow_job
    c = Client(http=client, api_key=api_keys.requester)
    jid = c.submit(spec)["id"]
    # The dispatcher's part: claim, then its own recording of the attempt's outputs.
    driver.claim(jid)
    driver.stage(jid, "evaluating_after")
    outputs = read_outputs(res, out, driver.settings.model_tar_max_bytes, model="demo",
                           job_id=jid)
    with session_scope(driver.factory) as s:
        state = record_success(s, jid, driver.owner, outputs, jobs.Stage.EVALUATING_AFTER)
    assert state == "SUCCEEDED"

    per = res.routing_overlap_retain_per_layer
    assert per and len(per) == 2  # the small model's two MoE layers
    with session_scope(driver.factory) as s:
        rows = {(e.phase, e.task, e.metric): e.value for e in jobs.get_evaluations(s, jid)}
    assert {k: v for (p, t, k), v in rows.items()
            if t == "retain" and k.startswith("routing_overlap_per_layer.")} == {
        f"routing_overlap_per_layer.{layer}": v for layer, v in per.items()}
    assert rows[("after", "retain", "routing_overlap_from_target")] == pytest.approx(
        res.routing_overlap_retain_from_target)
    for phase in ("before", "after"):
        assert rows[(phase, "utility", "accuracy_uncovered_topics")] == pytest.approx(
            getattr(res, phase)["utility_accuracy_uncovered_topics"])

    routing = c.evaluations(jid)["routing"]
    assert routing["retain_per_layer"] == pytest.approx(per)
    assert {k: v for k, v in routing.items() if k != "retain_per_layer"} == pytest.approx({
        "forget": res.routing_overlap_forget,
        "retain": res.routing_overlap_retain,
        "retain_from_target": res.routing_overlap_retain_from_target,
    })
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "retain_per_layer" in schema["RoutingOverlapOut"]["properties"]

    cert = c.certificate(jid)
    block = cert["routing_overlap_retain"]
    assert block["per_layer"] == pytest.approx(per)
    assert (block["overall"], block["from_target"]) == pytest.approx(
        (res.routing_overlap_retain, res.routing_overlap_retain_from_target))
    assert not [m for m in cert["scores"]["after"]["retain"] if m.startswith("routing")]
    assert cert["scores"]["after"]["utility"]["accuracy_uncovered_topics"] == pytest.approx(
        res.after["utility_accuracy_uncovered_topics"])
    page = client.get(f"/v1/jobs/{jid}/certificate", params={"format": "html"},
                      headers=Keys.h(api_keys.auditor)).text
    assert "Retain routing overlap per layer" in page
    for v in (*per.values(), res.routing_overlap_retain_from_target):
        assert f"{v:.3f}" in page

    with TestClient(app, raise_server_exceptions=False) as browser:  # its own cookies
        assert sign_in(browser, api_keys.auditor).status_code == 303
        html = browser.get(f"/console/jobs/{jid}").text
    table = html[html.index('id="retain-overlap"'):]
    table = table[: table.index("</table>")]
    for layer, v in per.items():
        assert f"<td>{layer}</td><td class=\"n\">{v:.3f}</td>" in table
