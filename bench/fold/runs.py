"""The workload, the two measured runs (raw consumer, ledger fold), and the checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bench.infra import REJECTED_SQL, Publisher
from services.contract.samples import structured, usage
from services.ledger.audit import verify
from services.ledger.consumer import CommittedBatch, LedgerConsumer
from services.settings import Settings
from services.store.event_store import read_head


@dataclass(slots=True)
class Produced:
    events: int = 0
    amount_sum: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    accounts: set[str] = field(default_factory=set)


async def produce(bootstrap: str, topic: str, events: int, accounts: int, seed: int) -> Produced:
    """`events` usage events with unique (reproducible) ids over `accounts` random accounts."""
    rng = random.Random(seed)
    out = Produced()

    def records() -> Iterator[tuple[bytes, bytes]]:
        for _ in range(events):
            subject, amount = f"acct-{rng.randrange(accounts):05d}", rng.randint(1, 100)
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            value = structured(usage(subject, amount, event_id=event_id, source="bench.fold"))
            out.events += 1
            out.amount_sum += amount
            out.value_bytes += len(value)
            out.accounts.add(subject)
            yield subject.encode(), value

    started = time.perf_counter()
    async with Publisher(bootstrap, topic) as publisher:
        await publisher.send_all(records())
    out.seconds = time.perf_counter() - started
    return out


@dataclass(slots=True)
class Timeline:
    """Instants (perf_counter seconds) of one consumer run, and what it consumed."""

    started: float = field(default_factory=time.perf_counter)
    assigned: float | None = None
    last: float = 0.0
    events: int = 0
    batches: int = 0
    #: This process's CPU time (time.process_time) at assignment and at the last batch.
    cpu_assigned: float = 0.0
    cpu_last: float = 0.0
    #: Each batch's seconds from its decode start to its commit (the fold only).
    batch_seconds: list[float] = field(default_factory=list)

    def stamp_assigned(self) -> None:
        if self.assigned is None:
            self.assigned, self.cpu_assigned = time.perf_counter(), time.process_time()

    def batch(self, events: int) -> None:
        self.events += events
        self.batches += 1
        self.last, self.cpu_last = time.perf_counter(), time.process_time()

    def as_dict(self) -> dict[str, Any]:
        begin = self.assigned or self.started
        window = self.last - begin
        return {
            "events": self.events,
            "batches": self.batches,
            "join_seconds": begin - self.started,
            "seconds_post_join": window,
            "events_per_second_e2e": self.events / (self.last - self.started),
            "events_per_second_post_join": self.events / window,
            "process_cpu_share_post_join": (self.cpu_last - self.cpu_assigned) / window,
        }


class _StampAssignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.timeline.stamp_assigned()


async def run_raw(
    bootstrap: str, topic: str, group: str, expected: int, max_records: int, timeout: float
) -> Timeline:
    """A plain consumer (the ledger's fetch sizes): getmany and json.loads of every value."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )  # fmt: skip
    timeline = Timeline()
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
                if count:
                    timeline.batch(count)
    finally:
        await consumer.stop()
    # (Counted here, not with end offsets: Tansu 0.6 reports a partition's end offset wrongly.)
    if timeline.events != expected:
        raise RuntimeError(f"the raw consumer read {timeline.events} records, expected {expected}")
    return timeline


async def run_fold(settings: Settings, pool: asyncpg.Pool, target: int, timeout: float) -> Timeline:
    """The real `LedgerConsumer` from the topic's beginning until its head reaches `target`,
    its batches heard through `on_commit`."""
    timeline = Timeline()
    done = asyncio.Event()

    def committed(batch: CommittedBatch) -> None:
        timeline.batch(batch.records)
        timeline.batch_seconds.append(batch.seconds)
        if batch.position >= target:
            done.set()

    ledger = LedgerConsumer(settings, pool, on_commit=committed)
    task = asyncio.create_task(ledger.run(), name="bench-ledger")
    try:
        async with asyncio.timeout(timeout):
            while not ledger.owned and not task.done():  # partitions are claimed on assignment
                await asyncio.sleep(0.002)
            timeline.stamp_assigned()
            waiter = asyncio.create_task(done.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not done.is_set():
                waiter.cancel()
                task.result()  # the consumer died: its exception
                raise RuntimeError("the ledger consumer stopped before reaching the target")
    except TimeoutError:
        raise RuntimeError(
            f"fold did not reach position {target} within {timeout:.0f}s (at {ledger.position})"
        ) from None
    finally:
        await ledger.stop()
        with contextlib.suppress(TimeoutError):  # (wait_for cancels the task, and waits)
            await asyncio.wait_for(task, 30)
    return timeline


async def check(
    pool: asyncpg.Pool, events: int, amount_sum: int, accounts: int
) -> list[tuple[str, object, object]]:
    """(check, expected, found): PostgreSQL against what was produced, and the audit's `verify`."""
    async with pool.acquire() as conn:
        audit = await verify(conn)
        return [
            ("ledger_head.position", events, (await read_head(conn)).position),
            ("count(event_store)", events, await conn.fetchval("SELECT count(*) FROM event_store")),
            ("sum(accounts.balance)", -amount_sum,
             await conn.fetchval("SELECT coalesce(sum(balance), 0)::bigint FROM accounts")),
            ("count(accounts)", accounts, await conn.fetchval("SELECT count(*) FROM accounts")),
            ("count(rejected_events)", 0, await conn.fetchval(REJECTED_SQL)),
            ("verify: chain and re-fold ok", [True, events], [audit.ok, audit.events_checked]),
        ]  # fmt: skip
