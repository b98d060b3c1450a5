"""Check 14's units (CONTRACT section 9) end to end: events through Kafka and the ledger, holds
in PostgreSQL, decisions over real HTTP from `quota policy` processes counting in process or in
a shared Redis, and forward-auth's `X-RateLimit-*` headers."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from services.settings import Settings
from tests.builders import cloud_event, recharge, token_issued, wait_for_position
from tests.ledger.ledger_app import running_ledger
from tests.policy.test_reservations import AUTH
from tests.processes import QuotaProcesses, start_policies

HOUR = 3600
RATE_LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


class World:
    """Accounts of this test's own (the Redis windows outlive a test): one with a units-only
    limit, one with requests and units, one for the hammer, one without a limit."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.accounts = {name: f"acct_{name}_{tag}" for name in ("units", "both", "hammer", "free")}
        self.keys = {name: f"sk-{name}-{tag}-{'0' * 16}" for name in self.accounts}

    def events(self) -> list[dict[str, Any]]:
        events = [
            cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
            cloud_event("quota.channel.registered", "catalog",
                        {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        ]  # fmt: skip
        for name, account in self.accounts.items():
            events.append(recharge(account, 1000))
            events.append(token_issued(account, f"tok_{account}", self.keys[name]))
        limits = {
            "units": {"model": "gpt-4o", "requests": 0, "units": 100},
            "both": {"model": "*", "requests": 2, "units": 100},
            "hammer": {"model": "gpt-4o", "requests": 0, "units": 100},
        }
        for name, data in limits.items():
            events.append(
                cloud_event(
                    "quota.account.rate_limit_set",
                    self.accounts[name],
                    {**data, "window_seconds": HOUR},
                )
            )
        return events


def forward_headers(key: str, cost: int | None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Uri": "/v1/chat/completions",
        "X-Quota-Model": "gpt-4o",
    }
    if cost is not None:
        headers["X-Quota-Estimated-Cost"] = str(cost)
    return headers


async def forward(client: httpx.AsyncClient, key: str, cost: int | None) -> httpx.Response:
    return await client.get("/authorize/forward", headers=forward_headers(key, cost))


def figures(answer: httpx.Response) -> tuple[int, int, int]:
    """(X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset)."""
    limit, remaining, reset = (int(answer.headers[name]) for name in RATE_LIMIT_HEADERS)
    return limit, remaining, reset


async def held(pool: asyncpg.Pool, account: str) -> int:
    async with pool.acquire() as conn:
        amount: int = await conn.fetchval(
            "SELECT held FROM accounts WHERE account_id = $1", account
        )
        return amount


async def run_scenario(world: World, clients: list[httpx.AsyncClient], pool: asyncpg.Pool) -> None:
    """The same checks whichever limiter the policies count with; calls alternate between the
    clients (one or two policy processes)."""
    turn = iter(range(1_000))

    def client() -> httpx.AsyncClient:
        return clients[next(turn) % len(clients)]

    # A units limit of 100 with holds of 30: three are allowed, the fourth gets 429.
    key = world.keys["units"]
    answers = [await forward(client(), key, 30) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429], [a.text for a in answers]
    assert [figures(a)[:2] for a in answers] == [(100, 70), (100, 40), (100, 10), (100, 10)]
    assert [figures(a)[2] for a in answers[:3]] == [HOUR] * 3
    assert all(a.json()["reservation"]["amount"] == 30 for a in answers[:3])
    limited = answers[3]
    assert 1 <= int(limited.headers["retry-after"]) <= HOUR
    assert HOUR - 60 <= figures(limited)[2] <= HOUR
    assert limited.headers["x-quota-reason"] == "rate_limited"
    assert limited.json()["error"]["message"] == (
        "The gpt-4o model Too many requests; please try again later."
    )
    # The fourth hold was released when check 14 refused it: 90 is held, not 120.
    assert await held(pool, world.accounts["units"]) == 90
    # What is left fits exactly, on POST /authorize too (which carries the same headers).
    body = {"authorization": f"Bearer {key}", "model": "gpt-4o",
            "route": "/v1/chat/completions", "estimated_cost": 10}  # fmt: skip
    last = await client().post("/authorize", json=body)
    assert last.status_code == 200, last.text
    assert figures(last)[:2] == (100, 0)
    assert (await client().post("/authorize", json=body)).status_code == 429
    # Without an estimate a decision costs no units: a units-only limit lets it through.
    free = await forward(client(), key, None)
    assert free.status_code == 200
    assert figures(free)[:2] == (100, 0)

    # Requests and units together: the figure reported is the one closer to being used up,
    # or the one that denied.
    key = world.keys["both"]
    first = await forward(client(), key, 60)
    assert first.status_code == 200
    assert figures(first)[:2] == (100, 40)  # 40% of the units left, 50% of the requests
    too_costly = await forward(client(), key, 50)
    assert too_costly.status_code == 429
    assert figures(too_costly)[:2] == (100, 40)
    second = await forward(client(), key, 40)
    assert second.status_code == 200
    assert figures(second)[:2] == (2, 0)  # both used up: requests are reported
    third = await forward(client(), key, None)
    assert third.status_code == 429
    assert figures(third)[:2] == (2, 0)
    assert int(third.headers["retry-after"]) >= 1
    assert await held(pool, world.accounts["both"]) == 100

    # An account without a limit gets no X-RateLimit-* headers.
    plain = await forward(client(), world.keys["free"], 30)
    assert plain.status_code == 200
    assert not any(name in plain.headers for name in RATE_LIMIT_HEADERS)


@pytest.mark.timeout(180)
async def test_units_limit_counted_in_process(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    world = World()
    async with running_ledger(settings) as (_, ledger):
        events = world.events()
        response = await ledger.post("/events", json=events, headers=AUTH)
        assert response.status_code == 202, response.text
        await wait_for_position(pool, len(events))
        (policy,) = await start_policies(quota_processes, pool, 1, redis_url="")
        async with httpx.AsyncClient(base_url=policy.url, timeout=30) as client:
            await run_scenario(world, [client], pool)


@pytest.mark.timeout(240)
async def test_units_limit_shared_in_redis_by_two_policy_processes(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    world = World()
    redis_url = os.environ.get("QUOTA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    async with running_ledger(settings) as (_, ledger):
        events = world.events()
        response = await ledger.post("/events", json=events, headers=AUTH)
        assert response.status_code == 202, response.text
        await wait_for_position(pool, len(events))
        policies = await start_policies(quota_processes, pool, 2, redis_url=redis_url)
        clients = [httpx.AsyncClient(base_url=p.url, timeout=30) for p in policies]
        try:
            await run_scenario(world, clients, pool)
            # Concurrently, over both processes: the shared window lets exactly 3 holds of 30
            # through, and every refused hold is released.
            key = world.keys["hammer"]
            answers = await asyncio.gather(*(forward(clients[i % 2], key, 30) for i in range(20)))
        finally:
            for client in clients:
                await client.aclose()
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 3 and statuses.count(429) == 17, statuses
    assert sorted(figures(a)[1] for a in answers if a.status_code == 200) == [10, 40, 70]
    assert await held(pool, world.accounts["hammer"]) == 90
