"""What the job pages show, read from the database for one tenant: the filtered job list
(one page), and one job's timeline, progress, scores, expert map, changed parameters and
certificate status."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.console import heatmap
from api.console.web import FilterError, bounded_choice
from service import jobs, routing_scores
from service.storage import BlobStore
from service.tables import Job, JobEvent
from workers.spec import Algorithm

STATES = tuple(s.value for s in jobs.State)
ALGORITHMS: tuple[str, ...] = Algorithm.__args__  # type: ignore[attr-defined]
PAGE_SIZE = 25
MAX_PAGE = 10_000
MAX_EXPERT_MAP_BYTES = 4 * 1024 * 1024  # diagnostics are read from the artifact up to this


@dataclass
class JobFilters:
    state: str | None = None
    algorithm: str | None = None
    model: str | None = None
    since: date | None = None
    until: date | None = None
    request: str | None = None
    page: int = 1

    def query(self, page: int | None = None) -> str:
        """The query string of these filters (for paging links)."""
        from urllib.parse import urlencode

        pairs = {
            "state": self.state, "algorithm": self.algorithm, "model": self.model,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "request": self.request, "page": page if page is not None else self.page,
        }
        return urlencode({k: v for k, v in pairs.items() if v not in (None, "")})


def _date(value: str | None, field_name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise FilterError(field_name, "must be a date YYYY-MM-DD") from None


def parse_filters(params: Any) -> JobFilters:
    """Query parameters -> filters (FilterError names a bad one)."""
    model = (params.get("model") or "").strip()
    if len(model) > 200:
        raise FilterError("model", "at most 200 characters")
    request = (params.get("request") or "").strip()
    if request and (len(request) > 64 or not request.replace("-", "").replace("_", "").isalnum()):
        raise FilterError("request", "a request id: letters, digits, - and _ (at most 64)")
    page_s = params.get("page") or "1"
    if not page_s.isdigit() or not 1 <= int(page_s) <= MAX_PAGE:
        raise FilterError("page", f"a page number from 1 to {MAX_PAGE}")
    return JobFilters(
        state=bounded_choice(params.get("state"), STATES, "state"),
        algorithm=bounded_choice(params.get("algorithm"), ALGORITHMS, "algorithm"),
        model=model or None,
        since=_date(params.get("since"), "since"),
        until=_date(params.get("until"), "until"),
        request=request or None,
        page=int(page_s),
    )


def list_jobs(session: Session, tenant: str, f: JobFilters) -> tuple[list[dict[str, Any]], bool]:
    """One page of the tenant's jobs, newest first; and whether another page follows."""
    stmt = select(Job).where(Job.tenant == tenant)
    if f.state:
        stmt = stmt.where(Job.state == f.state)
    if f.algorithm:
        stmt = stmt.where(Job.spec["algorithm"].as_string() == f.algorithm)
    if f.model:
        stmt = stmt.where(Job.spec["model"].as_string().contains(f.model, autoescape=True))
    if f.since:
        stmt = stmt.where(Job.created_at >= datetime.combine(f.since, time(), UTC))
    if f.until:
        stmt = stmt.where(Job.created_at < datetime.combine(f.until, time(), UTC) + timedelta(1))
    if f.request:
        from api.console import extras

        stmt = extras.filter_jobs_by_request(stmt, f.request)
    rows = list(
        session.execute(
            stmt.order_by(Job.created_at.desc(), Job.id.desc())
            .offset((f.page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE + 1)
        ).scalars()
    )
    items = [summary(j) for j in rows[:PAGE_SIZE]]
    return items, len(rows) > PAGE_SIZE


def summary(job: Job) -> dict[str, Any]:
    spec = job.spec or {}
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "algorithm": spec.get("algorithm"),
        "scope": spec.get("scope"),
        "model": spec.get("model"),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "requester": job.requester,
        "attempt": job.attempt,
        "max_steps": int(((spec.get("training") or {}).get("max_steps")) or 0),
        "failure_class": job.failure_class,
        "failure_message": job.failure_message,
        "cancel_requested": job.cancel_requested,
        "terminal": jobs.State(job.state) in jobs.TERMINAL,
    }


@dataclass
class Progress:
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    forget_accuracy: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    last_event_id: int = 0


def progress(session: Session, job: Job) -> Progress:
    """The stage timeline (done / current / to come, with when each began) and the latest
    training step."""
    p = Progress(max_steps=int(((job.spec or {}).get("training") or {}).get("max_steps") or 0))
    began: dict[str, datetime] = {}
    for ev in session.execute(
        select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.kind == jobs.STAGE_KIND)
        .order_by(JobEvent.id)
    ).scalars():
        began[str(ev.payload.get("stage"))] = ev.created_at
    last = jobs.latest_event(session, job.id, "step")
    if last is not None:
        p.step = last.step
        p.loss = last.payload.get("loss")
        p.forget_accuracy = (last.payload.get("metrics") or {}).get("forget_accuracy")
    p.last_event_id = session.execute(
        select(func.coalesce(func.max(JobEvent.id), 0)).where(JobEvent.job_id == job.id)
    ).scalar_one()
    if job.state == jobs.State.SUCCEEDED.value and p.step:
        p.max_steps = p.step  # stopped early by its target, or at the budget: all done
    order = [s.value for s in jobs.STAGE_ORDER]
    current = order.index(job.stage) if job.stage in order else -1
    done_all = job.state == jobs.State.SUCCEEDED.value
    for i, name in enumerate(order):
        if done_all or i < current:
            status = "done"
        elif i == current:
            status = "current" if job.state in ("RUNNING", "CANCELLING") else "stopped"
        else:
            status = "to come" if jobs.State(job.state) not in jobs.TERMINAL else "skipped"
        p.stages.append({"name": name, "label": name.replace("_", " "), "status": status,
                         "began": began.get(name)})
    return p


def scores(
    session: Session, job_id: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """(the forget / utility / retain rows, the per-topic and other rows, the routing
    overlaps: service.routing_scores.summary)."""
    from service.certificate_html import score_rows, split_scores

    nested: dict[str, dict[str, dict[str, float]]] = {"before": {}, "after": {}}
    rows = jobs.get_evaluations(session, job_id)
    for ev in rows:
        if routing_scores.is_routing_metric(ev.metric):
            continue
        nested.setdefault(ev.phase, {}).setdefault(ev.task, {})[ev.metric] = ev.value
    main, other = split_scores(score_rows(nested))
    return main, other, routing_scores.summary(rows)


def _diagnostics(session: Session, job_id: str, settings: Any) -> list[dict[str, Any]] | None:
    """Per-layer diagnostics from the job's expert-map artifact (None if unavailable)."""
    arts = [a for a in jobs.list_artifacts(session, job_id) if a.kind == "expert_map"]
    if not arts:
        return None
    root = BlobStore.from_settings(settings).root
    try:
        path = Path(arts[-1].location).resolve()
        if not path.is_relative_to(root) or path.stat().st_size > MAX_EXPERT_MAP_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = data.get("diagnostics") if isinstance(data, dict) else None
    if not isinstance(out, list):
        return None
    keys = ("layer", "top_expert", "share", "ratio")
    return [{k: d.get(k) for k in keys} for d in out if isinstance(d, dict)]


def expert_map(session: Session, job_id: str, settings: Any) -> dict[str, Any]:
    rows = jobs.get_expert_map(session, job_id)
    cells = [heatmap.Cell(r.layer, r.expert, r.score, r.selected) for r in rows]
    method = rows[0].method if rows else None
    return {
        "svg": heatmap.svg(cells, method),
        "method": method,
        "scored": len(rows),
        "selected": [
            {"layer": r.layer, "expert": r.expert, "score": r.score, "rank": r.rank}
            for r in rows if r.selected
        ],
        "diagnostics": _diagnostics(session, job_id, settings) if rows else None,
    }


def param_changes(session: Session, job_id: str) -> list[dict[str, Any]]:
    tensors = jobs.latest_payload(session, job_id, jobs.PARAM_CHANGES_KIND).get("tensors", [])
    return [t for t in tensors if isinstance(t, dict)]


def settings_groups(job: Job) -> list[dict[str, Any]]:
    from service.certificate_html import settings_groups

    keys = ("algorithm", "scope", "seuf", "objective", "training", "evaluation", "distributed")
    spec = job.spec or {}
    return settings_groups({k: spec.get(k) for k in keys})


