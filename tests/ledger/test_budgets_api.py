"""`GET /accounts/{id}/budgets` (CONTRACT section 9) through the real ledger: events published
with `POST /events`, folded from Kafka into PostgreSQL, read back over HTTP and checked against
periods and spend computed here, independently of `services.store.periods`."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

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
)
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = "gpt-4o"
OTHER_MODEL = "other-model"
KOLKATA = "Asia/Kolkata"  # UTC+05:30 all year: local midnight is 18:30 UTC
BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _timed(event: dict[str, Any], moment: datetime) -> dict[str, Any]:
    return {**event, "time": _text(moment)}


async def publish(ledger: httpx.AsyncClient, pool: asyncpg.Pool, events: list[Any]) -> list[int]:
    """Publish through the ledger, wait until every event is applied (failing at once if one
    is quarantined) and return their positions."""
    before = await head_position(pool)
    answer = await ledger.post("/events", json=events, headers=AUTH)
    assert answer.status_code == 202, answer.text

    async def settled() -> bool:
        async with pool.acquire() as conn:
            rejected = await conn.fetch("SELECT reason FROM rejected_events")
            assert not rejected, [row["reason"] for row in rejected]
        return await head_position(pool) >= before + len(events)

    await wait_for(settled, timeout=60, what="the events applied")
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT event_id, position FROM event_store WHERE event_id = ANY($1::text[])",
            [event["id"] for event in events],
        )
    positions = {row["event_id"]: row["position"] for row in rows}
    return [positions[event["id"]] for event in events]


def _period(period: str, zone: str, at: datetime) -> tuple[datetime, datetime]:
    """The [start, end) in UTC of the `period` holding `at`: local midnight of the day, of the
    week's Monday, of the month's 1st (none of these zones moves its clocks at midnight)."""
    tz = ZoneInfo(zone)
    day = at.astimezone(tz).date()
    if period == "day":
        first, following = day, day + timedelta(days=1)
    elif period == "week":
        first = day - timedelta(days=day.weekday())
        following = first + timedelta(days=7)
    else:
        assert period == "month"
        first = day.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    start = datetime.combine(first, time(0), tzinfo=tz).astimezone(UTC)
    return start, datetime.combine(following, time(0), tzinfo=tz).astimezone(UTC)


def _covers(token: str | None, model: str | None, usage_token: str, usage_model: str) -> bool:
    return (token is None or usage_token == token) and (model is None or usage_model == model)


async def _budgets(ledger: httpx.AsyncClient, account: str) -> list[dict[str, Any]]:
    answer = await ledger.get(f"/accounts/{account}/budgets", headers=AUTH)
    assert answer.status_code == 200, answer.text
    body: list[dict[str, Any]] = answer.json()
    return body


async def test_each_budget_with_its_current_period_spent_held_and_remaining(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    account = "acct_budgets"
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    budgets = {
        # (scope, token, model, amount, period, zone)
        "b_day": ("account", None, None, 5_000, "day", KOLKATA),
        "b_month": ("account", None, MODEL, 20_000, "month", NEW_YORK),
        "b_small": ("account", None, OTHER_MODEL, 100, "day", "UTC"),
        "b_total": ("account", None, None, 10_000, "total", "UTC"),
        "a_tok_week": ("token", "tok_1", MODEL, 3_000, "week", BERLIN),
    }
    set_events = []
    for budget_id, (scope, token, model, amount, period, zone) in budgets.items():
        data: dict[str, Any] = {"timezone": zone}
        if scope == "token":
            data |= {"scope": "token", "token_id": token}
        if model is not None:
            data["model"] = model
        set_events.append(_timed(budget_set(account, budget_id, amount, period, **data), now))
    # (amount, token, model, time)
    usages = [
        (70, "tok_1", MODEL, now - timedelta(seconds=5)),  # before the budgets are set
        (300, "tok_1", MODEL, now),
        (900, "tok_1", MODEL, yesterday),  # counts toward yesterday's periods, not today's
        (200, "tok_2", OTHER_MODEL, now),
        (40, "tok_2", MODEL, now),
    ]
    usage_events = [
        _timed(usage(account, amount, {"token_id": token, "model": model}), when)
        for amount, token, model, when in usages
    ]
    hold = _timed(
        cloud_event(
            "quota.reservation.held",
            account,
            {"reservation_id": "r_1", "amount": 50, "expires_at": _text(now + timedelta(hours=1)),
             "actor": "tests", "token_id": "tok_1", "model": MODEL},
        ),
        now,
    )  # fmt: skip
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, [
            recharge(account, 10**6),
            token_issued(account, "tok_1", "sk-budgets-api-key-0000000000001"),
            token_issued(account, "tok_2", "sk-budgets-api-key-0000000000002"),
            limits_set(account, 3),
            usage_events[0],
        ])  # fmt: skip
        positions = await publish(ledger, pool, set_events)
        await publish(ledger, pool, [*usage_events[1:], hold])
        body = await _budgets(ledger, account)

    as_of = datetime.now(UTC)  # the ledger answered between `now` and this
    # Account budgets first, then token budgets, each by id.
    order = ["b_day", "b_month", "b_small", "b_total", "a_tok_week"]
    assert [item["budget_id"] for item in body] == order
    set_at = dict(zip(budgets, positions, strict=True))
    for item in body:
        budget_id = item["budget_id"]
        scope, token, model, amount, period, zone = budgets[budget_id]
        mine = [(a, w) for a, tok, mod, w in usages if _covers(token, model, tok, mod)]
        if period == "total":
            start = end = None
            spent = sum(a for a, _ in mine)
        else:
            start, end = _period(period, zone, as_of)
            spent = sum(a for a, w in mine if start <= w < end)
        held = 50 if _covers(token, model, "tok_1", MODEL) else 0
        assert item == {
            "budget_id": budget_id,
            "scope": scope,
            "token_id": token,
            "model": model,
            "amount": amount,
            "period": period,
            "timezone": zone,
            "period_start": None if start is None else _text(start),
            "resets_at": None if end is None else _text(end),
            "spent": spent,
            "held": held,
            "remaining": max(amount - spent - held, 0),
            "position": set_at[budget_id],
        }, budget_id
    by_id = {item["budget_id"]: item for item in body}
    # Kolkata's day starts at 18:30 UTC, whatever the machine's zone.
    assert by_id["b_day"]["period_start"].endswith("T18:30:00Z")
    # The usage timed yesterday is not in today's spend, but in the total's (and the hold in
    # every budget that covers tok_1 on the model).
    assert by_id["b_total"]["spent"] == 1510
    assert by_id["b_total"]["held"] == 50
    assert by_id["b_total"]["remaining"] == 10_000 - 1510 - 50
    # Spend past the amount (usage is never refused) leaves nothing, not a negative.
    assert (by_id["b_small"]["spent"], by_id["b_small"]["remaining"]) == (200, 0)
    # The token budget counts tok_1 on the model only.
    assert by_id["a_tok_week"]["held"] == 50
    assert by_id["a_tok_week"]["spent"] in (370, 1270)  # 370 on a Monday in Berlin
    async with pool.acquire() as conn:
        day_rows = await conn.fetch(
            "SELECT period_start, spent FROM budget_spend WHERE budget_id = 'b_day'"
            " ORDER BY period_start"
        )
    yesterday_start, _ = _period("day", KOLKATA, yesterday)
    assert {row["period_start"]: row["spent"] for row in day_rows}[yesterday_start] == 900
    await assert_history_clean(pool)


async def test_removal_setting_again_no_budgets_unknown_account_and_auth(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    account, plain = "acct_b_removed", "acct_b_none"
    now = datetime.now(UTC)
    async with running_ledger(settings) as (_, ledger):
        await publish(ledger, pool, [
            recharge(account, 10_000),
            recharge(plain, 10),
            _timed(budget_set(account, "b_one", 1_000, "day"), now),
            _timed(budget_set(account, "b_two", 50, "total"), now),
            _timed(usage(account, 100), now),
        ])  # fmt: skip
        before = await _budgets(ledger, account)
        (removed, again) = await publish(ledger, pool, [
            _timed(cloud_event("quota.budget.removed", account, {"budget_id": "b_two"}), now),
            _timed(budget_set(account, "b_one", 2_000, "day"), now),
        ])  # fmt: skip
        after = await _budgets(ledger, account)
        none = await _budgets(ledger, plain)
        unknown = await ledger.get("/accounts/nobody/budgets", headers=AUTH)
        catalog = await ledger.get("/accounts/catalog/budgets", headers=AUTH)
        anonymous = await ledger.get(f"/accounts/{account}/budgets")
        wrong = await ledger.get(
            f"/accounts/{account}/budgets", headers={"Authorization": "Bearer nope"}
        )

    assert [(i["budget_id"], i["spent"], i["remaining"]) for i in before] == [
        ("b_one", 100, 900),
        ("b_two", 100, 0),
    ]
    # Removed: gone. Set again with a new amount: the period's spend stays.
    (one,) = after
    assert (one["budget_id"], one["amount"], one["spent"], one["remaining"]) == (
        "b_one",
        2_000,
        100,
        1_900,
    )
    assert one["position"] == again > removed
    assert one["timezone"] == "UTC" and one["period_start"].endswith("T00:00:00Z")
    assert none == []
    for answer in (unknown, catalog):
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert (error["code"], error["type"]) == ("unknown_account", "not_found_error")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "admin_token_missing"
    assert wrong.status_code == 403
    await assert_history_clean(pool)
