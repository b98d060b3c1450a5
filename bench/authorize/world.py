"""The world the benchmark decides in: a catalog, filler accounts, and the scenario's keys.

Every account is opened by events through Kafka and the real ledger, so the policy's snapshot
is built exactly as in production. The filler accounts (each with a recharge and a token) give
the snapshot a realistic size: lookups hit big dicts, and every snapshot publish (on each
change and each ledger heartbeat) rebuilds indexes over all of them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Final

from tests.builders import cloud_event, recharge, token_issued

MODEL: Final = "gpt-4o"
ROUTE: Final = "/v1/chat/completions"
CLIENT_IP: Final = "203.0.113.7"

ALLOWED_ACCOUNT: Final = "acct_bench_allowed"
ALLOWED_KEY: Final = "sk-bench-allowed-000000000000000000000001"
POOR_ACCOUNT: Final = "acct_bench_poor"
POOR_KEY: Final = "sk-bench-poor-0000000000000000000000000002"
FRESH_ACCOUNT: Final = "acct_bench_fresh"

#: The allowed account's balance: large enough that nothing the bench does can exhaust it.
ALLOWED_BALANCE: Final = 10**15
FILLER_BALANCE: Final = 1_000

#: The reservation scenario's accounts: wrk picks one of them round-robin per request, so a
#: group commit has several accounts to hold on. The warm-up runs on accounts of its own, so
#: the held reservations of the measured accounts are exactly the measured run's (+ precheck).
HOLD_ACCOUNTS: Final = 8
#: What each request of the reservation scenario estimates (and so holds).
HOLD_COST: Final = 100
#: Each hold account's balance: no hold can be refused for want of quota during any run
#: (10**15 / 100 = 10**13 holds).
HOLD_BALANCE: Final = 10**15


def hold_account(index: int, *, warmup: bool = False) -> str:
    return f"acct_bench_hold_{'warm' if warmup else 'run'}_{index:02d}"


def hold_key(index: int, *, warmup: bool = False) -> str:
    return f"sk-bench-hold-{'warm' if warmup else 'run'}-{index:02d}-{uuid.UUID(int=index).hex}"


def filler_account(index: int) -> str:
    return f"acct-{index:07d}"


def filler_key(index: int) -> str:
    return f"sk-filler-{index:07d}-{uuid.UUID(int=index).hex}"


def world_events(accounts: int) -> list[dict[str, Any]]:
    """The events that build the world: catalog, `accounts` fillers, the two bench accounts."""
    events: list[dict[str, Any]] = [
        cloud_event("quota.model.registered", "catalog", {"model": MODEL, "kind": "chat"}),
        cloud_event(
            "quota.channel.registered",
            "catalog",
            {"channel_id": 1, "models": [MODEL], "groups": ["default"]},
        ),
        cloud_event(
            "quota.channel.registered",
            "catalog",
            {"channel_id": 2, "models": [MODEL], "groups": ["default"]},
        ),
        cloud_event(
            "quota.route.policy_set", "catalog", {"route": "/v1/admin/*", "min_role": "admin"}
        ),
    ]
    for index in range(accounts):
        account = filler_account(index)
        events.append(recharge(account, FILLER_BALANCE))
        events.append(token_issued(account, f"tok-{index:07d}", filler_key(index)))
    events.append(recharge(ALLOWED_ACCOUNT, ALLOWED_BALANCE))
    events.append(token_issued(ALLOWED_ACCOUNT, "tok_bench_allowed", ALLOWED_KEY))
    # No recharge: a balance of 0 is denied at check 13 (insufficient_user_quota), the last
    # check before the rate limit, so this denial runs every other check first.
    events.append(token_issued(POOR_ACCOUNT, "tok_bench_poor", POOR_KEY))
    for warmup in (False, True):
        for index in range(HOLD_ACCOUNTS):
            account = hold_account(index, warmup=warmup)
            events.append(recharge(account, HOLD_BALANCE))
            token = f"tok_bench_hold_{'warm' if warmup else 'run'}_{index:02d}"
            events.append(token_issued(account, token, hold_key(index, warmup=warmup)))
    return events


def fresh_event() -> dict[str, Any]:
    """One event of the freshness scenario: a recharge of 1 to an account of its own."""
    return recharge(FRESH_ACCOUNT, 1)


def authorize_body(key: str) -> dict[str, Any]:
    """A check-only POST /authorize body as a gateway sends it (no estimated_cost)."""
    return {
        "authorization": f"Bearer {key}",
        "client_ip": CLIENT_IP,
        "route": ROUTE,
        "model": MODEL,
        "request_id": "req-bench-0000000000000001",
    }


def reserve_body(key: str, cost: int = HOLD_COST) -> dict[str, Any]:
    """A POST /authorize body that holds `cost`: no request_id, so every request is a new hold."""
    body = authorize_body(key)
    del body["request_id"]
    body["estimated_cost"] = cost
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Expectation:
    """What every response of a scenario must be."""

    status: int
    #: The `quota_policy_decisions_total` label the policy counts it under; None: not /authorize.
    reason: str | None
