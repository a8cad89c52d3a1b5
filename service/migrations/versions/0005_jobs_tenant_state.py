"""Index jobs by (tenant, state): the submit-time admission check (unfinished jobs of a
tenant, service/limits.py) counts from the index instead of reading every job row of the
tenant.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 01:35:00
"""

from __future__ import annotations

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_state", ["tenant", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_state")
