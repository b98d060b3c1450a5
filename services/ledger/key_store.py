"""The key routes' SQL: an account's tokens (without their hashes), and where an event the
ledger published itself ended up (applied at a position, or quarantined)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.store import projections
from services.store.model import Token


@dataclass(frozen=True, slots=True)
class TokenListing:
    """What an operator may see of a token: never the key, nor its hash."""

    token_id: str
    key_last6: str
    expires_at: datetime | None
    revoked: bool
    allowed_cidrs: list[str]
    allowed_models: list[str]
    max_concurrent: int | None
    previous_valid_until: datetime | None
    position: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a published event: its `position` once applied, or the quarantine's
    `code` and `reason` when the fold refused it; all None while it is still on its way."""

    position: int | None = None
    code: str | None = None
    reason: str | None = None


async def get_token(conn: asyncpg.Connection, token_id: str) -> Token | None:
    tokens = await projections.load_tokens(conn, [token_id])
    return tokens[0] if tokens else None


async def account_exists(conn: asyncpg.Connection, account_id: str) -> bool:
    found = await conn.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id)
    return found is not None


async def account_tokens(conn: asyncpg.Connection, account_id: str) -> list[TokenListing]:
    """The account's tokens, by token_id."""
    rows = await conn.fetch(
        """
        SELECT token_id, key_last6, expires_at, revoked, allowed_cidrs, allowed_models,
               max_concurrent, previous_valid_until, position
        FROM tokens WHERE account_id = $1 ORDER BY token_id
        """,
        account_id,
    )
    return [
        TokenListing(
            token_id=row["token_id"],
            key_last6=row["key_last6"],
            expires_at=row["expires_at"],
            revoked=row["revoked"],
            allowed_cidrs=list(row["allowed_cidrs"]),
            allowed_models=list(row["allowed_models"]),
            max_concurrent=row["max_concurrent"],
            previous_valid_until=row["previous_valid_until"],
            position=row["position"],
        )
        for row in rows
    ]


async def outcome(conn: asyncpg.Connection, event_id: str) -> Outcome:
    """Where the event with `event_id` is now (see `Outcome`)."""
    position = await conn.fetchval("SELECT position FROM event_store WHERE event_id = $1", event_id)
    if position is not None:
        return Outcome(position=position)
    row = await conn.fetchrow(
        "SELECT code, reason FROM rejected_events WHERE event_id = $1 ORDER BY id LIMIT 1",
        event_id,
    )
    if row is not None:
        return Outcome(code=row["code"], reason=row["reason"])
    return Outcome()
