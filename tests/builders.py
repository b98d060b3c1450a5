"""Builders of test events and small waiting helpers shared by the tests.

The event builders live in `services.contract.samples` (the benchmarks use them too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from services.contract.samples import (
    binary,
    budget_set,
    cloud_event,
    limits_set,
    recharge,
    structured,
    token_issued,
    usage,
)
from services.ledger.audit import verify
from services.ledger.replay import replay
from services.store import event_store

__all__ = [
    "assert_history_clean",
    "binary",
    "budget_set",
    "cloud_event",
    "head_position",
    "limits_set",
    "produce",
    "produce_raw",
    "recharge",
    "structured",
    "token_issued",
    "usage",
    "wait_for",
    "wait_for_position",
    "wait_for_rejected",
]


async def produce(
    bootstrap: str, topic: str, events: Sequence[dict[str, Any]], *, mode: str = "structured"
) -> None:
    """Produce events with aiokafka, keyed by subject."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for event in events:
            key = event["subject"].encode()
            if mode == "binary":
                headers, value = binary(event)
                await producer.send(topic, key=key, value=value, headers=headers)
            else:
                await producer.send(topic, key=key, value=structured(event))
        await producer.flush()
    finally:
        await producer.stop()


async def produce_raw(
    bootstrap: str,
    topic: str,
    values: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
) -> None:
    """Produce raw (key, value, headers) records, for poison messages."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, headers in values:
            await producer.send(topic, key=key, value=value, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def head_position(pool: asyncpg.Pool) -> int:
    """The ledger head's position: the last event stored."""
    async with pool.acquire() as conn:
        position: int = await conn.fetchval("SELECT position FROM ledger_head")
        return position


async def wait_for_position(pool: asyncpg.Pool, position: int, timeout: float = 60.0) -> None:
    """Wait until the ledger head reaches `position`."""

    async def reached() -> bool:
        async with pool.acquire() as conn:
            return (await event_store.read_head(conn)).position >= position

    await wait_for(reached, timeout=timeout, what=f"ledger position {position}")


async def wait_for_rejected(pool: asyncpg.Pool, count: int, timeout: float = 60.0) -> None:
    async def reached() -> bool:
        async with pool.acquire() as conn:
            found: int = await conn.fetchval("SELECT count(*) FROM rejected_events")
            return found >= count

    await wait_for(reached, timeout=timeout, what=f"{count} quarantined events")


async def assert_history_clean(pool: asyncpg.Pool) -> None:
    """Verify (chain, re-fold, every projection) and replay --check both find nothing wrong."""
    async with pool.acquire() as conn:
        report = await verify(conn)
        replayed = await replay(conn, check=True)
    assert report.ok, report.differences[:5]
    assert replayed.ok, (replayed.history_differences[:5], replayed.differences[:5])
