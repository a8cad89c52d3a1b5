"""Acceptance of issue 15, deletion requests on one model in sequence: a real API process
and a real dispatcher (api.demo.embedded_service) on the small demo world. Request A
forgets topic 0 of the demo model; request B forgets topic 1 starting from A's output
(`model: job:<A>`, its corpora uploaded: the world's topic-1 sentences, and a retain pool
without topics 0 and 1, so B never rehearses what A removed). After B, the model (B's
downloaded artifact, scored here on the world's questions) still has both topics
forgotten and keeps its utility on facts of the other topics; both jobs are listed under
their requests with due dates; B's lineage is A then B, continuous by weight hashes, each
with a signed certificate that verifies."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from api.client import Client
from api.demo import DEFAULT_SPEC, embedded_service
from service import signing
from tests.small_world import example_on_small_world

CHANCE = 0.25  # four-choice questions


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _accuracy(model: Any, tok: Any, questions: list[dict[str, Any]]) -> float:
    from workers.evaluate import score_questions

    hits = score_questions(model, tok, questions, batch_size=64)
    return sum(hits) / len(hits)


def _scores(world: Any, model: Any) -> dict[str, float]:
    tok = world.load_tokenizer()
    others = [q for q in world.question_set("retain_unseen", forget_topic=0)
              if q["topic"] not in (0, 1)]
    return {"topic0": _accuracy(model, tok, world.question_set("forget", forget_topic=0)),
            "topic1": _accuracy(model, tok, world.question_set("forget", forget_topic=1)),
            "others_unseen": _accuracy(model, tok, others)}


@pytest.mark.slow
def test_two_requests_in_sequence_forget_two_topics(small_world, tmp_path):
    from transformers import AutoModelForCausalLM

    world = small_world
    before = _scores(world, world.load_model())
    spec_a = example_on_small_world(DEFAULT_SPEC.name)  # topic 0, the demo's own settings
    spec_a["evaluation"] = {"backend": "direct"}
    # One expert, its router's own update (what the NLL figures below were measured with):
    # the chain of patches is under test, not the selection (auto falls back on this world).
    spec_a["seuf"].update(num_experts=1, router_projection="none")
    forget_b = _read(world.corpus_path("forget", forget_topic=1))
    retain_b = [r for r in _read(world.corpus_path("retain", forget_topic=1))
                if r["topic"] not in (0, 1)]
    work = tmp_path / "svc"
    work.mkdir()
    with embedded_service(work, ray_cpus=1) as svc, Client(svc.base_url, svc.requester_key) as c:
        req_a = c.request_json("POST", "/v1/requests", json={"reference": "case-A"})
        req_b = c.request_json("POST", "/v1/requests", json={"reference": "case-B"})
        job_a = c.submit(spec_a, request_id=req_a["id"])
        job_a = c.wait(job_a["id"], timeout=1200, interval=1.0)
        assert job_a["state"] == "SUCCEEDED", job_a
        spec_b = {
            **{k: spec_a[k] for k in ("algorithm", "scope", "seuf", "objective")},
            "model": f"job:{job_a['id']}",
            "forget": {"corpus_id": c.upload_corpus(_jsonl(forget_b))["id"]},
            "retain": {"corpus_id": c.upload_corpus(_jsonl(retain_b))["id"]},
            # no world questions for a model that is not `demo`: stop on the forget NLL
            # instead (measured on this world: topic 1 at NLL 13.9 still scored 0.44)
            "training": {**spec_a["training"], "max_steps": 200,
                         "stop": {"forget_loss_target": 20.0, "eval_every": 3}},
        }
        job_b = c.submit(spec_b, request_id=req_b["id"])
        job_b = c.wait(job_b["id"], timeout=1200, interval=1.0)
        assert job_b["state"] == "SUCCEEDED", job_b
        tar = c.download_kind(job_b["id"], "model", tmp_path / "model.tar")
        got_a = c.request_json("GET", f"/v1/requests/{req_a['id']}")
        got_b = c.request_json("GET", f"/v1/requests/{req_b['id']}")
        lineage = c.request_json("GET", f"/v1/jobs/{job_b['id']}/lineage")
        cert_b = c.certificate(job_b["id"])
        cert_a = c.certificate(job_a["id"])
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "b", filter="data")
    after = _scores(world, AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model"))

    # Both topics forgotten after the second job; the other topics' unseen facts kept.
    assert before["topic0"] > 0.9 and before["topic1"] > 0.9, before
    assert after["topic0"] <= CHANCE + 0.15, (before, after)
    assert after["topic1"] <= CHANCE + 0.15, (before, after)
    assert after["others_unseen"] >= before["others_unseen"] - 0.1, (before, after)

    # Each job under its request, with the request's due date.
    for req, job in ((got_a, job_a), (got_b, job_b)):
        assert [(j["job_id"], j["state"]) for j in req["jobs"]] == [(job["id"], "SUCCEEDED")]
        assert req["due_at"] > req["received_at"]

    # B's model carries A's patch, then B's: a continuous chain of signed certificates.
    links = lineage["links"]
    assert [x["job_id"] for x in links] == [job_a["id"], job_b["id"]]
    assert lineage["continuous"] and links[1]["continuous"] and not lineage["cut"]
    assert links[0]["deletion_request"]["id"] == req_a["id"]
    assert links[1]["deletion_request"]["due_at"] == cert_b["deletion_request"]["due_at"]
    assert links[1]["model"] == f"job:{job_a['id']}"
    assert links[1]["model_sha256_before"] == links[0]["model_sha256_after"]
    assert all(x["expert_patch_sha256"] and x["experts"] for x in links)
    assert cert_b["lineage"]["links"] == links
    assert [x["job_id"] for x in lineage["certificates"]] == [job_a["id"], job_b["id"]]
    assert all(signing.verify_document(x).valid for x in lineage["certificates"])
    assert cert_a["lineage"]["links"] == links[:1]
