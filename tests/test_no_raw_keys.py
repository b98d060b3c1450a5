"""A raw API key never appears: not in responses, not in the database, not in the logs."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from services.settings import Settings
from tests.builders import cloud_event, recharge, token_issued, wait_for_position
from tests.conftest import ADMIN_TOKEN
from tests.processes import QuotaProcesses

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = ["sk-secret-raw-key-aaaaaaaaaaaa111111", "sk-secret-raw-key-bbbbbbbbbbbb222222"]
UNKNOWN = "sk-secret-raw-key-cccccccccccc333333"


async def dump_database(pool: asyncpg.Pool) -> str:
    """Every row of every table in the schema, as text: what a dump would hold."""
    async with pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        parts: list[str] = []
        for table in tables:
            name = table["tablename"].replace('"', '""')
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{name}" AS t')  # noqa: S608
            parts.extend(row["row"] for row in rows)
        # Quarantined records keep their raw bytes; read them as text as well.
        for row in await conn.fetch("SELECT raw FROM rejected_events WHERE raw IS NOT NULL"):
            parts.append(bytes(row["raw"]).decode(errors="replace"))
    return "\n".join(parts)


@pytest.mark.timeout(180)
async def test_raw_keys_appear_in_no_response_row_or_log(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    # The most talkative configuration: access logs on, the policy at DEBUG.
    ledger = quota_processes.start("ledger", "ledger", access_log=True)
    policy = quota_processes.start("policy", "policy", log_level="DEBUG", access_log=True)
    await quota_processes.wait_ready(ledger)
    events = [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge("acct_k", 100),
        token_issued("acct_k", "tok_1", KEYS[0]),
        token_issued("acct_k", "tok_2", KEYS[1], allowed_cidrs=["10.0.0.0/8"]),
    ]  # fmt: skip
    bodies = []
    async with httpx.AsyncClient(base_url=ledger.url, headers=AUTH) as client:
        bodies.append((await client.post("/events", json=events)).text)
        await wait_for_position(pool, len(events))
        await quota_processes.wait_ready(policy, len(events))
        async with httpx.AsyncClient(base_url=policy.url) as gateway:
            for key in [*KEYS, UNKNOWN, KEYS[0] + "-1", f"Bearer {KEYS[1]}"]:
                for body in (
                    {"authorization": f"Bearer {key}", "model": "gpt-4o", "client_ip": "1.2.3.4"},
                    {"authorization": key, "model": "gpt-4o", "estimated_cost": 5},
                ):
                    answer = await gateway.post("/authorize", json=body)
                    bodies.append(answer.text)
                    bodies.append(str(answer.headers))
                forward = await gateway.get(
                    "/authorize/forward",
                    headers={"Authorization": f"Bearer {key}", "X-Quota-Model": "gpt-4o"},
                )
                bodies.append(forward.text + str(forward.headers))
        bodies.append((await client.get("/accounts/acct_k", headers=AUTH)).text)
        bodies.append((await client.get("/accounts/acct_k/statement", headers=AUTH)).text)
        bodies.append((await client.get("/audit/verify", headers=AUTH)).text)
    assert any('"allowed":true' in body.replace(" ", "") for body in bodies)
    dump = await dump_database(pool)
    quota_processes.close()
    logs = ledger.log_text() + policy.log_text()
    assert "tok_1" in dump and "POST /authorize" in logs  # the dump and logs are real
    for key in [*KEYS, UNKNOWN]:
        secret = key.removeprefix("sk-")
        for where, text in (("a response", "\n".join(bodies)), ("the database", dump),
                            ("the logs", logs)):  # fmt: skip
            assert secret not in text, f"a raw key appears in {where}"
