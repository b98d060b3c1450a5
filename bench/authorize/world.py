"""The world the benchmark decides in, opened by events through Kafka and the real ledger: a
catalog, filler accounts (a realistic snapshot size) and the scenarios' keys. bench.soak uses
the catalog, the hot account and the fillers.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Final

from services.contract.samples import budget_set, cloud_event, recharge, token_issued

MODEL: Final = "gpt-4o"
ROUTE: Final = "/v1/chat/completions"
CLIENT_IP: Final = "203.0.113.7"
#: The allowed (and soak's hot) account: a balance nothing the benchmarks do can exhaust.
ALLOWED_ACCOUNT: Final = "acct_bench_allowed"
ALLOWED_KEY: Final = "sk-bench-allowed-000000000000000000000001"
#: No recharge: a balance of 0 is denied at check 13 (insufficient_user_quota), the last check
#: before the rate limit, so this denial runs every other check first.
POOR_KEY: Final = "sk-bench-poor-0000000000000000000000000002"
#: The reservation scenario's accounts: wrk picks one of them round-robin per request, so a
#: group commit has several accounts to hold on. The warm-up holds on accounts of its own.
HOLD_ACCOUNTS: Final = 8
HOLD_COST: Final = 100
#: 10**13 holds of HOLD_COST each: none is refused for want of quota during any run.
BIG_BALANCE: Final = 10**15
#: The budgeted rows' accounts: three covering budgets (a day budget in UTC, a week budget for
#: the model in another zone, a month budget of the token) and a cap on concurrent holds, all
#: too large to be used up in a run, so each decision weighs them and none is refused.
BUDGETED_ACCOUNT: Final = "acct_bench_budgeted"
BUDGETED_KEY: Final = "sk-bench-budgeted-00000000000000000000003"
BUDGET_AMOUNT: Final = 10**14
MAX_CONCURRENT: Final = 10**9


def hold_account(index: int, *, warmup: bool = False, budgeted: bool = False) -> str:
    kind = "budgeted_" if budgeted else ""
    return f"acct_bench_hold_{kind}{'warm' if warmup else 'run'}_{index:02d}"


def hold_key(index: int, *, warmup: bool = False, budgeted: bool = False) -> str:
    kind = "budgeted-" if budgeted else ""
    phase = "warm" if warmup else "run"
    return f"sk-bench-hold-{kind}{phase}-{index:02d}-{uuid.UUID(int=index).hex}"


def budgeted_events(account: str, key: str) -> list[dict[str, Any]]:
    """A funded account whose token has a concurrency cap, under three covering budgets."""
    token_id = f"tok_{account}"
    return [
        recharge(account, BIG_BALANCE),
        token_issued(account, token_id, key, max_concurrent=MAX_CONCURRENT),
        budget_set(account, f"{account}-day", BUDGET_AMOUNT, "day"),
        budget_set(account, f"{account}-week", BUDGET_AMOUNT, "week", model=MODEL,
                   timezone="America/New_York"),
        budget_set(account, f"{account}-month", BUDGET_AMOUNT, "month", scope="token",
                   token_id=token_id, timezone="Europe/Berlin"),
    ]  # fmt: skip


def filler_account(index: int) -> str:
    return f"acct-{index:07d}"


def filler_key(index: int) -> str:
    return f"sk-filler-{index:07d}-{uuid.UUID(int=index).hex}"


def world_events(accounts: int) -> list[dict[str, Any]]:
    """The events that build the world: catalog, `accounts` fillers, the bench accounts."""
    channel = {"models": [MODEL], "groups": ["default"]}
    events = [
        cloud_event("quota.model.registered", "catalog", {"model": MODEL, "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog", {"channel_id": 1, **channel}),
        cloud_event("quota.channel.registered", "catalog", {"channel_id": 2, **channel}),
        cloud_event("quota.route.policy_set", "catalog", {"route": "/v1/admin/*",
                                                          "min_role": "admin"}),
    ]  # fmt: skip
    for index in range(accounts):
        events.append(recharge(filler_account(index), 1_000))
        events.append(token_issued(filler_account(index), f"tok-{index:07d}", filler_key(index)))
    events.append(recharge(ALLOWED_ACCOUNT, BIG_BALANCE))
    events.append(token_issued(ALLOWED_ACCOUNT, "tok_bench_allowed", ALLOWED_KEY))
    events.append(token_issued("acct_bench_poor", "tok_bench_poor", POOR_KEY))
    events += budgeted_events(BUDGETED_ACCOUNT, BUDGETED_KEY)
    for warmup in (False, True):
        for index in range(HOLD_ACCOUNTS):
            account, key = hold_account(index, warmup=warmup), hold_key(index, warmup=warmup)
            events.append(recharge(account, BIG_BALANCE))
            events.append(token_issued(account, f"tok_{account}", key))
            account = hold_account(index, warmup=warmup, budgeted=True)
            events += budgeted_events(account, hold_key(index, warmup=warmup, budgeted=True))
    return events


def fresh_event() -> dict[str, Any]:
    """One event of the freshness scenario: a recharge of 1 to an account of its own."""
    return recharge("acct_bench_fresh", 1)


def authorize_body(key: str) -> dict[str, Any]:
    """A check-only POST /authorize body as a gateway sends it (no estimated_cost)."""
    return {"authorization": f"Bearer {key}", "client_ip": CLIENT_IP, "route": ROUTE,
            "model": MODEL, "request_id": "req-bench-0000000000000001"}  # fmt: skip


def reserve_body(key: str) -> dict[str, Any]:
    """A body that holds HOLD_COST: no request_id, so every request is a new hold."""
    body = authorize_body(key)
    del body["request_id"]
    return body | {"estimated_cost": HOLD_COST}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
