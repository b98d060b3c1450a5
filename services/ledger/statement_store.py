"""The SQL of statements and point-in-time balances: one account's events in the event store,
with running balances from the stored `balance_delta`."""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg

from services.contract.events import CATALOG_SUBJECT

_PAGE_SQL: Final = """
SELECT position, time, type, source, event_id,
       coalesce(balance_delta, 0) AS amount,
       ($2::bigint + sum(coalesce(balance_delta, 0))
            OVER (ORDER BY position ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))::bigint
           AS balance
FROM event_store
WHERE subject = $1 AND position >= $3 AND ($4::bigint IS NULL OR position < $4)
ORDER BY position
LIMIT $5
"""


async def account_exists(conn: asyncpg.Connection, account_id: str) -> bool:
    """An account is known once it has at least one event; `catalog` is never an account."""
    if account_id == CATALOG_SUBJECT:
        return False
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM event_store WHERE subject = $1)", account_id
    )
    return found


async def first_at_or_after(
    conn: asyncpg.Connection, account_id: str, moment: datetime
) -> int | None:
    position: int | None = await conn.fetchval(
        "SELECT min(position) FROM event_store WHERE subject = $1 AND time >= $2",
        account_id,
        moment,
    )
    return position


async def first_after(conn: asyncpg.Connection, account_id: str, moment: datetime) -> int | None:
    position: int | None = await conn.fetchval(
        "SELECT min(position) FROM event_store WHERE subject = $1 AND time > $2",
        account_id,
        moment,
    )
    return position


async def balance_before(conn: asyncpg.Connection, account_id: str, stop: int | None) -> int:
    """The account's balance after every event before position `stop` (all of them if None)."""
    total: int = await conn.fetchval(
        """
        SELECT coalesce(sum(balance_delta), 0)::bigint FROM event_store
        WHERE subject = $1 AND ($2::bigint IS NULL OR position < $2)
        """,
        account_id,
        stop,
    )
    return total


async def entries(
    conn: asyncpg.Connection,
    account_id: str,
    opening: int,
    start: int,
    stop: int | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Up to `limit` of the account's events from `start` (inclusive) to `stop` (exclusive),
    each with its signed `amount` and the running `balance` from `opening`."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _PAGE_SQL, account_id, opening, start, stop, limit
    )
    return rows


async def balance_until(
    conn: asyncpg.Connection, account_id: str, stop: int | None
) -> tuple[int, int | None]:
    """(balance, last position) after the account's events before `stop` (all if None)."""
    row = await conn.fetchrow(
        """
        SELECT max(position) AS position, coalesce(sum(balance_delta), 0)::bigint AS balance
        FROM event_store WHERE subject = $1 AND ($2::bigint IS NULL OR position < $2)
        """,
        account_id,
        stop,
    )
    assert row is not None
    return row["balance"], row["position"]
