"""Schema for tenant-owned corpora, registered models, key expiry and platform admins (issue 14).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 18:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("platform", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "corpus_records",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("keep_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "sha256", name="uq_corpus_records_tenant_sha"),
    )
    with op.batch_alter_table("corpus_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_corpus_records_sha256"), ["sha256"], unique=False)
    op.create_table(
        "registered_models",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("hub_id", sa.String(length=256), nullable=True),
        sa.Column("revision", sa.String(length=128), nullable=True),
        sa.Column("path", sa.String(length=512), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("registered_models")
    with op.batch_alter_table("corpus_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_corpus_records_sha256"))
    op.drop_table("corpus_records")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("platform")
        batch_op.drop_column("expires_at")
