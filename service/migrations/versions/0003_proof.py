"""Schema for deletion requests, certificate signing keys, audit checkpoints (issue 15).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 18:50:00
"""

from __future__ import annotations

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
