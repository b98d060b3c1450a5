"""What the ledger's write routes share: a bounded request body, and publishing events to the
topic (`POST /events` and the key routes go the same way)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from fastapi import Request

from services.contract.cloudevent import encode_structured
from services.contract.events import Event


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def publish(producer: AIOKafkaProducer, topic: str, events: list[Event]) -> None:
    """Send in structured mode, keyed by subject so an account's events stay in order."""
    futures = [
        await producer.send(
            topic,
            key=event.subject.encode(),
            value=encode_structured(event),
            headers=[("content-type", b"application/cloudevents+json")],
        )
        for event in events
    ]
    await asyncio.gather(*futures)
