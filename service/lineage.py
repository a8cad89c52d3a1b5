"""The lineage of a job's model (issue 15): deletion requests on one model run in sequence,
each job starting from the previous job's output (`model: job:<id>`, service.models), so
the current model carries a chain of expert patches. `lineage` walks that chain back to
the first model, and returns one link per job, root first and the job itself last: its
deletion request (id, due date), the experts it changed, the model hash before and after,
the expert patch's hash, and whether the link is continuous (its model before equals the
previous job's model after, by SHA-256 of the weights). The certificate carries these
links (signed); `GET /v1/jobs/{id}/lineage` returns them with each link's own signed
certificate: the model's lineage as a list of certificates.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.jobs import MODEL_KIND, RESULT_KIND, get_expert_map, latest_payload
from service.tables import Artifact, DeletionRequest, DeletionRequestJob, Job

JOB_PREFIX = "job:"  # as service.models names an earlier job's output
MAX_LINKS = 64  # a chain longer than this is cut (and says so): bounded work per request


def chain(session: Session, job: Job) -> tuple[list[Job], bool]:
    """The jobs whose outputs `job`'s model descends from, root first, `job` last (same
    tenant only), and whether the walk was cut at MAX_LINKS."""
    jobs: list[Job] = []
    seen: set[str] = set()
    cur: Job | None = job
    while cur is not None and cur.id not in seen:
        if len(jobs) == MAX_LINKS:
            return jobs[::-1], True
        jobs.append(cur)
        seen.add(cur.id)
        model = str((cur.spec or {}).get("model", ""))
        parent = session.get(Job, model[len(JOB_PREFIX):]) if model.startswith(JOB_PREFIX) else None
        cur = parent if parent is not None and parent.tenant == job.tenant else None
    return jobs[::-1], False


def link(session: Session, job: Job) -> dict[str, Any]:
    """One job of a lineage as plain data."""
    req = session.execute(
        select(DeletionRequest)
        .join(DeletionRequestJob, DeletionRequestJob.request_id == DeletionRequest.id)
        .where(DeletionRequestJob.job_id == job.id)
    ).scalar_one_or_none()
    patch = session.execute(
        select(Artifact.sha256).where(Artifact.job_id == job.id, Artifact.kind == "expert_patch")
        .order_by(Artifact.id.desc()).limit(1)
    ).scalar_one_or_none()
    return {
        "job_id": job.id,
        "state": job.state,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "model": (job.spec or {}).get("model"),
        "deletion_request": (
            {"id": req.id, "due_at": req.due_at.isoformat()} if req is not None else None
        ),
        "experts": [{"layer": r.layer, "expert": r.expert}
                    for r in get_expert_map(session, job.id) if r.selected],
        "model_sha256_before": latest_payload(session, job.id, MODEL_KIND).get("sha256"),
        "model_sha256_after": latest_payload(session, job.id, RESULT_KIND).get(
            "unlearned_model_sha256"
        ),
        "expert_patch_sha256": patch,
    }


def lineage(session: Session, job: Job) -> dict[str, Any]:
    """`{links: [...root first, this job last], continuous, cut}`: continuous when every
    link's model before is the previous link's model after (and every job succeeded
    before its successor)."""
    jobs, cut = chain(session, job)
    links = [link(session, j) for j in jobs]
    ok = True
    for prev, cur in zip(links, links[1:], strict=False):
        after = prev["model_sha256_after"]
        cur["continuous"] = bool(prev["state"] == "SUCCEEDED" and after
                                 and cur["model_sha256_before"] == after)
        ok = ok and cur["continuous"]
    return {"links": links, "continuous": ok and not cut, "cut": cut}


__all__ = ["MAX_LINKS", "chain", "lineage", "link"]
