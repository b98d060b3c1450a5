"""One Kafka batch in, one PostgreSQL transaction out: events, projections and offsets together.

Decoding happens before the transaction opens; everything that must be atomic happens inside
it. Exactly-once comes from three things at once: the offsets commit with the state, the
offset write is fenced by the partition's epoch, and an event id is stored at most once.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import orjson

from services.contract.cloudevent import (
    ID_CONFLICT,
    Rejection,
    canonical_json,
    decode_kafka,
    event_content,
)
from services.contract.events import (
    ACCOUNT_EVENTS,
    Event,
)
from services.ledger import repository as repo
from services.ledger.chain import chain_hash, payload_hash
from services.ledger.fold import Account, Changes, State, fold

#: NOTIFY payloads are limited to 8000 bytes; past this many keys we say "reload everything".
NOTIFY_MAX_KEYS: Final = 100
#: Up to this many changed accounts are sent as rows, while the payload stays this small.
NOTIFY_MAX_ROWS: Final = 32
NOTIFY_MAX_BYTES: Final = 7_000


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


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    position: int = 0
    changes: Changes = field(default_factory=Changes)


@dataclass(frozen=True, slots=True)
class Unique:
    """An event seen for the first time, with its canonical payload and that payload's hash."""

    item: Decoded
    event: Event
    payload: bytes
    digest: str


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
            screened.unique.append(Unique(item, event, payload, digest))
    return screened


def decode_all(records: Sequence[Incoming]) -> list[Decoded]:
    """Decode a batch outside the transaction; failures become rejections, never exceptions."""
    decoded = []
    for record in records:
        try:
            decoded.append(Decoded(record, decode_kafka(record.headers, record.value), None))
        except Rejection as rejection:
            decoded.append(Decoded(record, None, rejection))
    return decoded


async def apply_batch(
    conn: asyncpg.Connection,
    decoded: Sequence[Decoded],
    commit_offsets: Mapping[tuple[str, int], tuple[int, int]],
    group_id: str,
) -> BatchResult:
    """Apply a decoded batch in the caller's transaction.

    `commit_offsets` maps (topic, partition) to (next offset, epoch); it is written with a
    compare-and-set and raises `OffsetFenced` if another consumer owns a partition now.
    """
    received_at = datetime.now(UTC)
    result = BatchResult()
    head = await repo.lock_head(conn)
    quarantined: list[repo.Quarantined] = []

    def reject(item: Decoded, rejection: Rejection) -> None:
        result.quarantined[rejection.code] = result.quarantined.get(rejection.code, 0) + 1
        quarantined.append(_quarantined(item, rejection, received_at))

    event_ids = [item.event.id for item in decoded if item.event is not None]
    screened = screen(decoded, await repo.stored_content_hashes(conn, event_ids))
    result.duplicates = screened.duplicates
    for item, rejection in screened.rejected:
        reject(item, rejection)
    appended = await _fold_and_append(conn, head, screened.unique, received_at, derive=True)
    for unique, reason in appended.rejected:
        reject(unique.item, Rejection("bad_data", reason))
    await repo.quarantine(conn, quarantined)
    await repo.write_head(
        conn, repo.Head(appended.position, appended.hash, head.duplicates + result.duplicates)
    )
    by_topic: dict[str, dict[int, tuple[int, int]]] = {}
    for (topic, partition), value in commit_offsets.items():
        by_topic.setdefault(topic, {})[partition] = value
    for topic, offsets in by_topic.items():
        await repo.commit_offsets(conn, group_id, topic, offsets)
    if appended.count:
        # `ledger`: a batch the consumer committed, which (like a heartbeat) tells listeners
        # that the ledger is alive; holds and expiries written by policies do not.
        payload = notify_payload(appended.position, appended.changes, appended.state)
        await repo.notify_changes(conn, {**payload, "ledger": True})
    result.applied = appended.count
    result.position = appended.position
    result.changes = appended.changes
    return result


@dataclass(slots=True)
class Appended:
    """What one fold-and-append wrote: the new head, the rows changed, what was refused."""

    position: int
    hash: str
    records: list[repo.EventTuple]
    state: State
    changes: Changes
    rejected: list[tuple[Unique, str]]

    @property
    def count(self) -> int:
        return len(self.records)


async def _fold_and_append(
    conn: asyncpg.Connection,
    head: repo.Head,
    unique: Sequence[Unique],
    received_at: datetime,
    *,
    derive: bool,
) -> Appended:
    """Fold first-seen events onto the rows they touch, chain and store what applied."""
    state = await repo.load_state(conn, _keys([u.event for u in unique]))
    appended = _fold_and_chain(head, unique, state, received_at, derive=derive)
    await repo.append_events(conn, appended.records)
    await repo.write_changes(conn, appended.state, appended.changes)
    return appended


def _fold_and_chain(
    head: repo.Head,
    unique: Sequence[Unique],
    state: State,
    received_at: datetime,
    *,
    derive: bool,
) -> Appended:
    """Fold first-seen events onto `state` and chain the applied ones after `head`."""
    outcome = fold(state, (u.event for u in unique), head.position + 1, derive=derive)
    by_event = {id(u.event): u for u in unique}
    records: list[repo.EventTuple] = []
    prev = head.hash
    for applied in outcome.applied:
        event = applied.event
        origin = by_event.get(id(event))
        if origin is not None:
            payload, digest = origin.payload, origin.digest
            record = origin.item.record
            source = (record.topic, record.partition, record.offset) if record else None
        else:  # derived by the fold itself (a settlement)
            payload = canonical_json(event_content(event))
            digest, source = payload_hash(payload), None
        current = chain_hash(prev, applied.position, digest)
        records.append(
            (
                applied.position,
                event.id,
                event.type,
                event.source,
                event.subject,
                event.time or received_at,
                received_at,
                applied.balance_delta,
                payload.decode(),
                digest,
                prev,
                current,
                *(source or (None, None, None)),
            )
        )
        prev = current
    rejected = [(by_event[id(r.event)], r.reason) for r in outcome.rejected]
    return Appended(
        head.position + len(records), prev, records, outcome.state, outcome.changes, rejected
    )


@dataclass(slots=True)
class LocalResult:
    """Events the service wrote itself: the state after them, and the refused ones' reasons."""

    position: int
    state: State
    rejected: dict[str, str]


async def append_local(
    conn: asyncpg.Connection,
    events: Sequence[Event],
    head: repo.Head | None = None,
) -> LocalResult:
    """Fold and store events the service emits itself (reservations), in the caller's
    transaction, serialised with the consumer's batches by the head lock (`head`: the caller
    already holds it). Everything is written in one statement."""
    received_at = datetime.now(UTC)
    if head is None:
        head = await repo.lock_head(conn)
    unique = []
    for event in events:
        payload = canonical_json(event_content(event))
        unique.append(Unique(Decoded(None, event, None), event, payload, payload_hash(payload)))
    state = await repo.load_state(conn, _keys(events))
    appended = _fold_and_chain(head, unique, state, received_at, derive=False)
    notify = (
        notify_payload(appended.position, appended.changes, appended.state)
        if appended.count
        else None
    )
    await repo.write_local(
        conn,
        appended.records,
        appended.state,
        appended.changes,
        repo.Head(appended.position, appended.hash, head.duplicates),
        notify,
    )
    rejected = {u.event.id: reason for u, reason in appended.rejected}
    return LocalResult(appended.position, appended.state, rejected)


def notify_payload(position: int, changes: Changes, state: State | None = None) -> dict[str, Any]:
    """What changed, small enough for NOTIFY; `all` asks listeners for a full reload.

    With `state`, a few changed accounts travel as whole rows (`account_rows`: id, balance,
    held, status, role, group, position), so listeners need not read them back: a hold's
    commit reaches every policy replica without a query."""
    keys = len(changes.accounts) + len(changes.tokens) + len(changes.rate_limits)
    if keys > NOTIFY_MAX_KEYS:
        return {"position": position, "all": True}
    payload: dict[str, Any] = {
        "position": position,
        "accounts": sorted(changes.accounts),
        "tokens": sorted(changes.tokens),
        "rate_limits": sorted([list(key) for key in changes.rate_limits]),
        "catalog": changes.catalog,
    }
    if state is not None and 0 < len(changes.accounts) <= NOTIFY_MAX_ROWS:
        rows = [_account_row(state.accounts[key]) for key in payload["accounts"]]
        with_rows = {**payload, "accounts": [], "account_rows": rows}
        if len(orjson.dumps(with_rows)) <= NOTIFY_MAX_BYTES:
            return with_rows
    return payload


def _account_row(account: Account) -> list[Any]:
    return [
        account.account_id, account.balance, account.held, account.status, account.role,
        account.group, account.position,
    ]  # fmt: skip


_CHANNEL_EVENTS: Final = frozenset(
    {
        "quota.channel.registered",
        "quota.channel.disabled",
        "quota.channel.enabled",
        "quota.channel.provider_rate_limited",
    }
)


def _keys(events: Sequence[Event]) -> repo.StateKeys:
    """The projection rows a batch may touch (by type string: cheaper than `isinstance` on
    pydantic models, which goes through their metaclass)."""
    keys = repo.StateKeys(set(), set(), set(), set(), set())
    for event in events:
        kind = event.type
        data: Any = event.data  # the model of `kind`
        if kind in ACCOUNT_EVENTS:
            keys.accounts.add(event.subject)
        if kind.startswith("quota.token."):
            keys.tokens.add(data.token_id)
            if kind == "quota.token.issued":
                keys.token_keys.add(data.key_sha256.lower())
        elif kind in _CHANNEL_EVENTS:
            keys.channels.add(data.channel_id)
        elif kind.startswith("quota.reservation.") or (
            kind == "quota.account.usage_recorded" and data.reservation_id
        ):
            keys.reservations.add(data.reservation_id)
    return keys


def _quarantined(item: Decoded, rejection: Rejection, received_at: datetime) -> repo.Quarantined:
    record = item.record
    assert record is not None, "only received records are quarantined"
    return repo.Quarantined(
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
