"""The database schema as SQLModel tables. Alembic migrations create it; this is the reference
they are checked against (`tests/test_migrations.py`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLModel.metadata = MetaData(naming_convention=NAMING_CONVENTION)
metadata = SQLModel.metadata


def _tz(nullable: bool = True) -> Any:
    return Column(DateTime(timezone=True), nullable=nullable)


class EventRecord(SQLModel, table=True):
    """The append-only event store: one row per applied event, hash-chained by position."""

    __tablename__ = "event_store"
    # Statements and balances read one account's events in position order; nothing reads
    # across accounts by time, so `time` has no index (each index costs every append).
    __table_args__ = (Index("ix_event_store_subject_position", "subject", "position"),)

    position: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    event_id: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    type: str = Field(sa_column=Column(Text, nullable=False))
    source: str = Field(sa_column=Column(Text, nullable=False))
    subject: str = Field(sa_column=Column(Text, nullable=False))
    time: datetime = Field(sa_column=_tz(nullable=False))
    recorded_at: datetime = Field(sa_column=_tz(nullable=False))
    balance_delta: int | None = Field(default=None, sa_column=Column(BigInteger))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    content_hash: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(sa_column=Column(Text, nullable=False))
    hash: str = Field(sa_column=Column(Text, nullable=False))
    topic: str | None = Field(default=None, sa_column=Column(Text))
    partition: int | None = Field(default=None, sa_column=Column(Integer))
    kafka_offset: int | None = Field(default=None, sa_column=Column(BigInteger))


class LedgerHead(SQLModel, table=True):
    """One row: the last position and hash. Locking it serialises appends across ledgers."""

    __tablename__ = "ledger_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: int = Field(sa_column=Column(SmallInteger, primary_key=True, autoincrement=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(Text, nullable=False))
    duplicates: int = Field(sa_column=Column(BigInteger, nullable=False))


class ConsumerOffset(SQLModel, table=True):
    """Kafka offsets stored beside the state; `epoch` fences a consumer that lost a partition."""

    __tablename__ = "consumer_offsets"

    group_id: str = Field(sa_column=Column(Text, primary_key=True))
    topic: str = Field(sa_column=Column(Text, primary_key=True))
    partition: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    next_offset: int = Field(sa_column=Column(BigInteger, nullable=False))
    epoch: int = Field(sa_column=Column(BigInteger, nullable=False))
    owner: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(sa_column=_tz(nullable=False))


class RejectedEvent(SQLModel, table=True):
    """Quarantine: what could not be applied, byte for byte, with where it came from and why."""

    __tablename__ = "rejected_events"
    __table_args__ = (
        Index(
            "uq_rejected_events_source_offset",
            "topic",
            "partition",
            "kafka_offset",
            unique=True,
        ),
    )

    id: int | None = Field(default=None, sa_column=Column(BigInteger, primary_key=True))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    code: str = Field(sa_column=Column(Text, nullable=False))
    event_id: str | None = Field(default=None, sa_column=Column(Text))
    topic: str = Field(sa_column=Column(Text, nullable=False))
    partition: int = Field(sa_column=Column(Integer, nullable=False))
    kafka_offset: int = Field(sa_column=Column(BigInteger, nullable=False))
    raw: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    headers: Any = Field(default=None, sa_column=Column(JSONB))
    received_at: datetime = Field(sa_column=_tz(nullable=False))


class AccountRow(SQLModel, table=True):
    __tablename__ = "accounts"

    account_id: str = Field(sa_column=Column(Text, primary_key=True))
    balance: int = Field(sa_column=Column(BigInteger, nullable=False))
    held: int = Field(sa_column=Column(BigInteger, nullable=False, server_default=text("0")))
    status: str = Field(sa_column=Column(Text, nullable=False))
    role: str = Field(sa_column=Column(Text, nullable=False))
    group_name: str = Field(sa_column=Column(Text, nullable=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_concurrent: int | None = Field(default=None, sa_column=Column(Integer))
    holds: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))


class TokenRow(SQLModel, table=True):
    __tablename__ = "tokens"

    token_id: str = Field(sa_column=Column(Text, primary_key=True))
    account_id: str = Field(sa_column=Column(Text, nullable=False, index=True))
    key_sha256: str = Field(sa_column=Column(Text, nullable=False, unique=True))
    key_last6: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime | None = Field(default=None, sa_column=_tz())
    allowed_cidrs: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    allowed_models: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    revoked: bool = Field(nullable=False)
    position: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_concurrent: int | None = Field(default=None, sa_column=Column(Integer))
    previous_key_sha256: str | None = Field(default=None, sa_column=Column(Text))
    previous_valid_until: datetime | None = Field(default=None, sa_column=_tz())
    holds: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))


class ChannelRow(SQLModel, table=True):
    __tablename__ = "channels"

    channel_id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    models: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    groups: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    enabled: bool = Field(nullable=False)
    rate_limited_until: datetime | None = Field(default=None, sa_column=_tz())
    position: int = Field(sa_column=Column(BigInteger, nullable=False))


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    model: str = Field(sa_column=Column(Text, primary_key=True))
    kind: str = Field(sa_column=Column(Text, nullable=False))
    limits: Any = Field(sa_column=Column(JSONB, nullable=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))


class RoutePolicyRow(SQLModel, table=True):
    __tablename__ = "route_policies"

    route: str = Field(sa_column=Column(Text, primary_key=True))
    min_role: str = Field(sa_column=Column(Text, nullable=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))


class RateLimitRow(SQLModel, table=True):
    __tablename__ = "rate_limits"

    account_id: str = Field(sa_column=Column(Text, primary_key=True))
    model: str = Field(sa_column=Column(Text, primary_key=True))
    requests: int = Field(sa_column=Column(Integer, nullable=False))
    window_seconds: int = Field(sa_column=Column(Integer, nullable=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))
    units: int | None = Field(default=None, sa_column=Column(BigInteger))


class ReservationRow(SQLModel, table=True):
    """Holds on quota: `held` until settled by a usage, released, or expired at its TTL."""

    __tablename__ = "reservations"
    __table_args__ = (
        Index("ix_reservations_account_request", "account_id", "request_id"),
        Index("ix_reservations_state_expires", "state", "expires_at"),
        # the holds' concurrency and budget checks read an account's active holds
        Index(
            "ix_reservations_active_account",
            "account_id",
            postgresql_where=text("state = 'held'"),
        ),
    )

    reservation_id: str = Field(sa_column=Column(Text, primary_key=True))
    account_id: str = Field(sa_column=Column(Text, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    request_id: str | None = Field(default=None, sa_column=Column(Text))
    state: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime = Field(sa_column=_tz(nullable=False))
    held_position: int = Field(sa_column=Column(BigInteger, nullable=False))
    ended_position: int | None = Field(default=None, sa_column=Column(BigInteger))
    settled_amount: int | None = Field(default=None, sa_column=Column(BigInteger))
    ended_by: str | None = Field(default=None, sa_column=Column(Text))
    token_id: str | None = Field(default=None, sa_column=Column(Text))
    model: str | None = Field(default=None, sa_column=Column(Text))


class BudgetRow(SQLModel, table=True):
    """A cap on an account's (or a token's) spend per period; `held`: the active holds it
    covers."""

    __tablename__ = "budgets"

    budget_id: str = Field(sa_column=Column(Text, primary_key=True))
    account_id: str = Field(sa_column=Column(Text, nullable=False, index=True))
    scope: str = Field(sa_column=Column(Text, nullable=False))
    token_id: str | None = Field(default=None, sa_column=Column(Text))
    model: str | None = Field(default=None, sa_column=Column(Text))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    period: str = Field(sa_column=Column(Text, nullable=False))
    timezone: str = Field(sa_column=Column(Text, nullable=False))
    held: int = Field(sa_column=Column(BigInteger, nullable=False))
    position: int = Field(sa_column=Column(BigInteger, nullable=False))


class BudgetSpendRow(SQLModel, table=True):
    """The usage counted toward a budget in one of its periods (by the usage's event time)."""

    __tablename__ = "budget_spend"

    budget_id: str = Field(sa_column=Column(Text, primary_key=True))
    period_start: datetime = Field(
        sa_column=Column(DateTime(timezone=True), primary_key=True, nullable=False)
    )
    spent: int = Field(sa_column=Column(BigInteger, nullable=False))
