"""`quota dev`: the whole service on one machine, with nothing installed beforehand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn

from services import tracing
from services.contract.cloudevent import decode_http_object
from services.infra.broker import TansuBroker
from services.infra.postgres import find_or_start_postgres, with_database
from services.ledger.app import create_app
from services.ledger.wire import publish
from services.logs import configure_logging
from services.migrate import upgrade
from services.policy.app import create_app as create_policy_app
from services.settings import DEV_ADMIN_TOKEN, Settings, asyncpg_dsn
from services.store import projections

DEMO_ACCOUNT = "acct_demo"
DEMO_TOKEN_ID = "tok_demo"
# A demo credential for a local sandbox, printed so the operator can call the gateway path.
DEMO_KEY = "sk-quota-demo-0000000000000000000000000000demo01"
DEMO_MODEL = "gpt-4o-mini"


def demo_events() -> list[dict[str, Any]]:
    """Seed data with fixed ids, so a second `quota dev` on the same data changes nothing."""

    def event(event_id: str, type_: str, subject: str, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": f"demo-{event_id}",
            "source": "quota/dev",
            "type": type_,
            "subject": subject,
            "time": "2026-01-01T00:00:00Z",
            "data": data,
        }

    return [
        event("model", "quota.model.registered", "catalog", {"model": DEMO_MODEL, "kind": "chat"}),
        event(
            "channel",
            "quota.channel.registered",
            "catalog",
            {"channel_id": 1, "models": [DEMO_MODEL], "groups": ["default"]},
        ),
        event("opened", "quota.account.opened", DEMO_ACCOUNT, {"role": "user"}),
        event("recharged", "quota.account.recharged", DEMO_ACCOUNT, {"amount": 1_000_000}),
        event(
            "token",
            "quota.token.issued",
            DEMO_ACCOUNT,
            {
                "token_id": DEMO_TOKEN_ID,
                "key_sha256": hashlib.sha256(DEMO_KEY.encode()).hexdigest(),
                "key_last6": DEMO_KEY[-6:],
            },
        ),
    ]


def run_dev(host: str, ledger_port: int, policy_port: int) -> None:
    """Start PostgreSQL and a broker unless URLs are given, migrate, serve, seed, explain."""
    workdir = Path(os.environ.get("QUOTA_DEV_DIR", ".work/dev")).resolve()
    with contextlib.ExitStack() as stack:
        database_url = os.environ.get("QUOTA_DATABASE_URL")
        if not database_url:
            server = stack.enter_context(find_or_start_postgres(workdir, prefer_local=False))
            database_url = with_database(server.url, "quota")
            asyncio.run(_create_database(server.url, "quota"))
        bootstrap = os.environ.get("QUOTA_KAFKA_BOOTSTRAP")
        if not bootstrap:
            bootstrap = stack.enter_context(TansuBroker(workdir)).bootstrap
        settings = Settings(
            database_url=database_url,
            kafka_bootstrap=bootstrap,
            admin_token=os.environ.get("QUOTA_ADMIN_TOKEN") or DEV_ADMIN_TOKEN,
            dev_mode=True,
            log_json=False,
        )
        configure_logging(settings.log_level, settings.log_json)
        tracing.configure(settings, "quota-dev")  # both services, one process
        upgrade(settings.database_url)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings, host, ledger_port, policy_port))


async def _create_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _start(app: Any, host: str, port: int) -> asyncio.Task[None]:
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise SystemExit(f"could not serve on {host}:{port}")
        await asyncio.sleep(0.05)
    return task


async def _serve(settings: Settings, host: str, ledger_port: int, policy_port: int) -> None:
    app = create_app(settings)
    ledger_task = await _start(app, host, ledger_port)
    policy_task = await _start(create_policy_app(settings), host, policy_port)
    ledger = app.state.ledger
    events = [decode_http_object(item) for item in demo_events()]
    await publish(ledger.producer, settings.topic, events)
    await _wait_for_account(ledger.pool, DEMO_ACCOUNT, timeout=30)
    base = f"http://{host}:{ledger_port}"
    policy = f"http://{host}:{policy_port}"
    print(
        f"""
quota dev is running (Ctrl-C stops everything)
  database   {settings.database_url}
  kafka      {settings.kafka_bootstrap}  topic {settings.topic}
  ledger     {base}   admin token: {settings.admin_token}
  policy     {policy}

  curl -H 'Authorization: Bearer {settings.admin_token}' {base}/accounts/{DEMO_ACCOUNT}
  curl -H 'Authorization: Bearer {settings.admin_token}' -H 'Content-Type: application/json' \\
       -d '{{"specversion":"1.0","id":"my-first-recharge","source":"docs",
            "type":"quota.account.recharged","subject":"{DEMO_ACCOUNT}",
            "data":{{"amount":500}}}}' {base}/events

  curl -H 'Content-Type: application/json' \\
       -d '{{"authorization":"Bearer {DEMO_KEY}","model":"{DEMO_MODEL}",
            "route":"/v1/chat/completions","client_ip":"127.0.0.1"}}' {policy}/authorize

  demo account {DEMO_ACCOUNT}, token {DEMO_TOKEN_ID}, API key {DEMO_KEY}
""",
        flush=True,
    )
    await asyncio.gather(ledger_task, policy_task)


async def _wait_for_account(pool: asyncpg.Pool, account_id: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            async with pool.acquire() as conn:
                if await projections.get_account(conn, account_id) is not None:
                    return
            await asyncio.sleep(0.1)
