"""Reservations end to end: holds under concurrency on two policy processes, idempotency,
release, expiry at the TTL, settlement by usage, and a ledger restart in the middle."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from services.contract.cloudevent import canonical_json, event_content
from services.contract.events import Event, ReservationHeld
from services.ledger.audit import verify
from services.policy.reservations import HOLD_TIMEOUT_SECONDS
from services.settings import Settings
from tests.builders import (
    assert_history_clean,
    cloud_event,
    head_position,
    recharge,
    token_issued,
    wait_for,
    wait_for_position,
)
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcess, QuotaProcesses, start_policies

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
async def test_a_held_events_stored_payload_is_its_canonical_content_and_valid(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """The group commit renders the held event's content itself (no model built per hold):
    the payload stored must be what `event_content` of that event renders, and its data must
    validate as `quota.reservation.held`."""
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_payload", 100)
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{policy.url}/authorize", json=ask(30, "req-payload"))
    assert answer.status_code == 200, answer.text
    reservation_id = answer.json()["reservation"]["id"]
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT type, source, subject, time, payload FROM event_store WHERE event_id = $1",
            f"{reservation_id}:held",
        )
    assert row is not None
    stored: str = row["payload"]
    content = json.loads(stored)
    event = Event(
        id=content["id"], source=row["source"], type=row["type"], subject=row["subject"],
        time=row["time"], data=ReservationHeld.model_validate(content["data"]),
        raw_data=content["data"],
    )  # fmt: skip
    assert canonical_json(event_content(event)).decode() == stored
    assert content["data"] == {
        "reservation_id": reservation_id, "amount": 30, "request_id": "req-payload",
        "expires_at": content["data"]["expires_at"], "actor": "token:tok_r",
        "token_id": "tok_r", "model": "gpt-4o",
    }  # fmt: skip
    assert datetime.fromisoformat(content["data"]["expires_at"]) > row["time"]


async def held_of(pool: asyncpg.Pool, account: str) -> int:
    async with pool.acquire() as conn:
        held: int = await conn.fetchval("SELECT held FROM accounts WHERE account_id = $1", account)
        return held


async def wait_seen(policy: QuotaProcess, position: int) -> None:
    """Until the policy's snapshot has reached `position`."""
    async with httpx.AsyncClient(base_url=policy.url) as client:

        async def seen() -> bool:
            return bool((await client.get("/readyz")).json()["position"] >= position)

        await wait_for(seen, timeout=30, what=f"{policy.name} at position {position}")


@pytest.mark.timeout(120)
async def test_a_retry_on_another_replica_gets_its_hold_though_a_second_would_not_fit(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """100 funded, 70 held by request R on policy 0: R again on policy 1, whose snapshot shows
    only 30 left, is the same hold, not 403 insufficient_user_quota."""
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_retry", 100)
        policies = await start_policies(quota_processes, pool, 2)
        async with httpx.AsyncClient() as client:
            first = await client.post(f"{policies[0].url}/authorize", json=ask(70, "req-R"))
            assert first.status_code == 200, first.text
            await wait_seen(policies[1], first.json()["position"])  # it sees 30 available
            retried = await client.post(f"{policies[1].url}/authorize", json=ask(70, "req-R"))
            again = await client.post(f"{policies[0].url}/authorize", json=ask(70, "req-R"))
            fresh = await client.post(f"{policies[1].url}/authorize", json=ask(70, "req-S"))
    assert retried.status_code == 200, retried.text
    assert again.status_code == 200, again.text
    hold = first.json()["reservation"]
    assert hold["state"] == "held" and hold["amount"] == 70
    assert retried.json()["reservation"] == hold == again.json()["reservation"]
    assert (retried.json()["balance"], retried.json()["available"]) == (100, 30)
    assert fresh.status_code == 403  # a new request id still gets check 13, from the hold
    assert fresh.json()["error"]["reason"] == "insufficient_user_quota"
    assert await held_of(pool, "acct_retry") == 70
    await assert_history_clean(pool)


@pytest.mark.timeout(120)
async def test_a_retry_of_a_released_hold_within_its_ttl_holds_nothing_again(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_again", 100)
        policies = await start_policies(quota_processes, pool, 2)
        async with httpx.AsyncClient() as client:
            first = await client.post(f"{policies[0].url}/authorize", json=ask(40, "req-R"))
            reservation_id = first.json()["reservation"]["id"]
            released = await client.post(f"{policies[0].url}/reservations/{reservation_id}/release")
            retries = [
                await client.post(f"{policy.url}/authorize", json=ask(40, "req-R"))
                for policy in (policies[1], policies[0])
            ]
            shown = await client.get(f"{policies[1].url}/reservations/{reservation_id}")
    assert released.status_code == 200 and released.json()["state"] == "released"
    for retry in retries:
        assert retry.status_code == 200, retry.text
        assert retry.json()["reservation"]["id"] == reservation_id
        assert retry.json()["reservation"]["state"] == "released"
        assert retry.json()["reservation"]["amount"] == 40
    assert shown.json()["state"] == "released"
    assert await held_of(pool, "acct_again") == 0
    async with pool.acquire() as conn:
        holds = await conn.fetchval("SELECT count(*) FROM reservations")
    assert holds == 1
    await assert_history_clean(pool)


@pytest.mark.timeout(240)
async def test_a_replica_killed_in_the_hammer_overdraws_nothing_and_its_holds_expire(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """400 holds of 10 on 2000, over two processes, half of them with request ids; policy 1
    is SIGKILLed part way, once it has held some. Never more held than the balance; every hold
    the dead replica wrote is expired by the survivor's sweeper at its TTL, not before; the
    history verifies."""
    account = "acct_killed"
    ttl = 5.0
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, account, 2000)
        policies = await start_policies(quota_processes, pool, 2, reservation_ttl_seconds=ttl)
        limits = httpx.Limits(max_connections=100)
        clients = [httpx.AsyncClient(base_url=p.url, limits=limits, timeout=60) for p in policies]
        held_by_1 = 0
        samples: list[tuple[int, int, int]] = []
        hammering = True

        async def call(i: int) -> httpx.Response:
            nonlocal held_by_1
            body = ask(10, f"kill-{i}" if i % 4 < 2 else None)
            answer = await clients[i % 2].post("/authorize", json=body)
            held_by_1 += i % 2 == 1 and answer.status_code == 200
            return answer

        async def kill_part_way() -> None:
            async def policy_1_has_held() -> bool:
                return held_by_1 >= 10

            await wait_for(policy_1_has_held, timeout=60, what="policy 1 to hold 10")
            policies[1].sigkill()

        async def watch() -> None:
            """Balance, held, and the sum of the held reservations, read in one snapshot."""
            async with pool.acquire() as conn:
                while hammering:
                    samples.append(tuple(await conn.fetchrow(
                        "SELECT a.balance, a.held, (SELECT coalesce(sum(r.amount), 0)"
                        " FROM reservations r WHERE r.account_id = a.account_id"
                        " AND r.state = 'held') FROM accounts a WHERE a.account_id = $1",
                        account,
                    )))  # fmt: skip
                    await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            answers, _ = await asyncio.gather(
                asyncio.gather(*(call(i) for i in range(400)), return_exceptions=True),
                kill_part_way(),
            )
        finally:
            hammering = False
            await watcher
            for client in clients:
                await client.aclose()
        survived = [a for a in answers[::2] if isinstance(a, httpx.Response)]
        assert len(survived) == 200, "policy 0 must answer every call"
        # (a 503 reservation_unavailable is a hold that outwaited its commit on a busy host)
        assert {a.status_code for a in survived} <= {200, 403, 503}
        survivor_ids = {a.json()["reservation"]["id"] for a in survived if a.status_code == 200}
        lost = [a for a in answers[1::2] if isinstance(a, Exception)]
        assert lost, "policy 1 was killed after it had answered everything"
        async with pool.acquire() as conn:
            dead_ids = {
                row["reservation_id"]
                for row in await conn.fetch("SELECT reservation_id FROM reservations")
            } - survivor_ids
        assert dead_ids, "policy 1 held nothing before it was killed"

        async def all_ended() -> bool:
            async with pool.acquire() as conn:
                held: int = await conn.fetchval(
                    "SELECT count(*) FROM reservations WHERE state = 'held'"
                )
            return held == 0

        await wait_for(all_ended, timeout=60, what="every hold to expire")
    assert samples and all(held <= balance and held == in_holds
                           for balance, held, in_holds in samples), samples  # fmt: skip
    async with pool.acquire() as conn:
        ended = await conn.fetch(
            "SELECT r.reservation_id, r.state, r.ended_by, r.expires_at, e.time"
            " FROM reservations r JOIN event_store e ON e.event_id = r.reservation_id || ':expired'"
            " WHERE r.reservation_id = ANY($1::text[])",
            sorted(dead_ids),
        )
        row = await conn.fetchrow(
            "SELECT balance, held FROM accounts WHERE account_id = $1", account
        )
    assert len(ended) == len(dead_ids)
    assert all(r["state"] == "expired" and r["ended_by"] == "policy:ttl" for r in ended)
    assert all(r["time"] >= r["expires_at"] for r in ended)
    assert (row["balance"], row["held"]) == (2000, 0)
    await assert_history_clean(pool)


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
    assert nul.status_code == 400 and "U+0000" in nul.json()["error"]["message"]
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
async def test_a_hold_the_database_hangs_on_is_a_503_within_its_timeout_and_found_after(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """The hold statement hangs (another transaction keeps the head lock): the gateway is
    answered 503 reservation_unavailable after HOLD_TIMEOUT_SECONDS, not left waiting; the hold
    commits once the lock is free, and the retry with its request id gets that reservation,
    held once."""
    async with running_ledger(settings) as (_, ledger):
        await fund(ledger, pool, "acct_hang", 100)
        (policy,) = await start_policies(quota_processes, pool, 1)
        async with httpx.AsyncClient(base_url=policy.url, timeout=30) as client:
            async with pool.acquire() as conn:
                locked = conn.transaction()
                await locked.start()
                await conn.execute("SELECT position FROM ledger_head WHERE id = 1 FOR UPDATE")
                try:
                    started = time.monotonic()
                    hung = await client.post("/authorize", json=ask(40, "req-hang"))
                    waited = time.monotonic() - started
                    check_only = await client.post(
                        "/authorize", json={**ask(40), "estimated_cost": None}
                    )
                finally:
                    await locked.rollback()
            retried = await client.post("/authorize", json=ask(40, "req-hang"))
        account = (await ledger.get("/accounts/acct_hang", headers=AUTH)).json()
    assert hung.status_code == 503, hung.text
    assert hung.json()["error"]["reason"] == "reservation_unavailable"
    assert HOLD_TIMEOUT_SECONDS <= waited < HOLD_TIMEOUT_SECONDS + 3
    assert check_only.status_code == 200
    assert retried.status_code == 200, retried.text
    assert retried.json()["reservation"]["amount"] == 40
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
