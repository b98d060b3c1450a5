"""One Kafka batch in, one PostgreSQL transaction out: events, projections and offsets together.

Decoding happens before the transaction opens; everything that must be atomic happens inside
it. Exactly-once comes from three things at once: the offsets commit with the state, the
offset write is fenced by the partition's epoch, and an event id is stored at most once.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from time import perf_counter

import asyncpg

from services.contract.cloudevent import (
    ID_CONFLICT,
    Rejection,
    canonical_json,
    event_content,
)
from services.contract.events import (
    Event,
)
from services.contract.fast_decode import decode_record
from services.ledger import offset_store
from services.store import db, event_store, phases
from services.store.append import Appended, Unique, fold_and_append
from services.store.chain import payload_hash
from services.store.model import Changes
from services.store.notify import notify_payload


@dataclass(frozen=True, slots=True)
class Incoming:
    """One Kafka record, as the ledger received it."""

    topic: str
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...]
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Decoded:
    record: Incoming | None  # None for events the service wrote itself
    event: Event | None
    rejection: Rejection | None
    #: The event's canonical payload and its hash, computed with the decode (outside the
    #: transaction, so not under the head lock); empty when not computed yet.
    payload: bytes = b""
    digest: str = ""


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    position: int = 0
    changes: Changes = field(default_factory=Changes)
    #: The batch's ids were looked up in the store (some were there, or it was asked to).
    looked_up: bool = False


@dataclass(slots=True)
class Screened:
    unique: list[Unique] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[tuple[Decoded, Rejection]] = field(default_factory=list)


def screen(decoded: Sequence[Decoded], stored: Mapping[str, str]) -> Screened:
    """Split a batch into first-seen events, duplicates and rejections (a pure function).

    `stored` maps already-applied event ids to their content hashes. An id seen again with the
    same content is a duplicate (a no-op); with other content it is rejected as `id_conflict`.
    """
    screened = Screened()
    seen = dict(stored)
    for item in decoded:
        if item.rejection is not None:
            screened.rejected.append((item, item.rejection))
            continue
        event = item.event
        assert event is not None
        payload, digest = item.payload, item.digest
        if not digest:
            payload = canonical_json(event_content(event))
            digest = payload_hash(payload)
        known = seen.get(event.id)
        if known == digest:
            screened.duplicates += 1
        elif known is not None:
            conflict = Rejection(ID_CONFLICT, f"event id {event.id} was used with other content")
            screened.rejected.append((item, conflict))
        else:
            seen[event.id] = digest
            record = item.record
            source = (record.topic, record.partition, record.offset) if record else None
            screened.unique.append(Unique(event, payload, digest, source, item))
    return screened


def decode_all(records: Sequence[Incoming]) -> list[Decoded]:
    """Decode a batch outside the transaction, with each event's canonical payload and its
    hash; failures become rejections, never exceptions.

    `decode_record` (orjson and msgspec) gives the verdicts of `decode_kafka` (the CloudEvents
    SDK and pydantic, what `POST /events` uses) in half the time."""
    decoded = []
    for record in records:
        try:
            event = decode_record(record.headers, record.value)
            payload = canonical_json(event_content(event))
            decoded.append(Decoded(record, event, None, payload, payload_hash(payload)))
        except Rejection as rejection:
            decoded.append(Decoded(record, None, rejection))
    return decoded


async def apply_batch(
    conn: asyncpg.Connection,
    decoded: Sequence[Decoded],
    commit_offsets: Mapping[tuple[str, int], tuple[int, int]],
    group_id: str,
    *,
    optimistic: bool = True,
) -> BatchResult:
    """Apply a decoded batch in the caller's transaction.

    `commit_offsets` maps (topic, partition) to (next offset, epoch); it is written with a
    compare-and-set and raises `OffsetFenced` if another consumer owns a partition now.
    `optimistic`: write first and look the ids up only when one is already stored (then the
    batch is folded again, `looked_up`); else look them up first (after a batch that held a
    stored event, the next likely does too: redelivery).
    """
    received_at = datetime.now(UTC)
    result = BatchResult()
    started = perf_counter()
    head = await event_store.lock_head(conn)
    started = phases.lap("store", started)
    quarantined: list[offset_store.Quarantined] = []

    def reject(item: Decoded, rejection: Rejection) -> None:
        result.quarantined[rejection.code] = result.quarantined.get(rejection.code, 0) + 1
        quarantined.append(_quarantined(item, rejection, received_at))

    async def fold_screened(stored: Mapping[str, str]) -> tuple[Screened, Appended]:
        started = perf_counter()
        screened = screen(decoded, stored)
        phases.lap("screen", started)
        appended = await fold_and_append(conn, head, screened.unique, received_at, derive=True)
        return screened, appended

    # Most batches hold no event stored before: their events are written without looking their
    # ids up first. The unique index on event_id finds a batch that does; its writes are rolled
    # back to the savepoint and done again after the lookup.
    appended: Appended | None = None
    if optimistic:
        try:
            async with conn.transaction():
                screened, appended = await fold_screened({})
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != event_store.EVENT_ID_UNIQUE:
                raise
            result.looked_up = True
    if appended is None:
        started = perf_counter()
        event_ids = [item.event.id for item in decoded if item.event is not None]
        stored = await event_store.stored_content_hashes(conn, event_ids)
        phases.lap("lookup", started)
        result.looked_up = result.looked_up or bool(stored)
        screened, appended = await fold_screened(stored)
    result.duplicates = screened.duplicates
    for item, rejection in screened.rejected:
        reject(item, rejection)
    for unique, reason in appended.rejected:
        reject(unique.tag, Rejection("bad_data", reason))
    started = perf_counter()
    await offset_store.quarantine(conn, quarantined)
    await event_store.write_head(
        conn,
        event_store.Head(appended.position, appended.hash, head.duplicates + result.duplicates),
    )
    by_topic: dict[str, dict[int, tuple[int, int]]] = {}
    for (topic, partition), value in commit_offsets.items():
        by_topic.setdefault(topic, {})[partition] = value
    for topic, offsets in by_topic.items():
        await offset_store.commit_offsets(conn, group_id, topic, offsets)
    started = phases.lap("store", started)
    if appended.count:
        # `ledger`: a batch the consumer committed, which (like a heartbeat) tells listeners
        # that the ledger is alive; holds and expiries written by policies do not.
        notification = notify_payload(appended.position, appended.changes, appended.state)
        await db.notify_changes(conn, replace(notification, ledger=True))
        phases.lap("notify", started)
    result.applied = appended.count
    result.position = appended.position
    result.changes = appended.changes
    return result


def _quarantined(
    item: Decoded, rejection: Rejection, received_at: datetime
) -> offset_store.Quarantined:
    record = item.record
    assert record is not None, "only received records are quarantined"
    return offset_store.Quarantined(
        reason=_storable(rejection.reason),
        code=rejection.code,
        event_id=item.event.id if item.event is not None else None,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        raw=record.value,
        headers=[[_storable(name), _header_text(value)] for name, value in record.headers],
        received_at=received_at,
    )


def _header_text(value: bytes) -> str:
    """A header value as stored: its text, or base64 when it is not UTF-8 or holds a NUL."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        return "base64:" + base64.b64encode(value).decode()
    return text


def _storable(text: str) -> str:
    """`text` with U+0000, which PostgreSQL text and jsonb cannot hold, written as `\\x00`."""
    return text.replace("\x00", "\\x00")
