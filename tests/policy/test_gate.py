"""The policy's own refusals: stale snapshot (fail closed or open), service token, body size."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from services.policy.app import create_app
from services.settings import Settings
from tests.builders import wait_for


@asynccontextmanager
async def policy_client(settings: Settings) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        store = app.state.policy.store
        await store.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://policy") as client:
            yield store, client


NO_KEY: dict[str, Any] = {"model": "gpt-4o", "route": "/v1/chat/completions"}


async def test_decisions_fail_closed_when_the_ledger_goes_quiet(settings: Settings) -> None:
    # No ledger runs here, so no heartbeat arrives after the initial load.
    quiet = settings.model_copy(update={"max_staleness_seconds": 0.2})
    async with policy_client(quiet) as (store, client):
        await wait_for(
            lambda: _stale(store, 0.2), timeout=10, what="the snapshot to pass its bound"
        )
        answer = await client.post("/authorize", json=NO_KEY)
    assert answer.status_code == 503
    assert answer.json()["error"]["reason"] == "snapshot_stale"
    assert answer.headers["retry-after"] == "1"


async def test_fail_open_decides_from_a_stale_snapshot(settings: Settings) -> None:
    quiet = settings.model_copy(update={"max_staleness_seconds": 0.2, "fail_open": True})
    async with policy_client(quiet) as (store, client):
        await wait_for(
            lambda: _stale(store, 0.2), timeout=10, what="the snapshot to pass its bound"
        )
        answer = await client.post("/authorize", json=NO_KEY)
    assert answer.status_code == 401
    assert answer.json()["error"]["reason"] == "token_missing"


async def test_service_token_and_body_limit(settings: Settings) -> None:
    guarded = settings.model_copy(update={"service_token": "gateway-secret"})
    async with policy_client(guarded) as (_, client):
        missing = await client.post("/authorize", json=NO_KEY)
        wrong = await client.post(
            "/authorize", json=NO_KEY, headers={"X-Quota-Service-Token": "nope"}
        )
        right = await client.post(
            "/authorize", json=NO_KEY, headers={"X-Quota-Service-Token": "gateway-secret"}
        )
        huge = await client.post(
            "/authorize",
            content=b'{"model": "' + b"x" * 70_000 + b'"}',
            headers={"X-Quota-Service-Token": "gateway-secret"},
        )
        schema = (await client.get("/openapi.json")).json()
    assert missing.status_code == 401
    assert missing.json()["error"]["reason"] == "service_token_invalid"
    assert wrong.status_code == 401
    assert right.status_code == 401
    assert right.json()["error"]["reason"] == "token_missing"
    assert huge.status_code == 413
    documented = set(schema["paths"]["/authorize"]["post"]["responses"])
    assert {"200", "400", "401", "403", "413", "429", "503"} <= documented


async def _stale(store: Any, bound: float) -> bool:
    return bool(store.seconds_since_heard() > bound)
