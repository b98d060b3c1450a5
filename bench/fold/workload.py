"""The workload: `quota.account.usage_recorded` CloudEvents, structured JSON, keyed by subject."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from tests.builders import structured, usage

#: How many produced values are kept for the per-event cost measurements.
SAMPLE_SIZE = 20_000
#: Sends in flight before waiting for their acknowledgements.
SEND_WINDOW = 20_000


@dataclass(slots=True)
class Produced:
    events: int = 0
    amount_sum: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    accounts: set[str] = field(default_factory=set)
    sample: list[bytes] = field(default_factory=list)


def account_id(index: int) -> str:
    return f"acct-{index:05d}"


async def produce(bootstrap: str, topic: str, events: int, accounts: int, seed: int) -> Produced:
    """Produce `events` usage events with unique ids over `accounts` random accounts."""
    rng = random.Random(seed)
    result = Produced()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=10, max_batch_size=256 * 1024, acks=1
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending: list[asyncio.Future[object]] = []
        for _ in range(events):
            subject = account_id(rng.randrange(accounts))
            amount = rng.randint(1, 100)
            event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))  # reproducible
            value = structured(usage(subject, amount, event_id=event_id, source="bench.fold"))
            pending.append(await producer.send(topic, key=subject.encode(), value=value))
            result.events += 1
            result.amount_sum += amount
            result.value_bytes += len(value)
            result.accounts.add(subject)
            if len(result.sample) < SAMPLE_SIZE:
                result.sample.append(value)
            if len(pending) >= SEND_WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    result.seconds = time.perf_counter() - started
    return result
