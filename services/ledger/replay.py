"""Replay: rebuild every projection from history, or (`check`) only report how they differ.

Sources
    * the event store (default), in position order;
    * the Kafka topic (`from_kafka`), read from the beginning of every partition to the end
      offsets taken at start by a fresh consumer that commits nothing. Records are decoded and
      screened like ingest (`ingest.decode_all`, `ingest.screen`: duplicates dropped, reused ids
      with other content rejected). Kafka only orders records within a partition; producers key
      by subject, so one account's events (and all catalog events, subject `catalog`) share a
      partition and keep their order. Partitions are merged by record timestamp (ties by
      partition, offset) and folded with the pure `fold`; only cross-account effects (a token
      key used twice) could depend on that merge. Each applied event is then given the position
      the event store holds for the same id, so the rows' `position` columns mean what they mean
      for the ledger; Kafka events missing from the store, stored events missing from Kafka and
      ids whose content differs are named as `kafka.*` differences.

Folding the store fast (the default)
    Money events (`fold.MONEY_EVENTS`: a balance change and nothing else) are folded in SQL: balance
    = SUM(balance_delta) and last position = MAX(position) per subject (verify holds each
    stored `balance_delta` to its hashed payload). Every other event (status/role/group,
    tokens, rate limits, catalog, and any type added later) goes through the pure `apply_event`
    at its stored position, decoded straight from the canonical payload (`json.loads` + the
    pydantic model: it was validated at ingest). Accounts that ever held quota are folded
    wholly in Python, since a hold's fold depends on the balance at its position. The two are
    merged per account. `accelerated=False` uses the reference re-fold shared with verify
    (`audit.refold_history`) instead; tests hold both to the same result.
    The hash chain is checked in SQL (content hashes, links, positions) in the same snapshot.

Writing
    One transaction takes the `ledger_head` row lock (so no ledger batch interleaves), folds
    any events appended since the snapshot, compares the replayed state with the live rows,
    TRUNCATEs `PROJECTION_TABLES` and COPYs the replayed rows into them, and NOTIFYs listeners
    to reload everything. TRUNCATE gives every table new, empty storage, and PostgreSQL swaps
    it in at commit (the old storage stays on rollback): readers see the old projections or
    the new ones, never a mix. A history with chain or consistency differences is reported and
    not swapped in.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from typing import Any, Final

import asyncpg

from services.contract.cloudevent import Rejection
from services.contract.events import EVENT_TYPES, INT64_MAX, Event
from services.ledger import audit, history_store, ingest
from services.store import db, event_store, projections
from services.store.chain import ChainWalk
from services.store.fold import MONEY_EVENTS, FoldError, apply_event, fold
from services.store.model import Account, Changes, State
from services.store.notify import Notification

#: Every projection table replay rebuilds (and swaps in): those `repository.projection_rows`
#: writes. A new projection table: its columns and rows there.
PROJECTION_TABLES: Final[tuple[str, ...]] = tuple(projections.PROJECTION_COLUMNS)

#: Non-money rows decoded per fetch; also the progress bar's step.
PAGE_SIZE: Final = 10_000

Progress = Callable[[int], None]


def no_progress(_: int) -> None:
    return None


@dataclass(slots=True)
class History:
    """A re-folded history: the state, where it ends and what did not add up on the way."""

    state: State
    position: int
    head_hash: str
    events: int
    differences: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ReplayReport:
    source: str
    check: bool
    events: int
    position: int
    head_hash: str
    history_differences: list[dict[str, Any]]
    differences: list[dict[str, Any]]
    replaced: bool
    seconds: float
    #: Seconds per phase: refold (with the chain check), compare, swap.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.history_differences and not self.differences

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "mode": "check" if self.check else "rebuild",
            "events": self.events,
            "position": self.position,
            "head_hash": self.head_hash,
            "replaced": self.replaced,
            "seconds": round(self.seconds, 3),
            "phases": {name: round(seconds, 3) for name, seconds in self.phases.items()},
            "history_differences": self.history_differences,
            "differences": self.differences,
        }


# --- the chain, in SQL --------------------------------------------------------------------------


async def check_chain(conn: asyncpg.Connection, upto: int) -> list[dict[str, Any]]:
    """Differences in the hash chain up to `upto`, named as verify names them."""
    out: list[dict[str, Any]] = []
    for row in await history_store.chain_breaks(conn, upto):
        where = f"position {row['position']}"
        if row["position"] != row["prev_position"] + 1:
            out.append(_diff("event_store.position", where, row["prev_position"] + 1,
                             row["position"]))  # fmt: skip
        if row["prev_hash"] != row["want_prev"]:
            out.append(_diff("event_store.prev_hash", where, row["want_prev"], row["prev_hash"]))
        if row["content_hash"] != row["digest"]:
            out.append(_diff("event_store.content_hash", where, row["digest"],
                             row["content_hash"]))  # fmt: skip
        if row["hash"] != row["want_hash"]:
            out.append(_diff("event_store.hash", where, row["want_hash"], row["hash"]))
    return out


def _diff(what: str, row: str, expected: Any, found: Any) -> dict[str, Any]:
    return audit._difference(what, row, expected, found)


# --- the store, fast ----------------------------------------------------------------------------


def fast_decode(payload: str) -> Event:
    """The event stored as `payload`, without the CloudEvents SDK (it was checked at ingest)."""
    obj = json.loads(payload)
    model = EVENT_TYPES.get(str(obj.get("type"))) if isinstance(obj, dict) else None
    raw = obj.get("data") if isinstance(obj, dict) else None
    if model is None or not isinstance(raw, dict):
        return audit.decode_payload(payload)  # the reference decoder names the problem
    stamp = obj.get("time")
    return Event(
        id=obj["id"],
        source=obj["source"],
        type=obj["type"],
        subject=obj["subject"],
        time=datetime.fromisoformat(stamp) if stamp is not None else None,
        data=model.model_validate(raw),
        raw_data=raw,
    )


async def _chain_in_snapshot(dsn: str, snapshot: str, upto: int) -> list[dict[str, Any]]:
    """`check_chain` on a second connection that sees exactly the caller's snapshot."""
    other = await db.connect(dsn)
    try:
        async with other.transaction(isolation="repeatable_read", readonly=True):
            await history_store.use_snapshot(other, snapshot)
            return await check_chain(other, upto)
    finally:
        await other.close()


async def refold_store_fast(
    conn: asyncpg.Connection, upto: int, progress: Progress = no_progress, dsn: str = ""
) -> History:
    """Re-fold the store up to position `upto` (in the caller's snapshot): money in SQL, the
    rest in Python; check the chain in SQL. Given a `dsn`, the chain is checked on a second
    connection in the same snapshot while this one folds (PostgreSQL hashes on one core while
    Python folds on the other)."""
    chain: asyncio.Task[list[dict[str, Any]]] | None = None
    differences: list[dict[str, Any]] = []
    if dsn:
        snapshot = await history_store.export_snapshot(conn)
        chain = asyncio.create_task(_chain_in_snapshot(dsn, snapshot, upto))
    else:
        differences = await check_chain(conn, upto)
    # A hold's fold depends on the balance at that point, and a budget counts usage by time,
    # so accounts that ever held quota or had a budget are folded wholly in Python, their money
    # events included.
    money_types = sorted(MONEY_EVENTS)
    holding, budgeted = await history_store.holding_subjects(conn, upto)
    events = 0
    money = await history_store.money_totals(conn, upto, money_types, holding)
    for row in money:
        events += row["events"]
        for position in row["bad"] or ():
            differences.append(_diff("event_store.balance_delta", f"position {position}",
                                     "the amount the event moved the balance", None))  # fmt: skip
    progress(events)
    state = State(track_usage=budgeted)  # usage by time matters only to a budget set later
    changes = Changes()
    pending = 0
    async for row in history_store.other_events(conn, upto, money_types, holding, PAGE_SIZE):
        events += 1
        pending += 1
        if pending == PAGE_SIZE:
            progress(pending)
            pending = 0
        _apply_stored(state, changes, differences, row)
    progress(pending)
    for row in money:
        subject: str = row["subject"]
        account = state.accounts.get(subject)
        if account is None:
            account = Account(subject, position=0)
        balance = account.balance + int(row["balance"])
        if not -INT64_MAX <= balance <= INT64_MAX:
            differences.append(_diff("refold.rejected", f"account {subject}", "applied",
                                     "balance leaves the int64 range"))  # fmt: skip
        state.accounts[subject] = replace(
            account, balance=balance, position=max(account.position, row["position"])
        )
    head_hash = await history_store.hash_at(conn, upto)
    if chain is not None:
        differences = [*await chain, *differences]
    return History(state, upto, head_hash, events, differences)


def _apply_stored(
    state: State, changes: Changes, differences: list[dict[str, Any]], row: Any
) -> None:
    where = f"position {row['position']}"
    try:
        event = fast_decode(row["payload"])
    except (Rejection, ValueError, KeyError) as exc:
        differences.append(_diff("event_store.payload", where, "a decodable event", str(exc)))
        return
    for column, value in (("type", event.type), ("subject", event.subject)):
        if row[column] != value:
            differences.append(_diff(f"event_store.{column}", where, value, row[column]))
    try:
        # The stored time stands for an event that carried none (budgets count usage by time).
        apply_event(state, changes, event, row["position"], row["time"])
    except FoldError as exc:
        differences.append(_diff("refold.rejected", where, "applied", str(exc)))


async def refold_store(
    conn: asyncpg.Connection,
    *,
    accelerated: bool = True,
    progress: Progress = no_progress,
    dsn: str = "",
) -> History:
    """Re-fold the whole store in the caller's (snapshot) transaction."""
    head = await event_store.read_head(conn)
    if accelerated:
        history = await refold_store_fast(conn, head.position, progress, dsn)
    else:
        walk = await audit.refold_history(conn, on_page=progress)
        chain = walk.chain
        history = History(walk.state, chain.last_position, chain.last_hash, chain.checked,
                          walk.differences)  # fmt: skip
    _check_head(history, head)
    return history


def _check_head(history: History, head: event_store.Head) -> None:
    if head.position != history.position:
        history.differences.append(_diff("ledger_head.position", "ledger_head",
                                         history.position, head.position))  # fmt: skip
    if head.hash != history.head_hash:
        history.differences.append(_diff("ledger_head.hash", "ledger_head",
                                         history.head_hash, head.hash))  # fmt: skip


# --- Kafka --------------------------------------------------------------------------------------


async def read_topic(bootstrap: str, topic: str) -> list[ingest.Incoming]:
    """Every record of `topic`, from each partition's beginning to its end offset at start,
    merged across partitions by timestamp (each partition's own order is kept)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends: dict[Any, int] = await consumer.end_offsets(tps)
        per: dict[int, list[tuple[int, int, int, ingest.Incoming]]] = {p: [] for p in partitions}
        starts: dict[Any, int] = await consumer.beginning_offsets(tps)
        next_offset = dict(starts)
        started_ms = int(time.time() * 1000)
        # Some brokers (Tansu) report a batch-based end offset that can be too low: read on
        # until the ends are passed and a fetch comes back empty, skipping records stamped
        # after the start (appended while we read).
        idle = False
        while not idle or any(next_offset[tp] < ends[tp] for tp in tps):
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            idle = not batch
            for tp, records in batch.items():
                for r in records:
                    next_offset[tp] = max(next_offset[tp], r.offset + 1)
                    if r.offset >= ends[tp] and r.timestamp > started_ms:
                        continue
                    incoming = ingest.Incoming(
                        r.topic, r.partition, r.offset, tuple(r.headers or ()), r.value
                    )
                    per[tp.partition].append((r.timestamp, r.partition, r.offset, incoming))
    finally:
        await consumer.stop()
    return [item[3] for item in heapq.merge(*per.values(), key=lambda i: (i[0], i[1], i[2]))]


async def refold_kafka(
    conn: asyncpg.Connection, bootstrap: str, topic: str, progress: Progress = no_progress
) -> History:
    """Fold the topic (see the module doc), positions taken from the store by event id; the
    chain is checked too, in the caller's snapshot."""
    head = await event_store.read_head(conn)
    records = await read_topic(bootstrap, topic)
    screened = ingest.screen(ingest.decode_all(records), {})
    result = fold(State(), [u.event for u in screened.unique], 1)
    progress(len(records))
    digests = {id(u.event): u.digest for u in screened.unique}
    stored = await history_store.stored_ids(conn, head.position)
    differences = await check_chain(conn, head.position)
    positions: dict[int, int] = {}
    seen: set[str] = set()
    for applied in result.applied:
        event = applied.event
        seen.add(event.id)
        known = stored.get(event.id)
        if known is None:
            differences.append(_diff("kafka.unstored", event.id, "in the event store", None))
            positions[applied.position] = 0
            continue
        positions[applied.position] = known[0]
        if known[1] != digests[id(event)]:
            differences.append(_diff("kafka.content_hash", event.id, known[1],
                                     digests[id(event)]))  # fmt: skip
    for event_id in sorted(stored.keys() - seen, key=lambda e: stored[e][0]):
        differences.append(_diff("kafka.missing", f"position {stored[event_id][0]}",
                                 event_id, None))  # fmt: skip
    state = _renumber(result.state, positions)
    head_hash = await history_store.hash_at(conn, head.position)
    history = History(state, head.position, head_hash, len(result.applied), differences)
    _check_head(history, head)
    return history


def _renumber(state: State, positions: dict[int, int]) -> State:
    """Every row's `position` mapped through `positions` (any table of the state)."""
    out = state.copy()
    for f in fields(out):
        table = getattr(out, f.name)
        if not isinstance(table, dict):
            continue
        for key, row in list(table.items()):
            if is_dataclass(row) and hasattr(row, "position"):
                table[key] = replace(row, position=positions.get(row.position, 0))  # type: ignore[type-var]
    return out


# --- writing ------------------------------------------------------------------------------------


async def _catch_up(conn: asyncpg.Connection, history: History, upto: int) -> list[dict[str, Any]]:
    """Fold (and chain-check) events appended after the snapshot into `history.state`."""
    changes = Changes()  # `_apply_stored` records them; the swap writes every row anyway
    differences: list[dict[str, Any]] = []
    chain = ChainWalk(history.position, history.head_hash)
    rows = await history_store.events_between(conn, history.position, upto)
    for row in rows:
        where = f"position {row['position']}"
        broken = chain.step(
            row["position"], row["payload"], row["content_hash"], row["prev_hash"], row["hash"]
        )
        for column, expected, found in broken:
            differences.append(_diff(f"event_store.{column}", where, expected, found))
        _apply_stored(history.state, changes, differences, row)
    history.events += len(rows)
    history.position = upto
    history.head_hash = chain.last_hash
    return differences


async def rebuild(
    conn: asyncpg.Connection, history: History, phases: dict[str, float] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Swap `history.state` in as the projections (see the module doc).

    Returns the differences between the replayed and the previous live projections, and
    whether the swap happened (not when the history itself has differences).
    """
    phases = phases if phases is not None else {}
    started = time.perf_counter()
    async with conn.transaction():
        head = await event_store.lock_head(conn)
        if head.position != history.position:
            history.differences.extend(await _catch_up(conn, history, head.position))
        _check_head_after_lock(history, head)
        differences = audit.compare_states(history.state, await projections.load_all(conn))
        phases["compare"] = time.perf_counter() - started
        if history.differences:
            return differences, False
        started = time.perf_counter()
        # TRUNCATE gives each table new, empty storage; the old storage is dropped at commit
        # (and kept on rollback): fresh tables, swapped in atomically.
        await history_store.truncate(conn, PROJECTION_TABLES)
        await projections.copy_projections(conn, history.state)
        await db.notify_changes(conn, Notification(head.position, all=True))
    phases["swap"] = time.perf_counter() - started
    return differences, True


def _check_head_after_lock(history: History, head: event_store.Head) -> None:
    if head.hash != history.head_hash:
        history.differences.append(_diff("ledger_head.hash", "ledger_head",
                                         history.head_hash, head.hash))  # fmt: skip


# --- the whole run ------------------------------------------------------------------------------


async def replay(
    conn: asyncpg.Connection,
    *,
    check: bool,
    from_kafka: bool = False,
    kafka_bootstrap: str = "",
    topic: str = "",
    accelerated: bool = True,
    progress: Progress = no_progress,
    dsn: str = "",
) -> ReplayReport:
    """Re-fold history and either compare (`check`) or rebuild the projections.

    With `dsn`, a second connection checks the hash chain in parallel."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if from_kafka:
            history = await refold_kafka(conn, kafka_bootstrap, topic, progress)
        else:
            history = await refold_store(conn, accelerated=accelerated, progress=progress, dsn=dsn)
        phases["refold"] = time.perf_counter() - started
        if check:
            differences = audit.compare_states(history.state, await projections.load_all(conn))
            phases["compare"] = time.perf_counter() - started - phases["refold"]
    replaced = False
    if not check:
        differences, replaced = await rebuild(conn, history, phases)
    return ReplayReport(
        source="kafka" if from_kafka else "store",
        check=check,
        events=history.events,
        position=history.position,
        head_hash=history.head_hash,
        history_differences=history.differences,
        differences=differences,
        replaced=replaced,
        seconds=time.perf_counter() - started,
        phases=phases,
    )
