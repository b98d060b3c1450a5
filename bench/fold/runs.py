"""The two measured runs (raw consumer, ledger fold) and the correctness checks."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bench.fold.phases import PhaseTimer
from services.ledger import consumer as ledger_consumer
from services.ledger.chain import GENESIS_HASH, chain_hash, payload_hash
from services.ledger.consumer import LedgerConsumer
from services.settings import Settings

#: The fetch sizes `LedgerConsumer` uses, so both consumers pull the same way.
FETCH_OPTIONS: dict[str, Any] = {
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    "fetch_max_bytes": 32 * 1024 * 1024,
}


@dataclass(slots=True)
class Timeline:
    """Instants (perf_counter seconds) of one consumer run, and what it consumed."""

    started: float
    assigned: float | None = None
    first_started: float | None = None
    first: float | None = None
    first_events: int = 0
    last: float | None = None
    events: int = 0
    batches: int = 0
    #: This process's CPU time (time.process_time) at assignment and at the last batch.
    cpu_assigned: float | None = None
    cpu_last: float | None = None

    def stamp_assigned(self) -> float:
        self.assigned, self.cpu_assigned = time.perf_counter(), time.process_time()
        return self.assigned

    def stamp_last(self, instant: float) -> None:
        self.last, self.cpu_last = instant, time.process_time()

    def join_seconds(self) -> float | None:
        return None if self.assigned is None else self.assigned - self.started

    def rate_e2e(self) -> float:
        """Events per second from consumer start (group join included) to the last batch."""
        assert self.last is not None
        return self.events / (self.last - self.started)

    def rate_post_join(self) -> float:
        """Events per second from partition assignment to the last batch (the headline)."""
        assert self.last is not None
        begin = self.assigned if self.assigned is not None else self.started
        return self.events / (self.last - begin)

    def rate_steady(self) -> float | None:
        """Events per second after the first batch, from its end to the last batch."""
        assert self.last is not None and self.first is not None
        if self.last <= self.first:
            return None
        return (self.events - self.first_events) / (self.last - self.first)

    def cpu_share(self) -> float | None:
        """This process's CPU seconds per wall second, assignment to last batch (1.0 = busy)."""
        if None in (self.cpu_assigned, self.cpu_last, self.assigned, self.last):
            return None
        assert self.cpu_last is not None and self.cpu_assigned is not None
        assert self.last is not None and self.assigned is not None
        return (self.cpu_last - self.cpu_assigned) / (self.last - self.assigned)

    def as_dict(self) -> dict[str, Any]:
        steady = self.rate_steady()
        return {
            "events": self.events,
            "batches": self.batches,
            "join_seconds": self.join_seconds(),
            "seconds_e2e": None if self.last is None else self.last - self.started,
            "seconds_post_join": None
            if self.last is None
            else self.last - (self.assigned or self.started),
            "first_batch_events": self.first_events,
            "assigned_at": _rel(self.assigned, self.started),
            "first_batch_started_at": _rel(self.first_started, self.started),
            "first_batch_done_at": _rel(self.first, self.started),
            "last_batch_done_at": _rel(self.last, self.started),
            "events_per_second_e2e": self.rate_e2e(),
            "events_per_second_post_join": self.rate_post_join(),
            "events_per_second_steady": steady,
            "process_cpu_share_post_join": self.cpu_share(),
        }


def _rel(instant: float | None, origin: float) -> float | None:
    return None if instant is None else round(instant - origin, 4)


# --- raw baseline ------------------------------------------------------------------------------


class _StampAssignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if self.timeline.assigned is None:
            self.timeline.stamp_assigned()


async def run_raw(
    bootstrap: str, topic: str, group: str, expected: int, max_records: int, timeout: float
) -> Timeline:
    """A plain consumer: getmany with a big max_records and json.loads of every value."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **FETCH_OPTIONS,
    )
    timeline = Timeline(time.perf_counter())
    consumer.subscribe([topic], listener=_StampAssignment(timeline))
    await consumer.start()
    loads = json.loads
    try:
        async with asyncio.timeout(timeout):
            while timeline.events < expected:
                batches = await consumer.getmany(timeout_ms=200, max_records=max_records)
                count = 0
                for messages in batches.values():
                    for message in messages:
                        loads(message.value)
                    count += len(messages)
                if not count:
                    continue
                now = time.perf_counter()
                timeline.events += count
                timeline.batches += 1
                if timeline.first is None:
                    timeline.first, timeline.first_events = now, count
                timeline.stamp_last(now)
    finally:
        await consumer.stop()
    if timeline.events != expected:
        # (The count is checked here, not with end offsets: Tansu 0.6 reports the last batch's
        # base offset as a partition's end offset.)
        raise RuntimeError(f"the raw consumer read {timeline.events} records, expected {expected}")
    return timeline


# --- the fold ----------------------------------------------------------------------------------


class _TimedKafkaConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """The ledger's Kafka consumer, with the time spent inside `getmany` recorded."""

    timer: PhaseTimer | None = None

    async def getmany(self, *partitions: TopicPartition, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await super().getmany(*partitions, **kwargs)
        finally:
            if self.timer is not None:
                self.timer.add_span("kafka.getmany", started, time.perf_counter())


@contextlib.contextmanager
def _timed_kafka(timer: PhaseTimer) -> Iterator[None]:
    """Make `LedgerConsumer.run` build a `_TimedKafkaConsumer` (module attribute swap)."""
    original = getattr(ledger_consumer, "AIOKafkaConsumer")  # noqa: B009
    _TimedKafkaConsumer.timer = timer
    setattr(ledger_consumer, "AIOKafkaConsumer", _TimedKafkaConsumer)  # noqa: B010
    try:
        yield
    finally:
        setattr(ledger_consumer, "AIOKafkaConsumer", original)  # noqa: B010
        _TimedKafkaConsumer.timer = None


@contextlib.contextmanager
def _timed_gc(timer: PhaseTimer) -> Iterator[None]:
    """Record the garbage collector's pauses (they overlap whichever phase allocated)."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            timer.add_span(f"gc.gen{info.get('generation')}", started.pop(), time.perf_counter())

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


class TimedLedgerConsumer(LedgerConsumer):
    """The real `LedgerConsumer`, recording when batches commit and how long each step takes."""

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, target: int, timer: PhaseTimer
    ) -> None:
        super().__init__(settings, pool)
        self.target = target
        self.timer = timer
        self.timeline = Timeline(time.perf_counter())
        self.done = asyncio.Event()
        self.failed_batches = 0
        self.stale_records = 0

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await super().on_assigned(assigned)
        if self.timeline.assigned is None:
            self.timer.window_start = self.timeline.stamp_assigned()

    async def _prepare(self, batches: dict[Any, Any]) -> Any:
        for tp, messages in batches.items():
            owned = self.owned.get(tp)
            if owned is not None and messages and messages[0].offset < owned.next_offset:
                # Records the consumer already applied, fetched again (and skipped by it).
                self.stale_records += sum(1 for m in messages if m.offset < owned.next_offset)
        started = time.perf_counter()
        prepared = await super()._prepare(batches)
        self.timer.add("ledger._prepare", time.perf_counter() - started)
        return prepared

    async def _commit(self, consumer: AIOKafkaConsumer, prepared: Any) -> bool:
        before = self.position
        timer = self.timer
        started = time.perf_counter()
        if self.timeline.first_started is None:
            self.timeline.first_started = started
        committed = await super()._commit(consumer, prepared)
        ended = time.perf_counter()
        timer.add("ledger._commit", ended - started)
        if self.position == before:
            self.failed_batches += 1
            return committed
        line = self.timeline
        line.events = self.position
        line.batches += 1
        if line.first is None:
            line.first, line.first_events = ended, self.position - before
        line.stamp_last(ended)
        if self.position >= self.target:
            timer.enabled = False  # the in-flight getmany after the last batch is not counted
            self.done.set()
        return committed


@dataclass(slots=True)
class FoldRun:
    timeline: Timeline
    consumer_started: float | None
    failed_batches: int
    stale_records: int
    phases: dict[str, dict[str, float]] = field(default_factory=dict)


async def run_fold(
    settings: Settings,
    pool: asyncpg.Pool,
    target: int,
    timeout: float,
    timer: PhaseTimer,
    profiler: cProfile.Profile | None = None,
) -> FoldRun:
    """Run `LedgerConsumer` from the topic's beginning until the head reaches `target`."""
    with _timed_kafka(timer), _timed_gc(timer):
        if profiler is not None:
            profiler.enable()
        ledger = TimedLedgerConsumer(settings, pool, target, timer)
        task = asyncio.create_task(ledger.run(), name="bench-ledger")
        consumer_started: float | None = None
        try:
            async with asyncio.timeout(timeout):
                await ledger.started.wait()
                consumer_started = time.perf_counter() - ledger.timeline.started
                waiter = asyncio.create_task(ledger.done.wait())
                finished, _ = await asyncio.wait(
                    {task, waiter}, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter not in finished:
                    waiter.cancel()
                    task.result()  # the consumer died: surface its exception
                    raise RuntimeError("the ledger consumer stopped before reaching the target")
        except TimeoutError:
            raise RuntimeError(
                f"fold did not reach position {target} within {timeout:.0f}s (at {ledger.position})"
            ) from None
        finally:
            if profiler is not None:
                profiler.disable()
            await ledger.stop()
            try:
                async with asyncio.timeout(30):
                    await task
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return FoldRun(ledger.timeline, consumer_started, ledger.failed_batches, ledger.stale_records)


# --- correctness -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    expected: object
    actual: object

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


async def verify(pool: asyncpg.Pool, events: int, amount_sum: int, accounts: int) -> list[Check]:
    """The fold's result in PostgreSQL against what was produced; the hash chain rebuilt."""
    async with pool.acquire() as conn:
        head = await conn.fetchrow("SELECT position, hash FROM ledger_head WHERE id = 1")
        stored = await conn.fetchval("SELECT count(*) FROM event_store")
        balances = await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts")
        account_rows = await conn.fetchval("SELECT count(*) FROM accounts")
        deltas = await conn.fetchval("SELECT coalesce(sum(balance_delta), 0) FROM event_store")
        rejected = await conn.fetchval("SELECT count(*) FROM rejected_events")
        chain_ok = await _chain_intact(conn, head["hash"])
    return [
        Check("ledger_head.position", events, head["position"]),
        Check("count(event_store)", events, stored),
        Check("sum(accounts.balance)", -amount_sum, int(balances)),
        Check("sum(event_store.balance_delta)", -amount_sum, int(deltas)),
        Check("count(accounts)", accounts, account_rows),
        Check("count(rejected_events)", 0, rejected),
        Check("hash chain rebuilt to head", True, chain_ok),
    ]


async def _chain_intact(conn: asyncpg.Connection, head_hash: str) -> bool:
    prev = GENESIS_HASH
    expected_position = 1
    async with conn.transaction():
        cursor = conn.cursor(
            "SELECT position, payload, content_hash, prev_hash, hash FROM event_store "
            "ORDER BY position",
            prefetch=10_000,
        )
        async for row in cursor:
            if row["position"] != expected_position or row["prev_hash"] != prev:
                return False
            if payload_hash(row["payload"].encode()) != row["content_hash"]:
                return False
            current = chain_hash(prev, row["position"], row["content_hash"])
            if current != row["hash"]:
                return False
            prev = current
            expected_position += 1
    return prev == head_hash
