"""Fixtures shared by the ledger's tests."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from services.settings import Settings
from tests.builders import cloud_event, produce, recharge, token_issued, usage, wait_for_position
from tests.ledger.ledger_app import running_ledger

RECHARGE_ID = "evt-recharge-a"


def small_history() -> list[dict[str, Any]]:
    """A few events touching every projection table."""
    return [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event(
            "quota.channel.registered",
            "catalog",
            {"channel_id": 7, "models": ["gpt-4o"], "groups": ["default", "vip"]},
        ),
        cloud_event(
            "quota.route.policy_set", "catalog", {"route": "/v1/admin", "min_role": "admin"}
        ),
        cloud_event("quota.account.opened", "acct_a", {"role": "admin", "group": "vip"}),
        recharge("acct_a", 1000, event_id=RECHARGE_ID),
        usage("acct_a", 300),
        token_issued("acct_a", "tok_a", "sk-test-key-abcdef", allowed_models=["gpt-4o"]),
        cloud_event(
            "quota.account.rate_limit_set",
            "acct_a",
            {"model": "gpt-4o", "requests": 10, "window_seconds": 60},
        ),
        recharge("acct_b", 50),
        cloud_event("quota.account.suspended", "acct_b", {"reason": "test"}),
    ]


@pytest.fixture
async def history(settings: Settings, pool: asyncpg.Pool) -> int:
    """Fold a small history covering every projection table; return its length."""
    events = small_history()
    async with running_ledger(settings):
        await produce(settings.kafka_bootstrap, settings.topic, events)
        await wait_for_position(pool, len(events))
    return len(events)
