"""Running the ledger application in-process for tests: real lifespan, real HTTP via ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.ledger.app import create_app
from services.settings import Settings


@asynccontextmanager
async def running_ledger(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The ledger app with its lifespan (pool, producer, consumer) and a client for it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.ledger.consumer.started.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
            yield app, client
