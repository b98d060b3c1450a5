"""Fixtures of the gateway tests (test_nginx.py, test_caddy.py); see gateways.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.settings import Settings
from tests.builders import wait_for_position
from tests.deploy.gateways import (
    ADMIN,
    SERVICE_TOKEN,
    PolicyWorld,
    Upstream,
    running_upstream,
    world,
)
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcesses


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """The stub LLM API a gateway proxies to."""
    with running_upstream() as stub:
        yield stub


@pytest.fixture
async def policy_world(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> AsyncIterator[PolicyWorld]:
    """A real `quota policy` (with SERVICE_TOKEN) that has seen `world()`, folded by a real
    ledger (HTTP -> Kafka -> PostgreSQL)."""
    events = world()
    policy = quota_processes.start("policy", "policy", service_token=SERVICE_TOKEN)
    async with running_ledger(settings) as (_, ledger):
        response = await ledger.post("/events", json=events, headers=ADMIN)
        assert response.status_code == 202, response.text
        await wait_for_position(pool, len(events))
        await quota_processes.wait_ready(policy, len(events))
        yield PolicyWorld(f"127.0.0.1:{policy.port}", len(events))
