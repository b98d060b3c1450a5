"""Faults caused for real, not mocked (CONTRACT section 7): PostgreSQL refusing connections,
the broker stopped with SIGSTOP, a ledger whose own connections are refused, and processes
started before their dependencies. Real `quota ledger` / `quota policy` processes throughout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from services.infra.broker import TansuBroker, free_port
from services.infra.postgres import connections_refused
from services.infra.topics import ensure_topic
from services.settings import Settings
from tests.builders import (
    assert_history_clean,
    cloud_event,
    produce,
    recharge,
    token_issued,
    usage,
    wait_for,
    wait_for_position,
)
from tests.conftest import ADMIN_TOKEN, PARTITIONS
from tests.processes import QuotaProcess, QuotaProcesses

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-faults-key-000000000000000001"
ACCOUNT = "acct_faults"


def world(balance: int) -> list[dict[str, Any]]:
    return [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge(ACCOUNT, balance),
        token_issued(ACCOUNT, "tok_faults", KEY),
    ]  # fmt: skip


def ask(cost: int | None = None, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"authorization": f"Bearer {KEY}", "model": "gpt-4o",
                            "route": "/v1/chat/completions"}  # fmt: skip
    if cost is not None:
        body["estimated_cost"] = cost
    if request_id is not None:
        body["request_id"] = request_id
    return body


def as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def start_fleet(
    quota_processes: QuotaProcesses, pool: asyncpg.Pool, policies: int, **overrides: Any
) -> tuple[QuotaProcess, list[QuotaProcess]]:
    """A ledger process with the world applied, then `policies` policy processes ready."""
    ledger = quota_processes.start("ledger", "ledger", heartbeat_seconds=0.5)
    await quota_processes.wait_ready(ledger)
    async with httpx.AsyncClient(base_url=ledger.url) as client:
        events = world(1_000_000)
        answer = await client.post("/events", json=events, headers=AUTH)
        assert answer.status_code == 202, answer.text
    await wait_for_position(pool, len(events))
    started = [quota_processes.start("policy", f"policy-{i}", **overrides) for i in range(policies)]
    for policy in started:
        await quota_processes.wait_ready(policy, len(events))
    return ledger, started


async def status_of(url: str, path: str = "/readyz") -> int:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=3) as client:
            return (await client.get(path)).status_code
    except httpx.TransportError:
        return 0


async def applied_usages(pool: asyncpg.Pool) -> tuple[int, int]:
    """(rows, distinct ids) of usage events in the store."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM event_store "
            "WHERE type = 'quota.account.usage_recorded'"
        )
    assert row is not None
    return row["n"], row["ids"]


async def expect_suspension_seen(policies: list[QuotaProcess], bootstrap: str, topic: str) -> None:
    await produce(bootstrap, topic, [cloud_event("quota.account.suspended", ACCOUNT, {})])

    async def suspended_everywhere() -> bool:
        async with httpx.AsyncClient(timeout=3) as client:
            answers = [await client.post(f"{p.url}/authorize", json=ask()) for p in policies]
        return all(
            a.status_code == 403 and a.json()["error"]["reason"] == "account_suspended"
            for a in answers
        )

    await wait_for(suspended_everywhere, timeout=30, what="both policies to see the suspension")


@pytest.mark.timeout(240)
async def test_a_database_outage_while_events_flow_loses_and_doubles_nothing(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    ledger, policies = await start_fleet(
        quota_processes, pool, 2, max_staleness_seconds=60, reservation_ttl_seconds=3
    )
    usages = [usage(ACCOUNT, 1) for _ in range(3000)]
    async with httpx.AsyncClient(base_url=policies[1].url, timeout=10) as client:
        # One hold to expire during the outage, one to release during it.
        expiring = (await client.post("/authorize", json=ask(5, "req-expiring"))).json()
        releasing = (await client.post("/authorize", json=ask(5, "req-releasing"))).json()
    expiring_id = expiring["reservation"]["id"]
    releasing_id = releasing["reservation"]["id"]

    async def produce_slowly() -> None:
        for start in range(0, len(usages), 150):  # 20 slices over about 6 s
            await produce(settings.kafka_bootstrap, settings.topic, usages[start : start + 150])
            await asyncio.sleep(0.3)

    producing = asyncio.create_task(produce_slowly())
    await asyncio.sleep(1.0)
    async with connections_refused(settings.database_url):
        outage_started = time.monotonic()
        await wait_for(
            lambda: _equals(status_of(ledger.url), 503),
            timeout=10,
            what="the ledger's /readyz to say 503 during the outage",
        )
        async with httpx.AsyncClient(base_url=ledger.url, timeout=3) as client:
            ready = await client.get("/readyz")
        assert ready.json()["ready"] is False and ready.json()["reason"], ready.text
        async with httpx.AsyncClient(base_url=policies[0].url, timeout=10) as client:
            check = await client.post("/authorize", json=ask())
            hold = await client.post("/authorize", json=ask(10, "req-outage"))
        assert check.status_code == 200, check.text
        assert hold.status_code == 503, hold.text
        assert hold.json()["error"]["reason"] == "reservation_unavailable"
        assert int(hold.headers["retry-after"]) >= 1
        async with httpx.AsyncClient(base_url=policies[1].url, timeout=10) as client:
            release = await client.post(f"/reservations/{releasing_id}/release")
        assert release.status_code == 503, release.text
        assert int(release.headers["retry-after"]) >= 1
        await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - outage_started)))
    await producing
    async with httpx.AsyncClient(base_url=policies[1].url, timeout=10) as client:
        # Release and expiry resume by themselves once the database is back.
        release = await client.post(f"/reservations/{releasing_id}/release")
        assert release.status_code == 200, release.text

        async def expired() -> bool:
            answer = await client.get(f"/reservations/{expiring_id}")
            return answer.status_code == 200 and answer.json()["state"] == "expired"

        await wait_for(expired, timeout=30, what="the hold to expire after the outage")
    await wait_for(
        lambda: _equals(applied_usages(pool), (3000, 3000)),
        timeout=90,
        what="all 3000 usage events applied",
    )
    await wait_for(lambda: _equals(status_of(ledger.url), 200), timeout=30, what="ledger ready")
    quota_processes.check_alive()  # nothing was restarted
    await asyncio.sleep(1.0)
    assert await applied_usages(pool) == (3000, 3000)  # and nothing more came
    async with pool.acquire() as conn:
        balance = await conn.fetchval("SELECT balance FROM accounts WHERE account_id = $1", ACCOUNT)
    assert balance == 1_000_000 - 3000
    async with pool.acquire() as conn:
        held = await conn.fetchval("SELECT held FROM accounts WHERE account_id = $1", ACCOUNT)
    assert held == 0
    async with httpx.AsyncClient(base_url=ledger.url, timeout=60) as client:
        verify = await client.get("/audit/verify", headers=AUTH)
        metrics = (await client.get("/metrics")).text
    assert verify.json()["ok"] is True, verify.text
    assert 'quota_loop_failures_total{loop="consumer"' in metrics
    assert "quota_ledger_consumer_lag" in metrics
    assert "quota_ledger_seconds_since_last_commit" in metrics
    await expect_suspension_seen(policies, settings.kafka_bootstrap, settings.topic)
    await assert_history_clean(pool)


@pytest.mark.timeout(180)
async def test_a_ledger_whose_connections_are_refused_looks_stale_then_recovers(
    settings: Settings,
    pool: asyncpg.Pool,
    quota_processes: QuotaProcesses,
    postgres_server_url: str,
) -> None:
    role = f"quota_ledger_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_server_url)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    try:
        quota_processes.settings = settings.model_copy(
            update={"database_url": as_user(settings.database_url, role)}
        )
        ledger = quota_processes.start("ledger", "ledger", heartbeat_seconds=0.3)
        await quota_processes.wait_ready(ledger)
        async with httpx.AsyncClient(base_url=ledger.url) as client:
            await client.post("/events", json=world(1000), headers=AUTH)
        await wait_for_position(pool, 4)
        quota_processes.settings = settings
        bound = 2.0
        policy = quota_processes.start("policy", "policy", max_staleness_seconds=bound)
        await quota_processes.wait_ready(policy, 4)
        async with httpx.AsyncClient(base_url=policy.url, timeout=5) as client:
            assert (await client.post("/authorize", json=ask())).status_code == 200
            async with connections_refused(settings.database_url, role=role):
                stalled = time.monotonic()
                # Events keep coming: the ledger cannot fold them.
                await produce(settings.kafka_bootstrap, settings.topic, [usage(ACCOUNT, 7)])

                async def stale() -> bool:
                    answer = await client.post("/authorize", json=ask())
                    return answer.status_code == 503 and (
                        answer.json()["error"]["reason"] == "snapshot_stale"
                    )

                await wait_for(stale, timeout=bound + 3, what="the policy to fail closed")
                assert time.monotonic() - stalled <= bound + 3
                assert (await client.get("/readyz")).status_code == 503
                await asyncio.sleep(2.0)  # stay stalled for a while: it must not look fresh
                assert (await client.post("/authorize", json=ask())).status_code == 503
            await wait_for(
                lambda: _status_is(client.post("/authorize", json=ask()), 200),
                timeout=30,
                what="the policy to recover after the ledger's outage",
            )
        await wait_for_position(pool, 5)  # the usage produced during the stall is applied
        quota_processes.check_alive()
        await assert_history_clean(pool)
    finally:
        quota_processes.close()
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@pytest.mark.timeout(180)
async def test_a_broker_stopped_past_the_session_timeout_loses_and_doubles_nothing(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses, tmp_path: Path
) -> None:
    with TansuBroker(tmp_path, log_name="tansu-paused.log") as broker:
        await ensure_topic(broker.bootstrap, settings.topic, PARTITIONS)
        quota_processes.settings = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
        ledger, _ = await start_fleet(quota_processes, pool, 0)
        first = [usage(ACCOUNT, 1) for _ in range(500)]
        second = [usage(ACCOUNT, 1) for _ in range(500)]
        await produce(broker.bootstrap, settings.topic, first)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            # Longer than the consumer's session timeout (3 s in the tests' settings).
            await asyncio.sleep(settings.kafka_session_timeout_ms / 1000 * 2.5)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await produce(broker.bootstrap, settings.topic, second)
        await wait_for(
            lambda: _equals(applied_usages(pool), (1000, 1000)),
            timeout=90,
            what="all 1000 usage events applied after the pause",
        )
        await wait_for(lambda: _equals(status_of(ledger.url), 200), timeout=30, what="ready")
        quota_processes.check_alive()
        await asyncio.sleep(1.0)
        assert await applied_usages(pool) == (1000, 1000)
        await assert_history_clean(pool)
        quota_processes.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["ledger", "policy"])
async def test_a_process_waits_for_postgres_then_exits_non_zero(
    command: str, db_settings: Settings, quota_processes: QuotaProcesses
) -> None:
    nothing = f"postgresql://postgres@127.0.0.1:{free_port()}/quota"
    process = quota_processes.start(
        command,
        command,
        database_url=nothing,
        startup_timeout_seconds=2,
        service_token="gateway-secret",
    )
    started = time.monotonic()
    code = await asyncio.to_thread(process.process.wait, 30)
    process.killed = True
    assert code != 0
    assert time.monotonic() - started < 25
    log = process.log_text()
    assert "waiting for a dependency" in log and "PostgreSQL at 127.0.0.1" in log
    assert "QUOTA_STARTUP_TIMEOUT_SECONDS" in log or "did not come up" in log


@pytest.mark.timeout(60)
async def test_a_ledger_waits_for_the_broker_then_exits_non_zero(
    db_settings: Settings, quota_processes: QuotaProcesses
) -> None:
    process = quota_processes.start(
        "ledger",
        "ledger",
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        startup_timeout_seconds=2,
    )
    code = await asyncio.to_thread(process.process.wait, 30)
    process.killed = True
    assert code != 0
    log = process.log_text()
    assert "waiting for a dependency" in log and "Kafka at 127.0.0.1" in log


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _status_is(response: Any, status: int) -> bool:
    try:
        return bool((await response).status_code == status)
    except httpx.TransportError:
        return False
