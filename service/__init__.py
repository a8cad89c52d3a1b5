"""Persistence and orchestration of moe-unlearn jobs (no HTTP, no torch).

Entry points (all take a SQLAlchemy `Session`, flush but never commit: wrap calls in
`service.db.session_scope(factory)` so a change and its audit entry commit together):

- settings: `get_settings() -> Settings`
- db: `make_engine(url)`, `make_session_factory(engine)`, `session_scope(factory)`,
  `upgrade(url)`, `check_migrated(engine)` (raises `DatabaseNotMigrated`)
- jobs: `submit_job`, `claim_next`, `heartbeat`, `set_stage`, `record_event`,
  `record_expert_map`, `record_evaluations`, `record_artifact`, `record_param_changes`,
  `record_model`, `finish_job`, `request_cancel`, `reclaim_expired`, `get_job`,
  `list_jobs`, `list_events`, `get_expert_map`, `get_evaluations`, `list_artifacts`,
  `get_artifact`
- audit: `append`, `verify -> VerifyResult`, `list_entries`, `entry_to_dict`
- certificate: `build_certificate -> dict`, `render_html(cert) -> str`
- signing: `sign_document`, `verify_document`, `signing_key`, `published_keys`, `audit_key`
- checkpoints: `current_checkpoint`, `export`, `verify_against` (signed audit checkpoints)
- requests: `create_request`, `attach_job`, `extend_due`, `close_request`, `report_overdue`
- proof: `record_robustness`, `robustness_of` (robustness verdicts of a job)
- storage: `BlobStore`, `store_corpus(session, data) -> CorpusInfo`, `validate_corpus`
- keys: `create_key -> (key_id, secret)`, `authenticate -> Principal | None`,
  `revoke_key`, `list_keys`, `any_keys`
- errors: every error the client can cause is a `ServiceError(field, reason)`:
  NotFound (404), IllegalTransition (409), IdempotencyConflict (422), LeaseLost (409),
  InvalidArgument/InvalidCursor (422), SpecRejected (422), CorpusError (422/413),
  CertificateUnavailable (409), InvalidKeyRequest (422).
"""
