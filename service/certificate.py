"""The deletion certificate of a finished job, as JSON data and as a readable HTML page.

It states who asked and when, the corpus by hash and size (never its text), the model and
its hash, the algorithm and its settings, the selected experts with their scores, the
parameters that changed (tensor names, slices, hashes before and after), the forget and
utility scores before and after, the routing overlap, and the audit entries that cover the
job (their seq and hashes: `GET /v1/audit/verify` proves they were not edited since).
`certificate_sha256` is the SHA-256 of the canonical JSON of everything else except
`verification` (the result of re-verifying the whole audit chain when it was built).
`robustness` lists the four robustness checks with their verdicts (`service.proof`).
`lineage` lists the jobs whose expert patches the model carries (`service.lineage`).
`signature` is the service's Ed25519 signature over the canonical JSON of everything else
(`service.signing`); `moe-unlearn certificate verify FILE` checks it offline.

What the runner records for it (via `service.jobs`): `record_model` (model hash),
`record_expert_map`, `record_param_changes`, `record_evaluations` (phase before/after;
the metric `routing_overlap` of any task is reported as the routing overlap).
`routing_overlap_retain` is the retain routing overlap in full (`service.routing_scores`:
overall, from the target layer up, per layer); None for jobs that recorded none.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import audit, lineage, proof, routing_scores, signing
from service.errors import ServiceError
from service.jobs import (
    MODEL_KIND,
    PARAM_CHANGES_KIND,
    RESULT_KIND,
    TERMINAL,
    State,
    get_evaluations,
    get_expert_map,
    get_job,
    latest_payload,
    list_artifacts,
)
from service.settings import Settings
from service.tables import (
    ApiKey,
    AuditEntry,
    Corpus,
    DeletionRequest,
    DeletionRequestJob,
)
from workers.spec import canonical_json

SCHEMA = "moe-unlearn/deletion-certificate/v1"
SETTINGS_KEYS = ("algorithm", "scope", "seuf", "objective", "training", "distributed")


class CertificateUnavailable(ServiceError):
    """The job has not finished yet."""


def _ran(result: dict[str, Any]) -> dict[str, Any]:
    """What the job ran, from its recorded result: the spec's scope and learning rate, or
    what replaced them (num_experts auto's fallback to full parameters caps the lr)."""
    selection = result.get("selection") or {}
    auto = selection.get("auto") or {}
    used = result.get("training_used") or {}
    return {
        "scope": result.get("scope"),
        "selection_outcome": auto.get("outcome"),  # qualified / widen / full; None: not auto
        "selection_warning": selection.get("selection_warning"),
        "lr": used.get("lr"),
        "max_steps": used.get("max_steps"),
        "steps": result.get("steps"),
        "precision": result.get("precision"),
        # What kept retain routing in place (issue 13); None: recorded before these existed.
        "router_projection": selection.get("router_projection_mode"),
        "retain_routing_weight": (selection.get("retain_routing") or {}).get("weight"),
        # Under auto's full fallback: what was projected (all / routers) and, for RMU with
        # all, the layer it steered; None: no fallback ran, or recorded before these.
        "fallback_projection": selection.get("fallback_projection"),
        "fallback_rmu_layer": selection.get("fallback_rmu_layer"),
        # The layers it climbed to when forgetting stalled (workers/rmu_climb.py).
        "fallback_rmu_climbs": [
            {"step": c.get("step"), "to_layer": c.get("to_layer")}
            for c in selection.get("fallback_rmu_climbs") or []
        ],
        # RMU's first attempt missed its target and the other kind of plan trained after
        # it (workers/attempt.py); None: no second attempt ran.
        "second_attempt": _second_attempt(selection.get("second_attempt")),
    }


def _second_attempt(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if not record:
        return None
    first = record.get("first") or {}

    def experts(selected: list[dict[str, Any]] | None) -> list[str]:
        return [f"{e.get('layer')}:{e.get('expert')}" for e in selected or []]

    return {
        "kind": record.get("kind"),  # top_expert (after the fallback) or fallback
        "first_scope": first.get("scope"),
        "first_experts": experts(first.get("selected")),
        "first_steps": first.get("steps"),
        "experts": experts(record.get("selected")),
        "steps": record.get("steps"),
        "target_met": record.get("target_met"),
        "kept": record.get("kept"),  # first or second: which one the model is
    }


def _corpus(session: Session, ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    if ref.get("corpus_id"):
        row = session.get(Corpus, ref["corpus_id"])
        return {
            "source": "upload",
            "sha256": ref["corpus_id"],
            "size_bytes": row.size if row else None,
            "records": row.records if row else None,
            "format": row.format if row else None,
            "max_records": ref.get("max_records"),
        }
    if ref.get("demo"):
        return {"source": "demo", "split": ref["demo"], "max_records": ref.get("max_records")}
    return {"source": "local_file", "max_records": ref.get("max_records")}


def _deletion_request(session: Session, job_id: str) -> dict[str, Any] | None:
    """The deletion request the job served (its reference stays out: it may name a case;
    so does its status, which changes: the certificate's facts do not)."""
    req = session.execute(
        select(DeletionRequest)
        .join(DeletionRequestJob, DeletionRequestJob.request_id == DeletionRequest.id)
        .where(DeletionRequestJob.job_id == job_id)
    ).scalar_one_or_none()
    if req is None:
        return None
    return {"id": req.id, "received_at": req.received_at.isoformat(),
            "due_at": req.due_at.isoformat()}


def _retain_overlap(evals: list[Any]) -> dict[str, Any] | None:
    routing = routing_scores.summary(evals)
    if routing is None or routing["retain"] is None:
        return None
    return {
        "overall": routing["retain"],
        "from_target": routing["retain_from_target"],
        "per_layer": routing["retain_per_layer"],
    }


def deletion_status(state: str, failure_class: str | None) -> str:
    if state == State.SUCCEEDED.value:
        return "complete"
    if state == State.FAILED.value and failure_class == "target_not_met":
        return "incomplete"
    return "none"


def build_certificate(
    session: Session,
    job_id: str,
    tenant: str | None = None,
    settings: Settings | None = None,
    verification: audit.VerifyResult | None = None,
) -> dict[str, Any]:
    """The signed certificate of a finished job (`NotFound` for another tenant's job,
    `CertificateUnavailable` while it runs). `verification`: the audit chain verified
    once for several certificates of one request (the lineage), else verified here."""
    job = get_job(session, job_id, tenant)
    if State(job.state) not in TERMINAL:
        raise CertificateUnavailable(
            "state", f"the job is {job.state}; certificates exist for finished jobs only"
        )
    spec = job.spec
    key = session.get(ApiKey, job.requester) if job.requester else None
    emap = get_expert_map(session, job.id)
    evals = get_evaluations(session, job.id)
    scores: dict[str, dict[str, dict[str, float]]] = {"before": {}, "after": {}}
    overlap: dict[str, float] = {}
    for ev in evals:
        if ev.phase == proof.PHASE:
            continue  # reported whole, with verdicts, under "robustness"
        if ev.metric == routing_scores.OVERLAP:
            overlap[f"{ev.task}/{ev.phase}"] = ev.value
        if routing_scores.is_routing_metric(ev.metric):
            continue
        scores.setdefault(ev.phase, {}).setdefault(ev.task, {})[ev.metric] = ev.value
    model_ev = latest_payload(session, job.id, MODEL_KIND)
    result_ev = latest_payload(session, job.id, RESULT_KIND)
    changes = latest_payload(session, job.id, PARAM_CHANGES_KIND).get("tensors", [])
    entries = list(
        session.execute(
            select(AuditEntry).where(AuditEntry.job_id == job.id).order_by(AuditEntry.seq)
        ).scalars()
    )
    body: dict[str, Any] = {
        "schema": SCHEMA,
        "job_id": job.id,
        "outcome": job.state,
        "deletion_performed": job.state == State.SUCCEEDED.value,
        # complete: SUCCEEDED; incomplete: it trained but never met its forget target (its
        # best state is the job's artifacts); none: nothing was deleted
        "deletion": deletion_status(job.state, job.failure_class),
        "request": {
            "tenant": job.tenant,
            "requested_by": job.requester,
            "requester_role": key.role if key else None,
            "requested_at": job.created_at.isoformat(),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "attempts": job.attempt,
            "spec_hash": job.spec_hash,
        },
        "deletion_request": _deletion_request(session, job.id),
        "forget_corpus": _corpus(session, spec.get("forget")),
        "retain_corpus": _corpus(session, spec.get("retain")),
        "model": {
            "ref": spec.get("model"),
            "revision": model_ev.get("revision"),  # the commit it resolved to
            "sha256": model_ev.get("sha256"),
            "output": result_ev.get("output_model"),  # full, or patch (no model written)
        },
        "method": {k: spec.get(k) for k in SETTINGS_KEYS},
        "ran": _ran(result_ev),
        "experts": {
            "method": emap[0].method if emap else None,
            "selected": [
                {"layer": r.layer, "expert": r.expert, "score": r.score, "rank": r.rank}
                for r in emap
                if r.selected
            ],
            "scored": len(emap),
        },
        "parameters_changed": changes,
        "scores": scores,
        "routing_overlap": overlap,
        "routing_overlap_retain": _retain_overlap(evals),
        "robustness": proof.robustness_of(session, job.id),
        # the chain of expert patches this job's model carries (root first, this job last)
        "lineage": lineage.lineage(session, job),
        "failure": (
            {"class": job.failure_class, "message": job.failure_message}
            if job.state == State.FAILED.value
            else None
        ),
        "artifacts": [
            {"kind": a.kind, "name": a.name, "sha256": a.sha256, "size": a.size}
            for a in list_artifacts(session, job.id)
        ],
        "audit": {
            "entries": [
                {"seq": e.seq, "action": e.action, "ts": e.ts, "entry_hash": e.entry_hash}
                for e in entries
            ],
        },
    }
    # The hash covers the facts only, so it stays the same however often it is rebuilt;
    # the verification below reflects the chain at the time of the request.
    body["certificate_sha256"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
    v = verification or audit.verify(session, settings=settings)
    body["verification"] = {
        "chain_ok": v.ok,
        "checked_entries": v.checked,
        "first_bad_seq": v.first_bad_seq,
        "reason": v.reason,
        "chain_head_seq": v.head_seq,
        "chain_head_hash": v.head_hash,
    }
    return signing.sign_document(body, settings)


def render_html(cert: dict[str, Any]) -> str:
    """A self-contained HTML page of the certificate (every value escaped): the template
    in service/templates/certificate.html, shared by the API and the console."""
    from service.certificate_html import render

    return render(cert)
