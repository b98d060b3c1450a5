"""Budgets and concurrency caps end to end (CONTRACT section 9): real ledger, real policy
processes, real PostgreSQL and broker. The hold decides balance, budgets and caps together,
atomically, on any number of replicas; the snapshot decides check-only requests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.client import NO_RETRY, AsyncQuotaClient, FailMode
from services.ledger.audit import verify
from services.ledger.replay import replay
from services.settings import Settings
from tests.builders import (
    assert_history_clean,
    budget_set,
    cloud_event,
    head_position,
    limits_set,
    recharge,
    token_issued,
    usage,
    wait_for,
    wait_for_position,
)
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcess, QuotaProcesses, start_policies

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-budget-key-000000000000000abc123"
TOKEN = "tok_b"
MODEL = "gpt-4o"


def now_text(shift: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + shift).isoformat().replace("+00:00", "Z")


def catalog(account: str, balance: int, **token: Any) -> list[dict[str, Any]]:
    return [
        cloud_event("quota.model.registered", "catalog", {"model": MODEL, "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": [MODEL], "groups": ["default"]}),
        recharge(account, balance),
        token_issued(account, TOKEN, KEY, **token),
    ]  # fmt: skip


def ask(cost: int | None = None, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"authorization": f"Bearer {KEY}", "model": MODEL,
                            "route": "/v1/chat/completions", **more}  # fmt: skip
    if cost is not None:
        body["estimated_cost"] = cost
    return body


async def publish(ledger: httpx.AsyncClient, pool: asyncpg.Pool, events: list[Any]) -> int:
    """Publish through the ledger and wait until every event is applied."""
    before = await head_position(pool)
    answer = await ledger.post("/events", json=events, headers=AUTH)
    assert answer.status_code == 202, answer.text
    await wait_for_position(pool, before + len(events))
    return before + len(events)


async def wait_policies(
    quota_processes: QuotaProcesses, policies: list[QuotaProcess], position: int
) -> None:
    for policy in policies:
        await quota_processes.wait_ready(policy, position)


async def hammer(policies: list[QuotaProcess], bodies: list[dict[str, Any]]) -> list[Any]:
    """Every body at once, spread over the policies (through services.client, one call each:
    no retry, so a hold keeps the body's request id or none): (status, JSON) of each."""
    limits = httpx.Limits(max_connections=100)
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for policy in policies:
            http = await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=60))
            clients.append(AsyncQuotaClient(policy.url, fail_mode=FailMode.CLOSED,
                                            retry=NO_RETRY, http=http))  # fmt: skip
        decisions = await asyncio.gather(
            *(clients[i % len(clients)].authorize(**b) for i, b in enumerate(bodies))
        )
    return [(decision.status, dict(decision.raw)) for decision in decisions]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scope", ["account", "token"])
async def test_a_day_budget_admits_exactly_its_amount_of_concurrent_holds_on_two_policies(
    scope: str, settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = f"acct_budget_{scope}"
    extra = {"scope": "token", "token_id": TOKEN} if scope == "token" else {}
    async with running_ledger(settings) as (_, ledger):
        day_budget = budget_set(account, "b_day", 1000, "day", **extra)
        await publish(ledger, pool, [*catalog(account, 10**9), day_budget])
        policies = await start_policies(quota_processes, pool, 2)
        answers = await hammer(policies, [ask(10) for _ in range(400)])
        allowed = [body for status, body in answers if status == 200]
        denied = [(status, body) for status, body in answers if status != 200]
        assert len(allowed) == 100
        reason = "token_budget_exceeded" if scope == "token" else "budget_exceeded"
        assert {(status, body["error"]["reason"]) for status, body in denied} == {(403, reason)}
        resets = {body["error"]["reset_at"] for _, body in denied}
        assert len(resets) == 1
        reset_at = datetime.fromisoformat(resets.pop())
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
        assert reset_at == datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
        message = denied[0][1]["error"]["message"]
        if scope == "token":
            assert message == f"Budget exceeded – key({KEY[-6:]}) has used up its day budget."
        else:
            assert message == "Budget exceeded – this account's day budget is used up."
        # Each allowed answer lists the budget that covered it, with the hold counted.
        figures = [a["budgets"] for a in allowed]
        assert all(len(f) == 1 and f[0]["budget_id"] == "b_day" for f in figures)
        assert max(f[0]["held"] for f in figures) == 1000
        assert min(f[0]["remaining"] for f in figures) == 0
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT held FROM budgets WHERE budget_id = 'b_day'")
        assert row["held"] == 1000
        # Settle every hold for 10: the spend moves from held to spent, and stays used up.
        # Settled by the reservation id alone: the spend is the hold's token's and model's.
        settled = [usage(account, 10, {"reservation_id": a["reservation"]["id"]},
                         time=now_text()) for a in allowed]  # fmt: skip
        before = await head_position(pool)
        await ledger.post("/events", json=settled, headers=AUTH)
        await wait_for_position(pool, before + 200)
        await wait_policies(quota_processes, policies, before + 200)
        async with httpx.AsyncClient(base_url=policies[0].url) as client:
            check = await client.post("/authorize", json=ask())
        assert check.status_code == 403, check.text
        assert check.json()["error"]["reason"] == reason
    await assert_history_clean(pool)


@pytest.mark.timeout(240)
async def test_usage_timed_yesterday_counts_toward_yesterday_and_a_replay_agrees(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = "acct_yesterday"
    async with running_ledger(settings) as (_, ledger):
        position = await publish(ledger, pool, [
            *catalog(account, 10**6),
            usage(account, 300, {"model": MODEL}, time=now_text()),  # before the budget exists
            budget_set(account, "b_d", 1000, "day", time=now_text()),
            usage(account, 900, {"model": MODEL}, time=now_text(-timedelta(days=1))),
            usage(account, 200, {"model": "other-model"}, time=now_text()),
            usage(account, 100, {"model": MODEL, "token_id": TOKEN}, time=now_text()),
        ])  # fmt: skip
        policies = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policies[0].url) as client:
            # Today: 300 (before the budget was set) + 200 + 100 = 600 of 1000.
            check = await client.post("/authorize", json=ask())
            assert check.status_code == 200, check.text
            (figure,) = check.json()["budgets"]
            assert (figure["spent"], figure["held"], figure["remaining"]) == (600, 0, 400)
            assert (await client.post("/authorize", json=ask(401))).status_code == 403
            held = await client.post("/authorize", json=ask(400))
            assert held.status_code == 200, held.text
            assert held.json()["budgets"][0]["remaining"] == 0
            # The same budget set again (a higher amount) keeps what was spent.
            position = await publish(ledger, pool, [budget_set(account, "b_d", 1500, "day")])
            await wait_policies(quota_processes, policies, position)
            again = await client.post("/authorize", json=ask())
            assert again.json()["budgets"][0]["spent"] == 600
            assert again.json()["budgets"][0]["held"] == 400
    async with pool.acquire() as conn:
        spend = await conn.fetch("SELECT * FROM budget_spend ORDER BY period_start")
        assert [row["spent"] for row in spend] == [900, 600]
        report = await replay(conn, check=True)
        assert report.ok, report.as_json()
        rebuilt = await replay(conn, check=False)
        assert rebuilt.ok, rebuilt.as_json()
        assert [r["spent"] for r in await conn.fetch(
            "SELECT * FROM budget_spend ORDER BY period_start")] == [900, 600]  # fmt: skip
    await assert_history_clean(pool)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("cap", ["token", "account"])
async def test_max_concurrent_2_refuses_the_third_hold_until_one_ends_on_two_replicas(
    cap: str, settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = f"acct_cap_{cap}"
    token = {"max_concurrent": 2} if cap == "token" else {}
    events = catalog(account, 10**6, **token)
    if cap == "account":
        events.append(limits_set(account, 2))
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, events)
        policies = await start_policies(quota_processes, pool, 2, reservation_ttl_seconds=3)
        answers = await hammer(policies, [ask(10) for _ in range(20)])
        allowed = [body for status, body in answers if status == 200]
        refused = [(status, body) for status, body in answers if status != 200]
        assert len(allowed) == 2
        assert {(s, b["error"]["reason"]) for s, b in refused} == {(429, "concurrency_limited")}
        assert refused[0][1]["error"]["message"] == (
            "Too many concurrent requests for this key; try again later."
        )
        clients = [httpx.AsyncClient(base_url=p.url) for p in policies]
        try:
            third = await clients[1].post("/authorize", json=ask(10))
            assert third.status_code == 429
            assert third.headers["Retry-After"] == "1"
            # A release frees a slot (on the other replica).
            first, second = (a["reservation"]["id"] for a in allowed)
            assert (await clients[0].post(f"/reservations/{first}/release")).status_code == 200
            after_release = await clients[1].post("/authorize", json=ask(10))
            assert after_release.status_code == 200, after_release.text
            assert (await clients[0].post("/authorize", json=ask(10))).status_code == 429
            # A settle frees one.
            before = await head_position(pool)
            await ledger.post("/events", headers=AUTH, json=[
                usage(account, 5, {"reservation_id": second}, time=now_text())])  # fmt: skip
            await wait_for_position(pool, before + 2)
            after_settle = await clients[0].post("/authorize", json=ask(10))
            assert after_settle.status_code == 200, after_settle.text
            assert (await clients[1].post("/authorize", json=ask(10))).status_code == 429

            # Expiry at the TTL frees both.
            async def expired() -> bool:
                async with pool.acquire() as conn:
                    held = await conn.fetchval(
                        "SELECT count(*) FROM reservations WHERE state = 'held'"
                    )
                return int(held) == 0

            await wait_for(expired, timeout=30)
            answers_after = [await clients[i % 2].post("/authorize", json=ask(10))
                             for i in range(3)]  # fmt: skip
            assert [a.status_code for a in answers_after] == [200, 200, 429]
        finally:
            for client in clients:
                await client.aclose()
    await assert_history_clean(pool)


@pytest.mark.timeout(120)
async def test_a_dry_run_holds_nothing_and_counts_nothing(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = "acct_dry"
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, [
            *catalog(account, 1000),
            budget_set(account, "b_dry", 500, "week", timezone="Europe/Berlin"),
            cloud_event("quota.account.rate_limit_set", account,
                        {"model": MODEL, "requests": 1, "window_seconds": 3600}),
        ])  # fmt: skip
        position = await head_position(pool)
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            for _ in range(5):
                dry = await client.post("/authorize", json=ask(400, dry_run=True))
                assert dry.status_code == 200, dry.text
                assert dry.json()["reservation"] is None
            too_much = await client.post("/authorize", json=ask(600, dry_run=True))
            assert too_much.json()["error"]["reason"] == "budget_exceeded"
            assert await head_position(pool) == position  # nothing was written
            # The one request the rate limit allows is still there, and the whole budget.
            real = await client.post("/authorize", json=ask(500))
            assert real.status_code == 200, real.text
            assert (await client.post("/authorize", json=ask())).status_code in (403, 429)


async def test_verify_finds_a_tampered_budget_row_and_spend(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    account = "acct_tamper"
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, [
            *catalog(account, 1000),
            budget_set(account, "b_t", 500, "month", timezone="America/New_York"),
            usage(account, 50, {"model": MODEL}, time=now_text()),
        ])  # fmt: skip
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok
        await conn.execute("UPDATE budgets SET amount = 5000 WHERE budget_id = 'b_t'")
        await conn.execute("UPDATE budget_spend SET spent = 1 WHERE budget_id = 'b_t'")
        report = await verify(conn)
    assert not report.ok
    found = {d["what"] for d in report.differences}
    assert any("budgets" in what and "amount" in what for what in found), found
    assert any("budget_spend" in what for what in found), found


@pytest.mark.timeout(120)
async def test_a_rotated_token_keeps_its_budget_spend_and_holds(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """Rotation keeps the `token_id`, so the token's budget (and its spend) carry over: a
    blocked key cannot spend again by being rerolled (LiteLLM #31079)."""
    account = "acct_rotate"
    new_key = "sk-budget-key-rotated-000000000xyz789"
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, [
            *catalog(account, 10**6),
            budget_set(account, "b_tok", 100, "day", scope="token", token_id=TOKEN),
            usage(account, 100, {"model": MODEL, "token_id": TOKEN}, time=now_text()),
        ])  # fmt: skip
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url) as client:
            blocked = await client.post("/authorize", json=ask())
            assert blocked.json()["error"]["reason"] == "token_budget_exceeded"
            rotated = cloud_event("quota.token.rotated", account, {
                "token_id": TOKEN, "key_sha256": hashlib.sha256(new_key.encode()).hexdigest(),
                "key_last6": new_key[-6:], "previous_valid_until": now_text(timedelta(hours=1)),
            })  # fmt: skip
            position = await publish(ledger, pool, [rotated])
            await quota_processes.wait_ready(policy, position)
            with_new = await client.post(
                "/authorize", json=ask() | {"authorization": f"Bearer {new_key}"}
            )
            assert with_new.status_code == 403, with_new.text
            assert with_new.json()["error"]["reason"] == "token_budget_exceeded"
            assert with_new.json()["error"]["message"].endswith(
                f"key({new_key[-6:]}) has used up its day budget."
            )
            # The old key still resolves within its grace, to the same token and budget.
            assert (await client.post("/authorize", json=ask())).status_code == 403
            raise_it = budget_set(account, "b_tok", 500, "day", scope="token", token_id=TOKEN)
            position = await publish(ledger, pool, [raise_it])
            await quota_processes.wait_ready(policy, position)
            raised = await client.post(
                "/authorize", json=ask(50) | {"authorization": f"Bearer {new_key}"}
            )
            assert raised.status_code == 200, raised.text
            assert raised.json()["budgets"][0]["spent"] == 100
            assert raised.json()["budgets"][0]["held"] == 50
    await assert_history_clean(pool)
