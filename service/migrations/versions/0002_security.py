"""Schema for tenant-owned corpora, registered models, key expiry and platform admins (issue 14).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 18:50:00
"""

from __future__ import annotations

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
