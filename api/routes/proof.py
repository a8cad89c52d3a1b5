"""Proof of deletion: the public keys that sign certificates and checkpoints, signed
checkpoints of the audit chain head, and a job's robustness verdicts (issue 15).

`GET /v1/certificate-key` needs no API key: public keys are public, and whoever holds a
certificate must be able to fetch the key to check it against.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from api.auth import audit_access, read_jobs, request_session
from api.errors import ApiError, ErrorBody
from api.routes.jobs import JobId

router = APIRouter(tags=["proof"])


class PublicKeyOut(BaseModel):
    key_id: str
    fingerprint: str = Field(description="`SHA256:<hex>` of the raw 32-byte public key.")
    public_key: str = Field(description="Base64 of the raw Ed25519 public key.")
    current: bool = Field(description="True for the key that signs now; false: a past key.")


class CertificateKeyOut(BaseModel):
    alg: str
    keys: list[PublicKeyOut]


class CheckpointsOut(BaseModel):
    current: dict[str, Any] = Field(
        description="A checkpoint of the chain head signed now: keep it where the "
        "database's writers cannot reach, then verify against it later."
    )
    items: list[dict[str, Any]] = Field(description="Checkpoints stored earlier, newest first.")


class RobustnessCheckOut(BaseModel):
    check: str = Field(description="router_restored, relearning, quantization or "
                       "membership_inference.")
    verdict: str = Field(description="pass, fail, or not_run (then `reason` says why).")
    threshold: str | None = Field(None, description="The rule the verdict was judged by.")
    metrics: dict[str, float] = Field(default_factory=dict)
    reason: str | None = None


class RobustnessOut(BaseModel):
    job_id: str
    failed: list[str] = Field(description="Checks whose verdict is fail.")
    checks: list[RobustnessCheckOut]


@router.get(
    "/v1/jobs/{job_id}/robustness",
    response_model=RobustnessOut,
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "The key's role may not do this."},
        404: {"model": ErrorBody, "description": "No such job (or another tenant's)."},
        422: {"model": ErrorBody, "description": "Invalid input; the body names the field."},
    },
)
def job_robustness(
    request: Request,
    job_id: JobId,
    principal: Any = Depends(read_jobs),
) -> RobustnessOut:
    """The job's robustness checks with verdicts (every default check listed; one not run
    says why), as the certificate shows them."""
    from service import jobs, proof

    with request_session(request) as session:
        job = jobs.get_job(session, job_id, principal.tenant)
        checks = proof.robustness_of(session, job.id)
    return RobustnessOut(
        job_id=job_id,
        failed=[c["check"] for c in checks if c.get("verdict") == "fail"],
        checks=[RobustnessCheckOut(**c) for c in checks],
    )


class LineageOut(BaseModel):
    job_id: str
    continuous: bool = Field(description="Every link starts from the previous link's "
                             "unlearned model (SHA-256 of the weights).")
    cut: bool = Field(description="The chain was longer than the links returned.")
    links: list[dict[str, Any]] = Field(description="Root first, this job last.")
    certificates: list[dict[str, Any]] = Field(
        description="The signed certificate of each finished link, in the same order.")


@router.get(
    "/v1/jobs/{job_id}/lineage",
    response_model=LineageOut,
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "The key's role may not do this."},
        404: {"model": ErrorBody, "description": "No such job (or another tenant's)."},
        422: {"model": ErrorBody, "description": "Invalid input; the body names the field."},
    },
)
def job_lineage(
    request: Request,
    job_id: JobId,
    principal: Any = Depends(read_jobs),
) -> LineageOut:
    """The model's lineage: the jobs (deletion requests) whose expert patches it carries,
    with each one's signed certificate."""
    from service import audit, certificate, jobs, lineage
    from service.jobs import TERMINAL, State

    settings = request.app.state.settings
    with request_session(request) as session:
        job = jobs.get_job(session, job_id, principal.tenant)
        chain = lineage.lineage(session, job)
        # The whole audit chain verified once for every certificate of the answer (up to
        # lineage.MAX_LINKS of them), not once per certificate.
        verified = audit.verify(session, settings=settings)
        certs = [certificate.build_certificate(session, link["job_id"], principal.tenant,
                                               settings, verified)
                 for link in chain["links"] if State(link["state"]) in TERMINAL]
    return LineageOut(job_id=job_id, continuous=chain["continuous"], cut=chain["cut"],
                      links=chain["links"], certificates=certs)


@router.get("/v1/certificate-key", response_model=CertificateKeyOut)
def certificate_key(request: Request) -> CertificateKeyOut:
    """The current signing key and every past one (key rotation keeps old certificates
    verifiable by key_id)."""
    from service import signing

    keys = signing.published_keys(request.app.state.settings)
    return CertificateKeyOut(
        alg=signing.ALG,
        keys=[PublicKeyOut(key_id=k.key_id, fingerprint=k.fingerprint,
                           public_key=k.public_key, current=k.current) for k in keys],
    )


@router.get(
    "/v1/audit/checkpoints",
    response_model=CheckpointsOut,
    responses={
        401: {"model": ErrorBody, "description": "Missing or invalid API key."},
        403: {"model": ErrorBody, "description": "Not an auditor key."},
        409: {"model": ErrorBody, "description": "The chain does not verify."},
    },
)
def audit_checkpoints(
    request: Request,
    limit: int = Query(20, ge=1, le=500),
    principal: Any = Depends(audit_access),
) -> CheckpointsOut:
    """A signed checkpoint of the chain head, made now (refused while the chain does not
    verify), and the stored ones."""
    from service import checkpoints

    settings = request.app.state.settings
    with request_session(request) as session:
        try:
            current = checkpoints.current_checkpoint(session, settings)
        except checkpoints.ChainBroken as e:
            raise ApiError(
                409, "audit", e.reason, location="request", code="chain_broken"
            ) from None
        items = checkpoints.list_checkpoints(session, limit)
    return CheckpointsOut(current=current, items=items)


def verify_against(request: Request, against: str) -> Any:
    """`GET /v1/audit/verify?against=`: the chain, and that it still extends the checkpoint."""
    from api.schemas import AuditVerifyOut
    from service import checkpoints
    from service.errors import InvalidArgument

    try:
        doc = checkpoints.parse_checkpoint(against)
    except InvalidArgument as e:
        raise ApiError(422, "against", e.reason, location="query") from None
    with request_session(request) as session:
        r = checkpoints.verify_against(session, doc, settings=request.app.state.settings)
    chain = r.chain
    return AuditVerifyOut(
        ok=r.ok,
        checked=chain.checked if chain else 0,
        first_bad_seq=r.first_bad_seq,
        reason=r.reason,
        head_seq=chain.head_seq if chain else 0,
        head_hash=chain.head_hash if chain else "",
    )
