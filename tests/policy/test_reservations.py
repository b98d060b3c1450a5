"""Reservations end to end: holds under concurrency on two policy processes, idempotency,
release, expiry at the TTL, settlement by usage, and a ledger restart in the middle."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from services.ledger.audit import verify
from services.settings import Settings
from tests.builders import (
    assert_history_clean,
    cloud_event,
    recharge,
    token_issued,
    wait_for,
    wait_for_position,
)
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcess, QuotaProcesses

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-reserve-key-00000000000000001"


def setup_events(account: str, balance: int) -> list[dict[str, Any]]:
    return [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge(account, balance),
        token_issued(account, "tok_r", KEY),
    ]  # fmt: skip


async def fund(ledger: httpx.AsyncClient, pool: asyncpg.Pool, account: str, balance: int) -> None:
    """The catalog, a funded account and its token, applied by the ledger."""
    events = setup_events(account, balance)
    await ledger.post("/events", json=events, headers=AUTH)
    await wait_for_position(pool, len(events))


def ask(cost: int, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"authorization": f"Bearer {KEY}", "model": "gpt-4o",
                            "route": "/v1/chat/completions", "estimated_cost": cost}  # fmt: skip
    if request_id is not None:
        body["request_id"] = request_id
    return body


async def head_position(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        position: int = await conn.fetchval("SELECT position FROM ledger_head")
        return position


async def start_policies(
    quota_processes: QuotaProcesses, pool: asyncpg.Pool, count: int, **overrides: Any
) -> list[QuotaProcess]:
    policies = [quota_processes.start("policy", f"policy-{i}", **overrides) for i in range(count)]
    position = await head_position(pool)
    for policy in policies:
        await quota_processes.wait_ready(policy, position)
    return policies


@pytest.mark.timeout(240)
async def test_the_hammer_holds_exactly_what_is_available_on_two_processes(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = "acct_hammer"
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, account, 1000)
        policies = await start_policies(quota_processes, pool, 2)
        limits = httpx.Limits(max_connections=100)
        clients = [httpx.AsyncClient(base_url=p.url, limits=limits, timeout=60) for p in policies]
        try:
            answers = await asyncio.gather(
                *(clients[i % 2].post("/authorize", json=ask(10)) for i in range(400))
            )
        finally:
            for client in clients:
                await client.aclose()
        allowed = [a.json() for a in answers if a.status_code == 200]
        denied = [a.json() for a in answers if a.status_code != 200]
        assert len(allowed) == 100
        assert {d["error"]["reason"] for d in denied} == {"insufficient_user_quota"}
        assert sum(a["reservation"]["amount"] for a in allowed) == 1000
        assert len({a["reservation"]["id"] for a in allowed}) == 100
        account_now = (await ledger.get(f"/accounts/{account}", headers=AUTH)).json()
        assert (account_now["balance"], account_now["held"], account_now["available"]) == (
            1000, 1000, 0
        )  # fmt: skip
        settlements = [
            cloud_event("quota.account.usage_recorded", account,
                        {"amount": 9, "reservation_id": a["reservation"]["id"]})
            for a in allowed
        ]  # fmt: skip
        before = await head_position(pool)
        await ledger.post("/events", json=settlements, headers=AUTH)
        await wait_for_position(pool, before + 200)  # each usage and its settlement
        account_after = (await ledger.get(f"/accounts/{account}", headers=AUTH)).json()
    assert (account_after["balance"], account_after["held"], account_after["available"]) == (
        100, 0, 100
    )  # fmt: skip
    async with pool.acquire() as conn:
        states = await conn.fetch("SELECT state, count(*) FROM reservations GROUP BY state")
    assert {row["state"]: row["count"] for row in states} == {"settled": 100}
    await assert_history_clean(pool)


@pytest.mark.timeout(120)
async def test_the_same_request_id_returns_the_same_reservation_on_either_process(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_idem", 100)
        policies = await start_policies(quota_processes, pool, 2)
        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(
                *(client.post(f"{policies[i % 2].url}/authorize", json=ask(30, "req-1"))
                  for i in range(6))
            )  # fmt: skip
            other = await client.post(f"{policies[0].url}/authorize", json=ask(30, "req-2"))
    ids = {a.json()["reservation"]["id"] for a in answers}
    assert [a.status_code for a in answers] == [200] * 6
    assert len(ids) == 1
    assert other.json()["reservation"]["id"] not in ids
    async with pool.acquire() as conn:
        held = await conn.fetchval("SELECT held FROM accounts WHERE account_id = 'acct_idem'")
    assert held == 60


@pytest.mark.timeout(120)
async def test_release_is_idempotent_and_an_unknown_id_is_404(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_rel", 100)
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            held = (await client.post("/authorize", json=ask(40))).json()
            reservation_id = held["reservation"]["id"]
            shown = await client.get(f"/reservations/{reservation_id}")
            first = await client.post(f"/reservations/{reservation_id}/release")
            second = await client.post(f"/reservations/{reservation_id}/release")
            unknown = await client.post("/reservations/rsv_nope/release")
            unknown_get = await client.get("/reservations/rsv_nope")
            nul = await client.post("/reservations/rsv%00nope/release")
        account = (await ledger.get("/accounts/acct_rel", headers=AUTH)).json()
    assert held["available"] == 60
    assert shown.json()["state"] == "held"
    assert (first.status_code, first.json()["state"]) == (200, "released")
    assert (second.status_code, second.json()["state"]) == (200, "released")
    assert first.json()["ended_position"] == second.json()["ended_position"]
    assert unknown.status_code == 404
    assert unknown_get.status_code == 404
    assert nul.status_code == 400 and "U+0000" in nul.json()["detail"]
    assert (account["held"], account["available"]) == (0, 100)


@pytest.mark.timeout(120)
async def test_a_hold_the_database_refuses_is_a_503_and_holds_nothing(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """The hold statement fails (here: its function is missing): 503 reservation_unavailable
    with Retry-After, nothing held, the process keeps serving; once it works again, so do
    holds."""
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_down", 100)
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            async with pool.acquire() as conn:
                await conn.execute("ALTER FUNCTION quota_hold RENAME TO quota_hold_away")
            try:
                refused = await client.post("/authorize", json=ask(40))
                check_only = await client.post(
                    "/authorize", json={**ask(40), "estimated_cost": None}
                )
            finally:
                async with pool.acquire() as conn:
                    await conn.execute("ALTER FUNCTION quota_hold_away RENAME TO quota_hold")
            held = await client.post("/authorize", json=ask(40))
        account = (await ledger.get("/accounts/acct_down", headers=AUTH)).json()
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["allowed"] is False
    assert refused.json()["error"]["reason"] == "reservation_unavailable"
    assert check_only.status_code == 200
    assert held.status_code == 200 and held.json()["reservation"]["amount"] == 40
    assert (account["held"], account["available"]) == (40, 60)


@pytest.mark.timeout(120)
async def test_a_hold_expires_at_its_ttl_and_never_earlier(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_ttl", 100)
        (policy,) = await start_policies(quota_processes, pool, 1, reservation_ttl_seconds=1.5)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            held = (await client.post("/authorize", json=ask(25))).json()
            reservation_id = held["reservation"]["id"]
            expires_at = datetime.fromisoformat(held["reservation"]["expires_at"])
            seen: list[tuple[datetime, str]] = []

            async def expired() -> bool:
                state = (await client.get(f"/reservations/{reservation_id}")).json()["state"]
                seen.append((datetime.now(UTC), state))
                return bool(state == "expired")

            await wait_for(expired, timeout=30, what="the hold to expire")
    assert all(state == "held" for at, state in seen if at < expires_at)
    async with pool.acquire() as conn:
        ended = await conn.fetchrow(
            "SELECT time, payload FROM event_store WHERE event_id = $1", f"{reservation_id}:expired"
        )
        held_now = await conn.fetchval("SELECT held FROM accounts WHERE account_id = 'acct_ttl'")
    assert ended is not None
    assert ended["time"] >= expires_at
    assert held_now == 0


@pytest.mark.timeout(120)
async def test_usage_after_release_or_expiry_is_debited_and_releases_nothing_twice(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_late", 100)
        (policy,) = await start_policies(quota_processes, pool, 1, reservation_ttl_seconds=1.0)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            released = (await client.post("/authorize", json=ask(20))).json()["reservation"]
            await client.post(f"/reservations/{released['id']}/release")
            expiring = (await client.post("/authorize", json=ask(30))).json()["reservation"]
            kept = (await client.post("/authorize", json=ask(10))).json()["reservation"]
            await client.post(f"/reservations/{kept['id']}/release")

            async def gone() -> bool:
                answer = await client.get(f"/reservations/{expiring['id']}")
                return bool(answer.json()["state"] == "expired")

            await wait_for(gone, timeout=30, what="the hold to expire")
        before = await head_position(pool)
        late = [
            cloud_event("quota.account.usage_recorded", "acct_late",
                        {"amount": 7, "reservation_id": released["id"]}),
            cloud_event("quota.account.usage_recorded", "acct_late",
                        {"amount": 11, "reservation_id": expiring["id"]}),
        ]  # fmt: skip
        await ledger.post("/events", json=late, headers=AUTH)
        await wait_for_position(pool, before + 2)
        account = (await ledger.get("/accounts/acct_late", headers=AUTH)).json()
    assert (account["balance"], account["held"]) == (100 - 7 - 11, 0)
    async with pool.acquire() as conn:
        settled = await conn.fetchval(
            "SELECT count(*) FROM event_store WHERE type = 'quota.reservation.settled'"
        )
    assert settled == 0
    assert await head_position(pool) == before + 2
    await assert_history_clean(pool)


@pytest.mark.timeout(240)
async def test_a_ledger_restart_in_the_middle_of_settlements_changes_nothing(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = f"acct_{uuid.uuid4().hex[:6]}"
    ledger = quota_processes.start("ledger", "ledger-1", batch_max_records=20)
    await quota_processes.wait_ready(ledger)
    async with httpx.AsyncClient(base_url=ledger.url, headers=AUTH) as client:
        events = setup_events(account, 10_000)
        await client.post("/events", json=events)
        await wait_for_position(pool, len(events))
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url, timeout=60) as gateway:
            answers = await asyncio.gather(
                *(gateway.post("/authorize", json=ask(10)) for _ in range(300))
            )
        ids = [a.json()["reservation"]["id"] for a in answers]
        assert len(set(ids)) == 300
        start = await head_position(pool)
        settlements = [
            cloud_event("quota.account.usage_recorded", account,
                        {"amount": 8, "reservation_id": rid}, event_id=f"use-{rid}")
            for rid in ids
        ]  # fmt: skip
        await client.post("/events", json=settlements)

    async def partway() -> bool:
        return await head_position(pool) >= start + 100

    await wait_for(partway, timeout=60, what="settlements under way")
    ledger.sigkill()
    replacement = quota_processes.start("ledger", "ledger-2")
    await quota_processes.wait_ready(replacement)
    await wait_for_position(pool, start + 600)
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT balance, held FROM accounts WHERE account_id = $1", account
        )
        states = await conn.fetch("SELECT state, count(*) FROM reservations GROUP BY state")
        report = await verify(conn)
        total = await conn.fetchval("SELECT position FROM ledger_head")
    assert (row["balance"], row["held"]) == (10_000 - 300 * 8, 0)
    assert {r["state"]: r["count"] for r in states} == {"settled": 300}
    assert total == start + 600
    assert report.ok, report.differences
