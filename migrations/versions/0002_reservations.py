"""reservations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("reservation_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("held_position", sa.BigInteger(), nullable=False),
        sa.Column("ended_position", sa.BigInteger(), nullable=True),
        sa.Column("settled_amount", sa.BigInteger(), nullable=True),
        sa.Column("ended_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("reservation_id", name=op.f("pk_reservations")),
    )
    op.create_index(
        "ix_reservations_account_request",
        "reservations",
        ["account_id", "request_id"],
        unique=False,
    )
    op.create_index(
        "ix_reservations_state_expires", "reservations", ["state", "expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_reservations_state_expires", table_name="reservations")
    op.drop_index("ix_reservations_account_request", table_name="reservations")
    op.drop_table("reservations")
