"""Builders of test events and small waiting helpers shared by the tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from services.ledger import repository as repo
from services.ledger.audit import verify
from services.ledger.replay import replay


def cloud_event(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
    time: str | None = "2026-11-24T12:00:00Z",
    source: str = "tests",
) -> dict[str, Any]:
    """A structured-mode CloudEvent as a JSON object."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": type_,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }
    if time is not None:
        event["time"] = time
    return event


def recharge(account: str, amount: int, **kwargs: Any) -> dict[str, Any]:
    return cloud_event("quota.account.recharged", account, {"amount": amount}, **kwargs)


def usage(account: str, amount: int, **kwargs: Any) -> dict[str, Any]:
    return cloud_event("quota.account.usage_recorded", account, {"amount": amount}, **kwargs)


def token_issued(account: str, token_id: str, key: str, **data: Any) -> dict[str, Any]:
    payload = {
        "token_id": token_id,
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "key_last6": key[-6:],
        **data,
    }
    return cloud_event("quota.token.issued", account, payload)


def structured(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def binary(event: dict[str, Any]) -> tuple[list[tuple[str, bytes]], bytes]:
    """CloudEvents Kafka binary mode: attributes in `ce_` headers, data as the value."""
    headers = [
        (f"ce_{name}", str(value).encode())
        for name, value in event.items()
        if name not in ("data", "datacontenttype")
    ]
    headers.append(("content-type", event.get("datacontenttype", "application/json").encode()))
    return headers, json.dumps(event["data"]).encode()


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


async def wait_for_position(pool: asyncpg.Pool, position: int, timeout: float = 60.0) -> None:
    """Wait until the ledger head reaches `position`."""

    async def reached() -> bool:
        async with pool.acquire() as conn:
            return (await repo.read_head(conn)).position >= position

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
