"""The real ledger in the driver's process, producing the world, and the freshness scenario.

The ledger runs as `services.ledger.app.create_app(settings)` with its lifespan (pool, producer,
`LedgerConsumer`, heartbeat), exactly as `quota ledger` runs it; the only change is a subclass
of `LedgerConsumer` (swapped in by module attribute, as bench.fold does) that stamps the
monotonic clock whenever a batch commits. Its heartbeat keeps the policy from going stale
(`QUOTA_MAX_STALENESS_SECONDS`) while wrk runs, so the driver's event loop must stay free.

Time stamps are `time.monotonic_ns()`: CLOCK_MONOTONIC on Linux, one clock for every process
of the machine, so the server's "snapshot reached position N" compares with the driver's
"event produced".
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI

from bench.authorize.world import fresh_event
from services.ledger import app as ledger_app
from services.ledger import consumer as ledger_consumer
from services.ledger.consumer import LedgerConsumer
from services.settings import Settings
from tests.builders import structured


class StampedConsumer(LedgerConsumer):
    """`LedgerConsumer`, recording (position, monotonic ns) whenever its position advances.

    The consumer sets `self.position` right after a batch commits; a property catches that
    without depending on how the consumer's methods are named or split. The stamp is a
    little late (after COMMIT returned), which makes "ledger commit -> snapshot" a little
    short, never long.
    """

    def __init__(self, settings: Settings, pool: Any) -> None:
        self.commit_positions: list[int] = []
        self.commit_ns: list[int] = []
        self._stamped_position = 0
        super().__init__(settings, pool)

    @property
    def position(self) -> int:
        return self._stamped_position

    @position.setter
    def position(self, value: int) -> None:
        if value > self._stamped_position:
            self.commit_ns.append(time.monotonic_ns())
            self.commit_positions.append(value)
        self._stamped_position = value

    def committed_ns(self, position: int) -> int | None:
        index = bisect.bisect_left(self.commit_positions, position)
        return self.commit_ns[index] if index < len(self.commit_positions) else None


def _kafka_consumer_with(fetch_max_wait_ms: int) -> type[Any]:
    class FetchWaitConsumer(AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *topics: str, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = fetch_max_wait_ms
            super().__init__(*topics, **kwargs)

    return FetchWaitConsumer


@contextlib.asynccontextmanager
async def running_ledger(
    settings: Settings, fetch_max_wait_ms: int | None = None
) -> AsyncIterator[tuple[FastAPI, StampedConsumer]]:
    """The ledger app with its lifespan, its consumer a `StampedConsumer`.

    `fetch_max_wait_ms` (an experiment, not the service as shipped) overrides the ledger's
    Kafka consumer's fetch wait, which it leaves at aiokafka's default (500 ms). A broker
    that does not answer a waiting fetch when data arrives (Tansu 0.6) holds every fetch
    that long; Apache Kafka answers as soon as `fetch_min_bytes` (1) is there.
    """
    original = getattr(ledger_app, "LedgerConsumer")  # noqa: B009
    original_kafka = getattr(ledger_consumer, "AIOKafkaConsumer")  # noqa: B009
    setattr(ledger_app, "LedgerConsumer", StampedConsumer)  # noqa: B010
    if fetch_max_wait_ms is not None:
        kafka_class = _kafka_consumer_with(fetch_max_wait_ms)
        setattr(ledger_consumer, "AIOKafkaConsumer", kafka_class)  # noqa: B010
    try:
        app = ledger_app.create_app(settings)
        async with app.router.lifespan_context(app):
            consumer = app.state.ledger.consumer
            assert isinstance(consumer, StampedConsumer)
            await asyncio.wait_for(consumer.started.wait(), 60)
            yield app, consumer
    finally:
        setattr(ledger_app, "LedgerConsumer", original)  # noqa: B010
        setattr(ledger_consumer, "AIOKafkaConsumer", original_kafka)  # noqa: B010


async def produce(bootstrap: str, topic: str, events: Sequence[dict[str, Any]]) -> float:
    """Produce events keyed by subject (as the ledger's POST /events does); seconds taken."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for event in events:
            value = structured(event)
            pending.append(await producer.send(topic, key=event["subject"].encode(), value=value))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def wait_for_position(consumer: LedgerConsumer, position: int, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            while consumer.position < position:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise RuntimeError(
            f"the ledger did not reach position {position} within {timeout:.0f}s "
            f"(at {consumer.position})"
        ) from None


@dataclass(frozen=True, slots=True)
class FreshSample:
    position: int
    produced_ns: int
    acked_ns: int
    committed_ns: int | None
    reached_ns: int

    @property
    def total_ms(self) -> float:
        return (self.reached_ns - self.produced_ns) / 1e6


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


async def measure_freshness(
    bootstrap: str,
    topic: str,
    consumer: StampedConsumer,
    server: httpx.AsyncClient,
    count: int,
    warmup: int = 5,
    head: int = 0,
) -> list[FreshSample]:
    """Produce `count` recharges one at a time; for each, when the policy's snapshot had it.

    Each event is produced only after the previous one reached the snapshot, so the ledger
    position names it: the event is at position (position before) + 1. `head` is the ledger
    head read from PostgreSQL: events appended by the policy (reservation holds) move it
    without the consumer knowing, so the consumer's own position may be behind it.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    samples: list[FreshSample] = []
    try:
        position = max(consumer.position, head)
        for index in range(warmup + count):
            event = fresh_event()
            value = structured(event)
            produced = time.monotonic_ns()
            await producer.send_and_wait(topic, key=event["subject"].encode(), value=value)
            acked = time.monotonic_ns()
            position += 1
            answer = await server.get(
                "/_bench/reached", params={"position": position, "timeout": 30}, timeout=40
            )
            if answer.status_code != 200:
                raise RuntimeError(
                    f"the policy's snapshot did not reach position {position}: {answer.text}"
                )
            reached = answer.json()["reached_ns"]
            if index >= warmup:
                samples.append(FreshSample(position, produced, acked, None, reached))
    finally:
        await producer.stop()
    # The notification reaches the snapshot at COMMIT, which can be before the consumer has
    # recorded its new position: look the commit stamps up once it has caught up.
    deadline = time.monotonic() + 30
    while samples and consumer.position < samples[-1].position and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return [replace(s, committed_ns=consumer.committed_ns(s.position)) for s in samples]


def freshness_report(samples: Sequence[FreshSample]) -> dict[str, Any]:
    total = [s.total_ms for s in samples]
    acked = [(s.acked_ns - s.produced_ns) / 1e6 for s in samples]
    stamped = [s for s in samples if s.committed_ns is not None]
    fold = [(s.committed_ns - s.produced_ns) / 1e6 for s in stamped if s.committed_ns]
    push = [(s.reached_ns - s.committed_ns) / 1e6 for s in stamped if s.committed_ns]
    return {
        "events": len(samples),
        "commit_stamped": len(stamped),
        "total_ms": summarize(total),
        "components_ms": {
            "produce_ack": summarize(acked),
            "produce_to_ledger_commit": summarize(fold) if fold else None,
            "ledger_commit_to_snapshot": summarize(push) if push else None,
        },
    }
