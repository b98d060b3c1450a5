"""The append path both writers share: fold first-seen events onto the rows they touch, chain
the applied ones after the head, and store them with the projection rows they changed.

The ledger appends what it consumed (`fold_and_append`, inside its batch transaction, which
also writes offsets and quarantine); the policy appends what it emits itself, holds' ends
and expiries (`append_local`, one statement). Both run under the head lock, so positions and
the hash chain have one writer at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from time import perf_counter
from typing import Any, Final

import asyncpg

from services.contract.cloudevent import canonical_json, event_content
from services.contract.events import ACCOUNT_EVENTS, Event
from services.store import event_store, phases, projections
from services.store.chain import chain_hash, payload_hash
from services.store.fold import fold
from services.store.model import Changes, State
from services.store.notify import notify_payload
from services.store.periods import TOTAL_START


@dataclass(frozen=True, slots=True)
class Unique:
    """An event seen for the first time, with its canonical payload and that payload's hash;
    `source` is where it was consumed (topic, partition, offset), `tag` whatever the caller
    wants back with a refusal (the ledger: its decoded record, to quarantine)."""

    event: Event
    payload: bytes
    digest: str
    source: tuple[str, int, int] | None = None
    tag: Any = None


@dataclass(slots=True)
class Appended:
    """What one fold-and-append wrote: the new head, the rows changed, what was refused."""

    position: int
    hash: str
    records: list[event_store.EventTuple]
    state: State
    changes: Changes
    rejected: list[tuple[Unique, str]]

    @property
    def count(self) -> int:
        return len(self.records)


async def fold_and_append(
    conn: asyncpg.Connection,
    head: event_store.Head,
    unique: Sequence[Unique],
    received_at: datetime,
    *,
    derive: bool,
) -> Appended:
    """Fold first-seen events onto the rows they touch, chain and store what applied."""
    started = perf_counter()
    state = await projections.load_state(conn, state_keys([u.event for u in unique], received_at))
    phases.lap("load", started)
    appended = fold_and_chain(head, unique, state, received_at, derive=derive)
    started = perf_counter()
    await event_store.append_events(conn, appended.records)
    await projections.write_changes(conn, appended.state, appended.changes)
    phases.lap("store", started)
    return appended


def fold_and_chain(
    head: event_store.Head,
    unique: Sequence[Unique],
    state: State,
    received_at: datetime,
    *,
    derive: bool,
) -> Appended:
    """Fold first-seen events onto `state` and chain the applied ones after `head`."""
    started = perf_counter()
    outcome = fold(
        state, (u.event for u in unique), head.position + 1, derive=derive,
        received_at=received_at,
    )  # fmt: skip
    started = phases.lap("fold", started)
    by_event = {id(u.event): u for u in unique}
    records: list[event_store.EventTuple] = []
    prev = head.hash
    for applied in outcome.applied:
        event = applied.event
        origin = by_event.get(id(event))
        if origin is not None:
            payload, digest, source = origin.payload, origin.digest, origin.source
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
    phases.lap("chain", started)
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
    head: event_store.Head | None = None,
) -> LocalResult:
    """Fold and store events the service emits itself (reservations), in the caller's
    transaction, serialised with the consumer's batches by the head lock (`head`: the caller
    already holds it). Everything is written in one statement."""
    received_at = datetime.now(UTC)
    if head is None:
        head = await event_store.lock_head(conn)
    unique = []
    for event in events:
        payload = canonical_json(event_content(event))
        unique.append(Unique(event, payload, payload_hash(payload)))
    state = await projections.load_state(conn, state_keys(events, received_at))
    appended = fold_and_chain(head, unique, state, received_at, derive=False)
    notify = (
        notify_payload(appended.position, appended.changes, appended.state)
        if appended.count
        else None
    )
    await event_store.write_local(
        conn,
        appended.records,
        appended.state,
        appended.changes,
        event_store.Head(appended.position, appended.hash, head.duplicates),
        notify,
    )
    rejected = {u.event.id: reason for u, reason in appended.rejected}
    return LocalResult(appended.position, appended.state, rejected)


#: Longer than any period but `total` (a month), in any zone.
_LONGEST_PERIOD: Final = timedelta(days=32)

_CHANNEL_EVENTS: Final = frozenset(
    {
        "quota.channel.registered",
        "quota.channel.disabled",
        "quota.channel.enabled",
        "quota.channel.provider_rate_limited",
    }
)


def state_keys(events: Sequence[Event], received_at: datetime) -> projections.StateKeys:
    """The projection rows a batch may touch (by type string: cheaper than `isinstance` on
    pydantic models, which goes through their metaclass)."""
    keys = projections.StateKeys(set(), set(), set(), set(), set())
    for event in events:
        kind = event.type
        data: Any = event.data  # the model of `kind`
        if kind in ACCOUNT_EVENTS:
            keys.accounts.add(event.subject)
        if kind == "quota.account.usage_recorded":
            when = event.time or received_at
            keys.usage.append((event.subject, data, when))
            if data.reservation_id:
                keys.reservations.add(data.reservation_id)
        elif kind.startswith("quota.token."):
            keys.tokens.add(data.token_id)
            if kind in ("quota.token.issued", "quota.token.rotated"):
                keys.token_keys.add(data.key_sha256.lower())
        elif kind in _CHANNEL_EVENTS:
            keys.channels.add(data.channel_id)
        elif kind.startswith("quota.reservation."):
            keys.reservations.add(data.reservation_id)
            if kind == "quota.reservation.held" and data.token_id is not None:
                keys.tokens.add(data.token_id)  # its holds count the new one
        elif kind == "quota.budget.set":
            if data.token_id is not None:
                keys.tokens.add(data.token_id)
            when = event.time or received_at
            since = TOTAL_START if data.period == "total" else when - _LONGEST_PERIOD
            earlier = keys.budget_sets.get(event.subject)
            keys.budget_sets[event.subject] = since if earlier is None else min(earlier, since)
    return keys
