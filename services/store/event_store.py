"""The event store's SQL: the head (position, hash, duplicates) and its lock, appending
events, and the one-statement write of events the services emit themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from services.store.db import CHANGES_CHANNEL
from services.store.model import (
    Changes,
    State,
)
from services.store.notify import Notification


@dataclass(frozen=True, slots=True)
class Head:
    position: int
    hash: str
    duplicates: int


async def lock_head(conn: asyncpg.Connection) -> Head:
    row = await conn.fetchrow(
        "SELECT position, hash, duplicates FROM ledger_head WHERE id = 1 FOR UPDATE"
    )
    return Head(row["position"], row["hash"], row["duplicates"])


async def read_head(conn: asyncpg.Connection) -> Head:
    row = await conn.fetchrow("SELECT position, hash, duplicates FROM ledger_head WHERE id = 1")
    return Head(row["position"], row["hash"], row["duplicates"])


async def write_head(conn: asyncpg.Connection, head: Head) -> None:
    await conn.execute(
        "UPDATE ledger_head SET position = $1, hash = $2, duplicates = $3 WHERE id = 1",
        head.position,
        head.hash,
        head.duplicates,
    )


#: The unique constraint that finds an event id stored before (`ingest.apply_batch`).
EVENT_ID_UNIQUE: Final = "uq_event_store_event_id"


async def stored_content_hashes(
    conn: asyncpg.Connection, event_ids: Sequence[str]
) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT event_id, content_hash FROM event_store WHERE event_id = ANY($1::text[])",
        list(event_ids),
    )
    return {row["event_id"]: row["content_hash"] for row in rows}


EVENT_COLUMNS: Final = (
    "position",
    "event_id",
    "type",
    "source",
    "subject",
    "time",
    "recorded_at",
    "balance_delta",
    "payload",
    "content_hash",
    "prev_hash",
    "hash",
    "topic",
    "partition",
    "kafka_offset",
)


EventTuple = tuple[
    int, str, str, str, str, datetime, datetime, int | None, str, str, str, str,
    str | None, int | None, int | None,
]  # fmt: skip


async def append_events(conn: asyncpg.Connection, records: Sequence[EventTuple]) -> None:
    if records:
        await conn.copy_records_to_table("event_store", records=records, columns=EVENT_COLUMNS)


_LOCAL_WRITE: Final = """
WITH appended AS (
    INSERT INTO event_store (position, event_id, type, source, subject, time, recorded_at,
                             balance_delta, payload, content_hash, prev_hash, hash)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::text[],
                         $10::text[], $11::text[], $12::text[])
), account_rows AS (
    INSERT INTO accounts (account_id, balance, held, status, role, group_name, position,
                          max_concurrent, holds)
    SELECT * FROM unnest($13::text[], $14::bigint[], $15::bigint[], $16::text[], $17::text[],
                         $18::text[], $19::bigint[], $34::integer[], $35::integer[])
    ON CONFLICT (account_id) DO UPDATE SET
        balance = EXCLUDED.balance, held = EXCLUDED.held, status = EXCLUDED.status,
        role = EXCLUDED.role, group_name = EXCLUDED.group_name, position = EXCLUDED.position,
        max_concurrent = EXCLUDED.max_concurrent, holds = EXCLUDED.holds
), reservation_rows AS (
    INSERT INTO reservations (reservation_id, account_id, amount, request_id, state,
                              expires_at, held_position, ended_position, settled_amount,
                              ended_by, token_id, model)
    SELECT * FROM unnest($20::text[], $21::text[], $22::bigint[], $23::text[], $24::text[],
                         $25::timestamptz[], $26::bigint[], $27::bigint[], $28::bigint[],
                         $29::text[], $36::text[], $37::text[])
    ON CONFLICT (reservation_id) DO UPDATE SET
        state = EXCLUDED.state, ended_position = EXCLUDED.ended_position,
        settled_amount = EXCLUDED.settled_amount, ended_by = EXCLUDED.ended_by
), budget_rows AS (
    UPDATE budgets b SET held = u.held
    FROM unnest($38::text[], $39::bigint[]) u(budget_id, held)
    WHERE b.budget_id = u.budget_id
), token_rows AS (
    UPDATE tokens t SET holds = u.holds
    FROM unnest($40::text[], $41::integer[]) u(token_id, holds)
    WHERE t.token_id = u.token_id
), head AS (
    UPDATE ledger_head SET position = $30, hash = $31 WHERE id = 1
)
SELECT pg_notify($32, $33) WHERE $33::text IS NOT NULL
"""


async def write_local(
    conn: asyncpg.Connection,
    records: Sequence[EventTuple],
    state: State,
    changes: Changes,
    head: Head,
    notify: Notification | None,
) -> None:
    """Append events the service wrote itself, with the account and reservation rows they
    changed, the new head and the notification: ONE statement, so one round trip (a hold's
    transaction is otherwise a chain of round trips under the head lock). The caller holds the
    head lock; `changes` may name accounts, reservations, and budgets' `held` and tokens'
    `holds` only."""
    if changes.tokens or changes.catalog or changes.rate_limits or changes.budget_spend:
        raise ValueError("a local write changes only accounts, reservations and budgets")
    if any(key not in state.budgets for key in changes.budgets):
        raise ValueError("a local write does not remove budgets")
    budgets = [state.budgets[key] for key in sorted(changes.budgets)]
    tokens = [state.tokens[key] for key in sorted(changes.token_holds)]
    accounts = [state.accounts[key] for key in sorted(changes.accounts)]
    holds = [state.reservations[key] for key in sorted(changes.reservations)]
    events = list(zip(*(record[:12] for record in records), strict=True)) or [[]] * 12
    await conn.execute(
        _LOCAL_WRITE,
        *events,
        [a.account_id for a in accounts],
        [a.balance for a in accounts],
        [a.held for a in accounts],
        [a.status for a in accounts],
        [a.role for a in accounts],
        [a.group for a in accounts],
        [a.position for a in accounts],
        [r.reservation_id for r in holds],
        [r.account_id for r in holds],
        [r.amount for r in holds],
        [r.request_id for r in holds],
        [r.state for r in holds],
        [r.expires_at for r in holds],
        [r.held_position for r in holds],
        [r.ended_position for r in holds],
        [r.settled_amount for r in holds],
        [r.ended_by for r in holds],
        head.position,
        head.hash,
        CHANGES_CHANNEL,
        notify.encode() if notify is not None else None,
        [a.max_concurrent for a in accounts],
        [a.holds for a in accounts],
        [r.token_id for r in holds],
        [r.model for r in holds],
        [b.budget_id for b in budgets],
        [b.held for b in budgets],
        [t.token_id for t in tokens],
        [t.holds for t in tokens],
    )


async def events_after(conn: asyncpg.Connection, after: int, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` stored events after position `after`, in order, every column that verify
    checks."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT position, event_id, type, source, subject, time, balance_delta, payload,
               content_hash, prev_hash, hash
        FROM event_store WHERE position > $1 ORDER BY position LIMIT $2
        """,
        after,
        limit,
    )
    return rows
