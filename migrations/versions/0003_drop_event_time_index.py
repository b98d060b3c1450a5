"""drop the event store's time index: nothing reads across accounts by time

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_event_store_time", table_name="event_store")


def downgrade() -> None:
    op.create_index("ix_event_store_time", "event_store", ["time"], unique=False)
