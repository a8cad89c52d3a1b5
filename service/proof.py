"""Robustness verdicts of a job, as the database keeps them and the certificate and the
deletion request read them.

The pipeline's robustness stage (`workers.robustness.run_robustness_checks`) returns one
result per check as plain JSON data: `{"check", "verdict", "threshold", "metrics",
"reason"}`. `record_robustness` stores them as one job event (kind `robustness`, the whole
results) and as evaluations with phase `robustness` (task = check, metric = each number,
plus `verdict` coded 1 pass / 0 fail / -1 not_run), so they show in
`GET /v1/jobs/{id}/evaluations` next to the scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from service import jobs
from service.tables import Evaluation

ROBUSTNESS_KIND = "robustness"
PHASE = "robustness"
# The four checks every job runs by default (workers/robustness.py).
CHECKS = ("router_restored", "relearning", "quantization", "membership_inference")
VERDICTS = ("pass", "fail", "not_run")
VERDICT_CODE = {"pass": 1.0, "fail": 0.0, "not_run": -1.0}


def _clean(check: Mapping[str, Any]) -> dict[str, Any]:
    name = str(check.get("check", ""))[:64]
    verdict = check.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"check {name!r}: verdict must be one of {VERDICTS}")
    metrics = {
        str(k)[:64]: float(v)
        for k, v in dict(check.get("metrics") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    threshold = check.get("threshold")
    return {
        "check": name,
        "verdict": verdict,
        "threshold": str(threshold)[:400] if threshold is not None else None,
        "metrics": metrics,
        "reason": str(check["reason"])[:400] if check.get("reason") else None,
    }


def record_robustness(
    session: Session, job_id: str, owner: str, checks: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Store the results of the robustness stage of the current attempt (replacing earlier
    ones). The caller holds the job's lease (`owner`)."""
    cleaned = [_clean(c) for c in checks]
    jobs.record_event(session, job_id, owner, 0, ROBUSTNESS_KIND, {"checks": cleaned})
    session.execute(delete(Evaluation).where(Evaluation.job_id == job_id,
                                             Evaluation.phase == PHASE))
    for c in cleaned:
        values = {**c["metrics"], "verdict": VERDICT_CODE[c["verdict"]]}
        for metric, value in values.items():
            session.add(Evaluation(job_id=job_id, phase=PHASE, task=c["check"],
                                   metric=metric, value=value))
    session.flush()
    return cleaned


def robustness_of(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's checks (latest attempt), every default check present: one that no stage
    reported is `not_run` with the reason."""
    ev = jobs.latest_event(session, job_id, ROBUSTNESS_KIND)
    found = list(ev.payload.get("checks", [])) if ev is not None else []
    names = {c.get("check") for c in found}
    reason = ("not requested by the job's spec (evaluation.robustness)" if ev is not None
              else "no robustness result was recorded for this job")
    for name in CHECKS:
        if name not in names:
            found.append({"check": name, "verdict": "not_run", "threshold": None,
                          "metrics": {}, "reason": reason})
    return found


def failed_checks(session: Session, job_id: str) -> list[str]:
    return [c["check"] for c in robustness_of(session, job_id) if c["verdict"] == "fail"]
