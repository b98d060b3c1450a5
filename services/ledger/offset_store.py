"""The ledger's own tables: consumer offsets (claims fenced by epoch) and the quarantine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg


class OffsetFenced(Exception):
    """Another consumer has claimed a partition since we did: our batch must not commit."""


@dataclass(frozen=True, slots=True)
class Quarantined:
    reason: str
    code: str
    event_id: str | None
    topic: str
    partition: int
    offset: int
    raw: bytes | None
    headers: list[list[str]]
    received_at: datetime


async def quarantine(conn: asyncpg.Connection, items: Sequence[Quarantined]) -> None:
    if not items:
        return
    await conn.executemany(
        """
        INSERT INTO rejected_events
            (reason, code, event_id, topic, partition, kafka_offset, raw, headers, received_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (topic, partition, kafka_offset) DO NOTHING
        """,
        [
            (
                q.reason,
                q.code,
                q.event_id,
                q.topic,
                q.partition,
                q.offset,
                q.raw,
                q.headers,
                q.received_at,
            )
            for q in items
        ],
    )


async def list_rejected(
    conn: asyncpg.Connection, limit: int, after_id: int = 0
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT id, reason, code, event_id, topic, partition, kafka_offset, raw, headers,
               received_at
        FROM rejected_events WHERE id > $1 ORDER BY id LIMIT $2
        """,
        after_id,
        limit,
    )
    return rows


@dataclass(frozen=True, slots=True)
class Claim:
    next_offset: int | None
    epoch: int


async def claim_partitions(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int], owner: str
) -> dict[int, Claim]:
    """Take ownership of partitions: bump each one's epoch, which fences the previous owner."""
    claims: dict[int, Claim] = {}
    for partition in sorted(partitions):
        row = await conn.fetchrow(
            """
            INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, epoch, owner,
                                          updated_at)
            VALUES ($1, $2, $3, -1, 1, $4, now())
            ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                epoch = consumer_offsets.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
            RETURNING next_offset, epoch
            """,
            group_id,
            topic,
            partition,
            owner,
        )
        next_offset = row["next_offset"]
        claims[partition] = Claim(next_offset if next_offset >= 0 else None, row["epoch"])
    return claims


async def commit_offsets(
    conn: asyncpg.Connection,
    group_id: str,
    topic: str,
    offsets: Mapping[int, tuple[int, int]],
) -> None:
    """Compare-and-set each partition's next offset on our epoch; raise if we were fenced."""
    for partition, (next_offset, epoch) in sorted(offsets.items()):
        status = await conn.execute(
            """
            UPDATE consumer_offsets SET next_offset = $4, updated_at = now()
            WHERE group_id = $1 AND topic = $2 AND partition = $3 AND epoch = $5
            """,
            group_id,
            topic,
            partition,
            next_offset,
            epoch,
        )
        if status != "UPDATE 1":
            raise OffsetFenced(f"partition {partition} of {topic} was claimed by another consumer")


async def stored_offsets(conn: asyncpg.Connection, group_id: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
        group_id,
        topic,
    )
    return {row["partition"]: row["next_offset"] for row in rows}


@dataclass(frozen=True, slots=True)
class StoredOffset:
    """A partition's row: the next offset to apply (-1: from the beginning), its claim."""

    next_offset: int
    epoch: int
    owner: str


async def group_offsets(
    conn: asyncpg.Connection, group_id: str
) -> dict[tuple[str, int], StoredOffset]:
    """Every partition's stored offset and claim in the group, by (topic, partition)."""
    rows = await conn.fetch(
        "SELECT topic, partition, next_offset, epoch, owner FROM consumer_offsets "
        "WHERE group_id = $1",
        group_id,
    )
    return {
        (r["topic"], r["partition"]): StoredOffset(r["next_offset"], r["epoch"], r["owner"])
        for r in rows
    }
