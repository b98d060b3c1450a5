"""The ledger's HTTP API: admin auth, POST /events, account reads, health and metrics."""

from __future__ import annotations

import asyncpg
import pytest

from services.settings import Settings
from tests.builders import cloud_event, recharge, usage, wait_for_position
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/accounts/acct"), ("GET", "/audit/rejected"), ("POST", "/events")],
)
async def test_admin_routes_need_the_admin_token(
    settings: Settings, method: str, path: str
) -> None:
    async with running_ledger(settings) as (_, client):
        missing = await client.request(method, path, json=[])
        wrong = await client.request(
            method, path, json=[], headers={"Authorization": "Bearer not-the-token"}
        )
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 403


async def test_post_events_publishes_and_the_ledger_applies_them(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    events = [recharge("acct_h", 900, event_id="h-1"), usage("acct_h", 100, event_id="h-2")]
    async with running_ledger(settings) as (_, client):
        single = await client.post(
            "/events",
            json=cloud_event("quota.account.opened", "acct_h", {"role": "admin"}, event_id="h-0"),
            headers=AUTH,
        )
        batch = await client.post("/events", json=events, headers=AUTH)
        await wait_for_position(pool, 3)
        account = await client.get("/accounts/acct_h", headers=AUTH)
    assert single.status_code == 202
    assert single.json() == {"ids": ["h-0"]}
    assert batch.status_code == 202
    assert batch.json() == {"ids": ["h-1", "h-2"]}
    assert account.json()["balance"] == 800
    assert account.json()["role"] == "admin"


async def test_post_events_with_any_bad_event_publishes_nothing(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    good = recharge("acct_x", 10, event_id="x-1")
    bad = [
        good,
        recharge("acct_x", -10, event_id="x-2"),
        cloud_event("quota.unknown", "acct_x", {}, event_id="x-3"),
        {"id": "x-4"},
        "not an object",
        recharge("acct_x", 11, event_id="x-1"),
    ]
    async with running_ledger(settings) as (_, client):
        response = await client.post("/events", json=bad, headers=AUTH)
        invalid_json = await client.post(
            "/events", content=b"{oops", headers={**AUTH, "Content-Type": "application/json"}
        )
        empty = await client.post("/events", json=[], headers=AUTH)
        # A marker event proves the topic is consumed; nothing from the bad batch came first.
        marker = await client.post("/events", json=recharge("acct_m", 1), headers=AUTH)
        await wait_for_position(pool, 1)
        unknown = await client.get("/accounts/acct_x", headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_events"
    errors = response.json()["error"]["details"]
    assert [(e["index"], e["code"]) for e in errors] == [
        (1, "bad_data"),
        (2, "unknown_type"),
        (3, "not_cloudevent"),
        (4, "not_cloudevent"),
        (5, "id_conflict"),
    ]
    assert errors[0]["id"] == "x-2"
    assert invalid_json.status_code == 400
    assert invalid_json.json()["error"]["code"] == "invalid_json"
    assert empty.status_code == 400
    assert marker.status_code == 202
    assert unknown.status_code == 404
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM event_store") == 1


async def test_health_readiness_and_metrics(settings: Settings, pool: asyncpg.Pool) -> None:
    async with running_ledger(settings) as (_, client):
        await client.post("/events", json=recharge("acct_q", 5), headers=AUTH)
        await wait_for_position(pool, 1)
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "position": 1}
    assert "quota_ledger_events_applied_total" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "path",
    [
        "/accounts/a%00b",
        "/accounts/a%00b/statement",
        "/accounts/a%00b/balance",
        "/accounts/acct/statement?since=2026%00",
        "/accounts/acct/balance?as_of=1%00",
        "/audit/rejected?cursor=%00",
    ],
)
async def test_a_nul_in_a_path_or_query_is_a_clear_400(settings: Settings, path: str) -> None:
    """PostgreSQL text cannot hold U+0000, so nothing stored has one: say so, never a 500."""
    async with running_ledger(settings) as (_, client):
        answer = await client.get(path, headers=AUTH)
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert "U+0000" in answer.json()["error"]["message"]
