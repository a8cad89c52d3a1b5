"""Schema for deletion requests, certificate signing keys, audit checkpoints (issue 15).

Audit entries and the chain head gain a `mac` column (HMAC with a key the database does
not hold). Entries written before this revision keep `mac` NULL: the service anchors them
with a signed checkpoint of the head on its next append (service/audit.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 18:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.add_column(sa.Column("mac", sa.String(length=64), nullable=True))
    with op.batch_alter_table("audit_head") as batch_op:
        batch_op.add_column(sa.Column("mac", sa.String(length=64), nullable=True))
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", _PK, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_audit_checkpoints_kind_seq", "audit_checkpoints", ["kind", "seq"], unique=False
    )
    op.create_table(
        "deletion_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("extended", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("overdue_reported", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "reference", name="uq_requests_reference"),
    )
    op.create_index("ix_deletion_requests_tenant", "deletion_requests", ["tenant"])
    op.create_index("ix_deletion_requests_due_at", "deletion_requests", ["due_at"])
    op.create_index("ix_deletion_requests_status", "deletion_requests", ["status"])
    op.create_table(
        "deletion_request_jobs",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["deletion_requests.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("request_id", "job_id"),
        sa.UniqueConstraint("job_id"),
    )


def downgrade() -> None:
    op.drop_table("deletion_request_jobs")
    op.drop_index("ix_deletion_requests_status", table_name="deletion_requests")
    op.drop_index("ix_deletion_requests_due_at", table_name="deletion_requests")
    op.drop_index("ix_deletion_requests_tenant", table_name="deletion_requests")
    op.drop_table("deletion_requests")
    op.drop_index("ix_audit_checkpoints_kind_seq", table_name="audit_checkpoints")
    op.drop_table("audit_checkpoints")
    with op.batch_alter_table("audit_head") as batch_op:
        batch_op.drop_column("mac")
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.drop_column("mac")
