"""The policy's own refusals: stale snapshot (fail closed or open), service token (in process,
and on every guarded route of a real `quota policy`), body size."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest

from services.policy.app import create_app
from services.settings import Settings
from tests.builders import wait_for
from tests.ledger.ledger_app import running_ledger
from tests.policy.test_reservations import AUTH, ask, fund
from tests.processes import QuotaProcesses, start_policies


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


async def test_decisions_fail_closed_when_the_ledger_goes_quiet(db_settings: Settings) -> None:
    # No ledger runs here, so no heartbeat arrives after the initial load.
    quiet = db_settings.model_copy(update={"max_staleness_seconds": 0.2})
    async with policy_client(quiet) as (store, client):
        await wait_for(
            lambda: _stale(store, 0.2), timeout=10, what="the snapshot to pass its bound"
        )
        answer = await client.post("/authorize", json=NO_KEY)
    assert answer.status_code == 503
    assert answer.json()["error"]["reason"] == "snapshot_stale"
    assert answer.headers["retry-after"] == "1"


async def test_fail_open_decides_from_a_stale_snapshot(db_settings: Settings) -> None:
    quiet = db_settings.model_copy(update={"max_staleness_seconds": 0.2, "fail_open": True})
    async with policy_client(quiet) as (store, client):
        await wait_for(
            lambda: _stale(store, 0.2), timeout=10, what="the snapshot to pass its bound"
        )
        answer = await client.post("/authorize", json=NO_KEY)
    assert answer.status_code == 401
    assert answer.json()["error"]["reason"] == "token_missing"


async def test_service_token_and_body_limit(db_settings: Settings) -> None:
    guarded = db_settings.model_copy(update={"service_token": "gateway-secret"})
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


SERVICE_TOKEN = "gateway-secret-0123456789"


@pytest.mark.timeout(120)
async def test_a_policy_with_a_service_token_guards_every_route_but_health_and_metrics(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """A real `quota policy` with QUOTA_SERVICE_TOKEN: 401 service_token_invalid on each
    guarded route without the header or with a wrong one, the route's own answer with it."""
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_gate", 100)
        (policy,) = await start_policies(
            quota_processes, pool, 1, service_token=SERVICE_TOKEN, allow_anonymous_gateways=False
        )
        good = {"X-Quota-Service-Token": SERVICE_TOKEN}
        forward = {"Authorization": ask(1)["authorization"], "X-Quota-Model": "gpt-4o",
                   "X-Forwarded-Uri": "/v1/chat/completions"}  # fmt: skip
        async with httpx.AsyncClient(base_url=policy.url) as client:
            held = await client.post("/authorize", json=ask(10), headers=good)
            assert held.status_code == 200, held.text
            rsv = held.json()["reservation"]["id"]
            # (method, path, JSON body, the gateway's own headers)
            guarded: list[tuple[str, str, Any, dict[str, str]]] = [
                ("POST", "/authorize", ask(10), {}),
                ("GET", "/authorize/forward", None, forward),
                ("POST", "/authorize/forward", None, forward),
                ("GET", f"/reservations/{rsv}", None, {}),
                ("GET", "/reservations/rsv_unknown", None, {}),
                ("POST", "/reservations/rsv_unknown/release", None, {}),
                ("POST", f"/reservations/{rsv}/release", None, {}),
            ]
            refused = []
            for method, path, body, headers in guarded:
                for sent in ({}, {"X-Quota-Service-Token": "wrong"},
                             {"X-Quota-Service-Token": SERVICE_TOKEN[:-1]}):  # fmt: skip
                    answer = await client.request(
                        method, path, json=body, headers={**headers, **sent}
                    )
                    refused.append((method, path, answer.status_code,
                                    answer.json()["error"]["reason"]))  # fmt: skip
            allowed = {
                (method, path): (
                    await client.request(method, path, json=body, headers={**headers, **good})
                ).status_code
                for method, path, body, headers in guarded
            }
            open_routes = {path: (await client.get(path)).status_code
                           for path in ("/healthz", "/readyz", "/metrics")}  # fmt: skip
        account = (await ledger.get("/accounts/acct_gate", headers=AUTH)).json()
    assert set(refused) == {(m, p, 401, "service_token_invalid") for m, p, _, _ in guarded}
    assert len(refused) == 3 * len(guarded)
    assert allowed == {
        ("POST", "/authorize"): 200,
        ("GET", "/authorize/forward"): 200,
        ("POST", "/authorize/forward"): 200,
        ("GET", f"/reservations/{rsv}"): 200,
        ("GET", "/reservations/rsv_unknown"): 404,
        ("POST", "/reservations/rsv_unknown/release"): 404,
        ("POST", f"/reservations/{rsv}/release"): 200,
    }
    assert open_routes == {"/healthz": 200, "/readyz": 200, "/metrics": 200}
    # the refused calls held nothing: only the two holds sent with the token, one released
    assert (account["held"], account["available"]) == (10, 90)


async def _stale(store: Any, bound: float) -> bool:
    return bool(store.seconds_since_heard() > bound)
