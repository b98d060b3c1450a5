"""End to end: events through Kafka and the ledger, decisions from two policy processes over
real HTTP."""

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
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcesses

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = {
    "user": "sk-user-key-000000000000000001",
    "admin": "sk-admin-key-00000000000000002",
    "susp": "sk-susp-key-000000000000000003",
    "poor": "sk-poor-key-000000000000000004",
    "ip": "sk-ip-key-00000000000000000005",
    "models": "sk-models-key-0000000000000006",
    "rl": "sk-rl-key-00000000000000000007",
}


def catalog(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return cloud_event(type_, "catalog", data)


def world() -> list[dict[str, Any]]:
    events = [
        catalog("quota.model.registered", {"model": "gpt-4o", "kind": "chat"}),
        catalog("quota.model.registered", {"model": "dall-e-3", "kind": "image", "limits": {
            "max_prompt_chars": 10, "sizes": ["1024x1024"], "n_min": 1, "n_max": 2}}),
        catalog("quota.model.registered", {"model": "tts-1", "kind": "audio",
                                           "limits": {"max_input_chars": 5}}),
        catalog("quota.model.registered", {"model": "busy", "kind": "chat"}),
        catalog("quota.model.registered", {"model": "ghost", "kind": "chat"}),
        catalog("quota.channel.registered", {"channel_id": 1, "models": [
            "gpt-4o", "dall-e-3", "tts-1"], "groups": ["default"]}),
        catalog("quota.channel.registered", {"channel_id": 2, "models": ["gpt-4o"],
                                             "groups": ["default"]}),
        catalog("quota.channel.disabled", {"channel_id": 2}),
        catalog("quota.channel.registered", {"channel_id": 3, "models": ["busy"],
                                             "groups": ["default"]}),
        catalog("quota.channel.provider_rate_limited", {"channel_id": 3,
                                                        "until": "2099-01-01T00:00:00Z"}),
        catalog("quota.route.policy_set", {"route": "/v1/admin/*", "min_role": "admin"}),
        cloud_event("quota.account.opened", "acct_admin", {"role": "admin"}),
        cloud_event("quota.account.suspended", "acct_susp", {"reason": "fraud"}),
        cloud_event("quota.account.rate_limit_set", "acct_rl", {
            "model": "gpt-4o", "requests": 2, "window_seconds": 3600}),
    ]  # fmt: skip
    for name in ("user", "admin", "ip", "models", "rl"):
        events.append(recharge(f"acct_{name}", 1000))
    for name, key in KEYS.items():
        extra: dict[str, Any] = {}
        if name == "ip":
            extra["allowed_cidrs"] = ["10.0.0.0/8", "2001:db8::/32"]
        if name == "models":
            extra["allowed_models"] = ["gpt-4o"]
        events.append(token_issued(f"acct_{name}", f"tok_{name}", key, **extra))
    return events


def ask(key: str | None, model: str = "gpt-4o", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"route": "/v1/chat/completions", "model": model,
                            "client_ip": "203.0.113.7", **fields}  # fmt: skip
    if key is not None:
        body["authorization"] = f"Bearer {key}"
    return body


CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("allowed", ask(KEYS["user"]), 200, None),
    ("no key", ask(None), 401, "token_missing"),
    ("unknown key", ask("sk-nobody"), 401, "token_invalid"),
    ("ip outside", ask(KEYS["ip"]), 403, "ip_not_allowed"),
    ("ipv6 inside", ask(KEYS["ip"], client_ip="2001:db8::7"), 200, None),
    ("suspended, no balance", ask(KEYS["susp"]), 403, "account_suspended"),
    ("route needs admin", ask(KEYS["user"], route="/v1/admin/users"), 403,
     "insufficient_permissions"),
    ("unknown model on a token with models", ask(KEYS["models"], model="nope"), 403,
     "model_not_allowed"),
    ("user pins", ask(KEYS["user"] + "-1"), 403, "channel_pin_forbidden"),
    ("admin pins garbage", ask(KEYS["admin"], channel_id="abc"), 400, "invalid_channel_id"),
    ("admin pins disabled", ask(KEYS["admin"] + "-2"), 403, "channel_disabled"),
    ("admin pins enabled", ask(KEYS["admin"] + "-1"), 200, None),
    ("model without channel", ask(KEYS["user"], model="ghost"), 503, "model_unavailable"),
    ("image without prompt", ask(KEYS["user"], model="dall-e-3"), 400, "prompt_missing"),
    ("image bad size", ask(KEYS["user"], model="dall-e-3",
                           request={"prompt": "cat", "size": "1x1"}), 400, "size_not_supported"),
    ("audio too long", ask(KEYS["user"], model="tts-1", request={"input": "123456"}), 400,
     "text_too_long"),
    ("provider limited", ask(KEYS["user"], model="busy"), 503, "provider_rate_limited"),
    ("no balance", ask(KEYS["poor"]), 403, "insufficient_user_quota"),
]  # fmt: skip


@pytest.mark.timeout(180)
async def test_decisions_end_to_end_on_two_policy_processes(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    events = world()
    policies = [quota_processes.start("policy", f"policy-{i}") for i in range(2)]
    async with running_ledger(settings) as (_, ledger):
        response = await ledger.post("/events", json=events, headers=AUTH)
        assert response.status_code == 202, response.text
        await wait_for_position(pool, len(events))
        for policy in policies:
            await quota_processes.wait_ready(policy, len(events))
        clients = [httpx.AsyncClient(base_url=p.url) for p in policies]
        try:
            for index, (name, body, status, reason) in enumerate(CASES):
                answer = await clients[index % 2].post("/authorize", json=body)
                assert answer.status_code == status, (name, answer.text)
                payload = answer.json()
                assert payload["position"] >= len(events), name
                if reason is None:
                    assert payload["allowed"] is True, name
                else:
                    assert payload["error"]["reason"] == reason, (name, payload)
            # The limit is 2 per window, shared across both processes' in-process counters
            # only when Redis is configured; each process counts its own here.
            first = await clients[0].post("/authorize", json=ask(KEYS["rl"]))
            second = await clients[0].post("/authorize", json=ask(KEYS["rl"]))
            third = await clients[0].post("/authorize", json=ask(KEYS["rl"]))
            assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
            assert third.json()["error"]["message"] == (
                "The gpt-4o model Too many requests; please try again later."
            )
            assert int(third.headers["retry-after"]) >= 1
            malformed = await clients[1].post("/authorize", content=b"{not json")
            assert malformed.status_code == 400
            assert malformed.json()["error"]["reason"] == "invalid_request"
            wrong_type = await clients[1].post("/authorize", json={"estimated_cost": "ten"})
            assert wrong_type.status_code == 400
        finally:
            for client in clients:
                await client.aclose()


@pytest.mark.timeout(120)
async def test_a_suspension_reaches_the_next_decision_after_the_ledger_commits_it(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    key = "sk-fresh-key-0000000000000001"
    setup = [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge("acct_f", 100),
        token_issued("acct_f", "tok_f", key),
    ]  # fmt: skip
    policy = quota_processes.start("policy", "policy")
    async with running_ledger(settings) as (_, ledger):
        await ledger.post("/events", json=setup, headers=AUTH)
        await wait_for_position(pool, len(setup))
        await quota_processes.wait_ready(policy, len(setup))
        async with httpx.AsyncClient(base_url=policy.url) as client:
            before = await client.post("/authorize", json=ask(key))
            assert before.status_code == 200
            suspend = cloud_event("quota.account.suspended", "acct_f", {})
            await ledger.post("/events", json=suspend, headers=AUTH)
            await wait_for_position(pool, len(setup) + 1)
            await quota_processes.wait_ready(policy, len(setup) + 1)
            after = await client.post("/authorize", json=ask(key))
    assert after.status_code == 403
    assert after.json()["error"]["reason"] == "account_suspended"
    assert after.json()["position"] == len(setup) + 1


@pytest.mark.timeout(120)
async def test_a_redis_limit_is_shared_by_two_policy_processes(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    account = f"acct_{uuid.uuid4().hex[:8]}"
    key = f"sk-shared-{uuid.uuid4().hex}"
    limit = 5
    setup = [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge(account, 100),
        token_issued(account, f"tok_{account}", key),
        cloud_event("quota.account.rate_limit_set", account,
                    {"model": "*", "requests": limit, "window_seconds": 3600}),
    ]  # fmt: skip
    redis_url = os.environ.get("QUOTA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    policies = [
        quota_processes.start("policy", f"policy-{i}", redis_url=redis_url) for i in range(2)
    ]
    async with running_ledger(settings) as (_, ledger):
        await ledger.post("/events", json=setup, headers=AUTH)
        await wait_for_position(pool, len(setup))
        for policy in policies:
            await quota_processes.wait_ready(policy, len(setup))
        clients = [httpx.AsyncClient(base_url=p.url) for p in policies]
        try:
            answers = await asyncio.gather(
                *(clients[i % 2].post("/authorize", json=ask(key)) for i in range(4 * limit))
            )
        finally:
            for client in clients:
                await client.aclose()
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == limit
    assert statuses.count(429) == 3 * limit
