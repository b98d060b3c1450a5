"""The SQL replay reads the event store with: the chain checked in bulk, money folded as
sums, the other events streamed, and the projections emptied for the swap."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import asyncpg

from services.store.chain import GENESIS_HASH

#: The chain in one statement: each row's position, link, content hash and hash against the
#: row before it (the expression of `services.store.chain.chain_hash`, held to it by
#: tests/store/test_parity.py). Rows that are wrong somewhere.
_CHAIN_BREAKS: Final = """
    WITH c AS (
        SELECT position, prev_hash, hash, content_hash,
               lag(hash, 1, $1::text) OVER w AS want_prev,
               lag(position, 1, 0::bigint) OVER w AS prev_position,
               encode(sha256(convert_to(payload, 'UTF8')), 'hex') AS digest
        FROM event_store WHERE position <= $2
        WINDOW w AS (ORDER BY position)
    ), d AS (
        SELECT *, encode(sha256(convert_to(want_prev || ':' || position || ':' || digest,
                                           'UTF8')), 'hex') AS want_hash
        FROM c
    )
    SELECT * FROM d
    WHERE position <> prev_position + 1 OR prev_hash <> want_prev OR content_hash <> digest
       OR hash <> want_hash
    ORDER BY position
"""

# The stored `balance_delta` column, written with the payload at ingest, is summed as it is:
# parsing 10^6 payloads as jsonb would cost more than the rest of the replay. The chain check
# covers the payloads; verify holds every `balance_delta` to its payload.
_MONEY_TOTALS: Final = """
    SELECT subject, sum(balance_delta) AS balance, max(position) AS position,
           count(*) AS events,
           array_agg(position ORDER BY position) FILTER (WHERE balance_delta IS NULL) AS bad
    FROM event_store
    WHERE position <= $1 AND type = ANY($2::text[]) AND subject <> ALL($3::text[])
    GROUP BY subject
"""

_OTHER_EVENTS: Final = """
    SELECT position, type, subject, payload, time FROM event_store
    WHERE position <= $1 AND (type <> ALL($2::text[]) OR subject = ANY($3::text[]))
    ORDER BY position
"""

_SNAPSHOT_ID: Final = re.compile(r"[0-9A-Fa-f-]+")


async def chain_breaks(conn: asyncpg.Connection, upto: int) -> list[asyncpg.Record]:
    """Rows up to `upto` whose place in the chain is wrong, with what was expected
    (`want_prev`, `prev_position`, `digest`, `want_hash`)."""
    rows: list[asyncpg.Record] = await conn.fetch(_CHAIN_BREAKS, GENESIS_HASH, upto)
    return rows


async def export_snapshot(conn: asyncpg.Connection) -> str:
    snapshot: str = await conn.fetchval("SELECT pg_export_snapshot()")
    return snapshot


async def use_snapshot(conn: asyncpg.Connection, snapshot: str) -> None:
    """See exactly `snapshot` (exported by another connection) in this transaction."""
    if not _SNAPSHOT_ID.fullmatch(snapshot):  # it is spliced into the statement
        raise ValueError(f"unexpected snapshot id {snapshot!r}")
    await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")


async def holding_subjects(conn: asyncpg.Connection, upto: int) -> tuple[list[str], bool]:
    """Accounts that ever held quota or had a budget up to `upto`, and whether any had one."""
    rows = await conn.fetch(
        "SELECT subject, bool_or(type = 'quota.budget.set') AS budgeted FROM event_store"
        " WHERE position <= $1 AND type IN ('quota.reservation.held', 'quota.budget.set')"
        " GROUP BY subject",
        upto,
    )
    return [row["subject"] for row in rows], any(row["budgeted"] for row in rows)


async def money_totals(
    conn: asyncpg.Connection, upto: int, types: Sequence[str], excluded: Sequence[str]
) -> list[asyncpg.Record]:
    """Per subject (but `excluded`): the sum of `balance_delta` of events of `types`, the last
    position, the count, and the positions whose `balance_delta` is missing (`bad`)."""
    rows: list[asyncpg.Record] = await conn.fetch(_MONEY_TOTALS, upto, list(types), list(excluded))
    return rows


def other_events(
    conn: asyncpg.Connection, upto: int, types: Sequence[str], holding: Sequence[str], page: int
) -> AsyncIterator[Any]:
    """Every event up to `upto` not summed by `money_totals`, in position order (a cursor in
    the caller's transaction)."""
    cursor: AsyncIterator[Any] = conn.cursor(
        _OTHER_EVENTS, upto, list(types), list(holding), prefetch=page
    )
    return cursor


async def hash_at(conn: asyncpg.Connection, position: int) -> str:
    """The chain hash of the event at `position` (the genesis hash for 0 or a missing row)."""
    if not position:
        return GENESIS_HASH
    found: str | None = await conn.fetchval(
        "SELECT hash FROM event_store WHERE position = $1", position
    )
    return found or GENESIS_HASH


async def stored_ids(conn: asyncpg.Connection, upto: int) -> dict[str, tuple[int, str]]:
    """event id -> (position, content hash), for every event up to `upto`."""
    rows = await conn.fetch(
        "SELECT event_id, position, content_hash FROM event_store WHERE position <= $1", upto
    )
    return {row["event_id"]: (row["position"], row["content_hash"]) for row in rows}


async def events_between(conn: asyncpg.Connection, after: int, upto: int) -> list[asyncpg.Record]:
    """The stored events after `after` up to `upto`, in position order, with their links."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT position, type, subject, payload, time, content_hash, prev_hash, hash"
        " FROM event_store WHERE position > $1 AND position <= $2 ORDER BY position",
        after,
        upto,
    )
    return rows


async def truncate(conn: asyncpg.Connection, tables: Sequence[str]) -> None:
    """Empty `tables` in one statement: new storage, swapped in at commit (kept on rollback)."""
    await conn.execute(f"TRUNCATE {', '.join(tables)}")
