"""The reservations' SQL on the hot path: a group of holds in one statement (`quota_hold()`),
reading one reservation, finding the due ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from services.store.db import CHANGES_CHANNEL
from services.store.model import (
    Reservation,
)
from services.store.notify import NOTIFY_MAX_BYTES, NOTIFY_MAX_KEYS, NOTIFY_MAX_ROWS
from services.store.projections import load_reservations, reservation_from_row


@dataclass(frozen=True, slots=True)
class NewHold:
    """One hold for `quota_hold()`: the reservation and its event, payload already hashed."""

    account_id: str
    request_id: str | None
    amount: int
    reservation_id: str
    expires_at: datetime
    event_id: str
    time: datetime
    payload: str
    digest: str
    token_id: str | None = None
    model: str | None = None


_HOLD: Final = """
SELECT idx, outcome, reservation_id, amount, request_id, expires_at, held_position, balance,
       held, state, budget_id, budgets
FROM quota_hold($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[],
                $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10, $11, $12, $13,
                $14, $15, $16, $17::text[], $18::text[])
"""


async def hold(
    conn: asyncpg.Connection,
    holds: Sequence[NewHold],
    source: str,
    recorded_at: datetime,
    now: datetime,
) -> list[asyncpg.Record]:
    """Fold, chain and store a group of holds in ONE statement (`quota_hold()`, migrations
    0007, under the head lock, notifying within `services.store.notify`'s limits): one round
    trip, committed on its own when the connection is not in a transaction. One row per hold,
    in order: `outcome` is `held`, `repeated` (the request id's reservation within its TTL,
    whatever its `state`), or a refusal with `state` NULL: `insufficient` (check 13),
    `budget_exceeded` / `token_budget_exceeded` (13a, 13b: `budget_id` says which) or
    `concurrency_limited` (13c). `budgets` is JSON text: the covering budgets' figures after a
    hold, or the refusing budget's."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _HOLD,
        [h.account_id for h in holds],
        [h.request_id for h in holds],
        [h.amount for h in holds],
        [h.reservation_id for h in holds],
        [h.expires_at for h in holds],
        [h.event_id for h in holds],
        [h.time for h in holds],
        [h.payload for h in holds],
        [h.digest for h in holds],
        source,
        recorded_at,
        now,
        CHANGES_CHANNEL,
        NOTIFY_MAX_ROWS,
        NOTIFY_MAX_BYTES,
        NOTIFY_MAX_KEYS,
        [h.token_id for h in holds],
        [h.model for h in holds],
    )
    return rows


async def get_reservation(conn: asyncpg.Connection, reservation_id: str) -> Reservation | None:
    found = await load_reservations(conn, [reservation_id])
    return found[0] if found else None


async def due_reservations(
    conn: asyncpg.Connection, now: datetime, limit: int
) -> list[Reservation]:
    """Held reservations whose TTL has passed (`expires_at <= now`), oldest first."""
    rows = await conn.fetch(
        """
        SELECT * FROM reservations
        WHERE state = 'held' AND expires_at <= $1 ORDER BY expires_at LIMIT $2
        """,
        now,
        limit,
    )
    return [reservation_from_row(row) for row in rows]
