"""Statements and point-in-time balances: a history folded by the real ledger (through Kafka),
read back over HTTP and with `quota statement`, checked against a reference computed here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.ledger.app import create_app
from services.ledger.audit_api import router
from services.ledger.statement_cli import statement_command
from services.ledger.statements import CSV_COLUMNS, parse_csv
from services.settings import Settings
from tests.builders import cloud_event, limits_set, produce, recharge, usage, wait_for_position
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ACCOUNT = "acct_s"
OTHER = "acct_t"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


# (event, amount it moves the balance); account events are in order per account.
def _history() -> list[tuple[dict[str, Any], int]]:
    s, t = ACCOUNT, OTHER
    return [
        (cloud_event("quota.account.opened", s, {}, event_id="s0", time=_at(0)), 0),
        (recharge(s, 1000, event_id="s1", time=_at(1), source="billing"), 1000),
        (recharge(t, 500, event_id="t1", time=_at(1.5)), 500),
        (usage(s, 300, event_id="s2", time=_at(2), source="gateway"), -300),
        (
            cloud_event(
                "quota.account.adjusted",
                s,
                {"delta": -50, "reason": "fix"},
                event_id="s3",
                time=_at(3),
            ),
            -50,
        ),
        (usage(t, 120, event_id="t2", time=_at(3.5)), -120),
        (cloud_event("quota.account.suspended", s, {"reason": "x"}, event_id="s4", time=_at(4)), 0),
        (
            cloud_event("quota.account.refunded", s, {"amount": 100}, event_id="s5", time=_at(5)),
            100,
        ),
        # Budget and limit changes are entries too: amount 0, the balance unchanged.
        (
            cloud_event(
                "quota.budget.set",
                s,
                {
                    "budget_id": "b_day",
                    "scope": "account",
                    "amount": 500,
                    "period": "day",
                    "timezone": "Europe/Berlin",
                },
                event_id="s5a",
                time=_at(5.75),
                source="admin",
            ),
            0,
        ),
        (limits_set(s, 2) | {"id": "s5b", "time": _at(5.9)}, 0),
        (cloud_event("quota.account.reinstated", s, {}, event_id="s6", time=_at(6)), 0),
        (
            cloud_event(
                "quota.budget.removed", s, {"budget_id": "b_day"}, event_id="s6a", time=_at(6.75)
            ),
            0,
        ),
        (
            cloud_event(
                "quota.account.adjusted",
                t,
                {"delta": 5, "reason": "r"},
                event_id="t3",
                time=_at(6.5),
            ),
            5,
        ),
        (recharge(s, 25, event_id="s7", time=_at(7)), 25),
    ]


@dataclass
class Ledger:
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    database_url: str
    expected: dict[str, list[dict[str, Any]]]  # account -> entries, as the API should give them

    def ids(self, account: str = ACCOUNT) -> list[str]:
        return [entry["event_id"] for entry in self.expected[account]]

    def entry(self, event_id: str, account: str = ACCOUNT) -> dict[str, Any]:
        return next(e for e in self.expected[account] if e["event_id"] == event_id)


@pytest.fixture
async def ledger(
    settings: Settings, pool: asyncpg.Pool, database_url: str
) -> AsyncIterator[Ledger]:
    history = _history()
    app = create_app(settings)
    app.include_router(router)
    async with app.router.lifespan_context(app):
        await app.state.ledger.consumer.started.wait()
        await produce(settings.kafka_bootstrap, settings.topic, [event for event, _ in history])
        await wait_for_position(pool, len(history))
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT event_id, position FROM event_store")
        positions = {row["event_id"]: row["position"] for row in rows}
        expected: dict[str, list[dict[str, Any]]] = {}
        for account in (ACCOUNT, OTHER):
            mine = sorted(
                (positions[event["id"]], event, amount)
                for event, amount in history
                if event["subject"] == account
            )
            balance = 0
            entries = []
            for position, event, amount in mine:
                balance += amount
                entries.append(
                    {
                        "position": position,
                        "time": event["time"],
                        "type": event["type"],
                        "amount": amount,
                        "balance": balance,
                        "event_id": event["id"],
                        "source": event["source"],
                    }
                )
            expected[account] = entries
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
            yield Ledger(client, pool, database_url, expected)


async def _statement(ledger: Ledger, account: str = ACCOUNT, **params: Any) -> dict[str, Any]:
    response = await ledger.client.get(
        f"/accounts/{account}/statement", params=params, headers=AUTH
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _all_pages(ledger: Ledger, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Follow `next` to the end; check each page's opening is the previous page's closing."""
    entries: list[dict[str, Any]] = []
    body = await _statement(ledger, **params)
    pages = 1
    while True:
        if entries:
            assert body["opening_balance"] == entries[-1]["balance"]
        entries.extend(body["entries"])
        if body["entries"]:
            assert body["closing_balance"] == body["entries"][-1]["balance"]
        if body["next"] is None:
            return entries, pages
        body = await _statement(ledger, **params, cursor=body["next"])
        pages += 1


async def test_whole_statement(ledger: Ledger) -> None:
    body = await _statement(ledger)
    assert set(body) == {"account_id", "opening_balance", "closing_balance", "entries", "next"}
    assert body["account_id"] == ACCOUNT
    assert body["opening_balance"] == 0
    assert body["entries"] == ledger.expected[ACCOUNT]
    assert [e["balance"] for e in body["entries"]] == [
        0, 1000, 700, 650, 650, 750, 750, 750, 750, 750, 775
    ]  # fmt: skip
    assert [e["amount"] for e in body["entries"]] == [0, 1000, -300, -50, 0, 100, 0, 0, 0, 0, 25]
    assert body["closing_balance"] == 775
    assert body["next"] is None
    assert all(e["time"].endswith("Z") for e in body["entries"])
    assert body["entries"][1]["source"] == "billing"
    other = await _statement(ledger, OTHER)
    assert other["entries"] == ledger.expected[OTHER]
    assert other["closing_balance"] == 385
    for account, balance in ((ACCOUNT, 775), (OTHER, 385)):
        projected = (await ledger.client.get(f"/accounts/{account}", headers=AUTH)).json()
        assert projected["balance"] == balance


async def test_budget_and_limit_changes_are_entries(ledger: Ledger) -> None:
    """An auditor sees when a cap changed: each budget set or removed and each limits change is
    an entry of its own type, moving nothing; the money figures are those without them."""
    body = await _statement(ledger)
    changes = [e for e in body["entries"] if e["event_id"] in ("s5a", "s5b", "s6a")]
    assert [(e["type"], e["amount"], e["balance"]) for e in changes] == [
        ("quota.budget.set", 0, 750),
        ("quota.account.limits_set", 0, 750),
        ("quota.budget.removed", 0, 750),
    ]
    assert changes[0]["source"] == "admin"
    assert changes[0]["time"] == _at(5.75)
    money = [e for e in body["entries"] if e["amount"] != 0]
    assert [e["event_id"] for e in money] == ["s1", "s2", "s3", "s5", "s7"]
    assert (body["opening_balance"], body["closing_balance"]) == (0, 775)
    window = await _statement(
        ledger, since=ledger.entry("s5a")["time"], until=ledger.entry("s7")["time"]
    )
    assert [e["event_id"] for e in window["entries"]] == ["s5a", "s5b", "s6", "s6a"]
    assert (window["opening_balance"], window["closing_balance"]) == (750, 750)
    csv = await ledger.client.get(
        f"/accounts/{ACCOUNT}/statement", params={"format": "csv"}, headers=AUTH
    )
    assert csv.text.splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = {row["event_id"]: row for row in parse_csv(csv.text)}
    assert rows["s6a"] == ledger.entry("s6a")
    assert (rows["s6a"]["type"], rows["s6a"]["amount"]) == ("quota.budget.removed", 0)


@pytest.mark.parametrize("by", ["time", "position"])
async def test_since_inclusive_until_exclusive(ledger: Ledger, by: str) -> None:
    def bound(event_id: str) -> str:
        entry = ledger.entry(event_id)
        return entry["time"] if by == "time" else str(entry["position"])

    body = await _statement(ledger, since=bound("s2"), until=bound("s5"))
    assert [e["event_id"] for e in body["entries"]] == ["s2", "s3", "s4"]
    assert body["opening_balance"] == 1000
    assert body["closing_balance"] == 650
    assert body["entries"] == [ledger.entry(i) for i in ("s2", "s3", "s4")]

    since_only = await _statement(ledger, since=bound("s6"))
    assert [e["event_id"] for e in since_only["entries"]] == ["s6", "s6a", "s7"]
    assert since_only["opening_balance"] == 750
    until_only = await _statement(ledger, until=bound("s1"))
    assert [e["event_id"] for e in until_only["entries"]] == ["s0"]
    assert (until_only["opening_balance"], until_only["closing_balance"]) == (0, 0)


async def test_time_bounds_between_events_and_past_the_end(ledger: Ledger) -> None:
    body = await _statement(ledger, since=_at(2.5), until="2026-01-01T06:30:00+01:00")
    # 06:30+01:00 is 05:30Z: s3 (03:00), s4 (04:00), s5 (05:00).
    assert [e["event_id"] for e in body["entries"]] == ["s3", "s4", "s5"]
    assert (body["opening_balance"], body["closing_balance"]) == (700, 750)
    after = await _statement(ledger, since=_at(100))
    assert after["entries"] == []
    assert (after["opening_balance"], after["closing_balance"], after["next"]) == (775, 775, None)
    before = await _statement(ledger, until=_at(-1))
    assert before["entries"] == []
    assert (before["opening_balance"], before["closing_balance"]) == (0, 0)


@pytest.mark.parametrize("limit", [1, 3, 7, 8])
async def test_pages_join_up_exactly(ledger: Ledger, limit: int) -> None:
    entries, pages = await _all_pages(ledger, limit=limit)
    assert entries == ledger.expected[ACCOUNT]
    assert pages == -(-len(entries) // limit)
    windowed, _ = await _all_pages(
        ledger, limit=limit, since=ledger.entry("s1")["time"], until=ledger.entry("s7")["time"]
    )
    assert [e["event_id"] for e in windowed] == [
        "s1", "s2", "s3", "s4", "s5", "s5a", "s5b", "s6", "s6a"
    ]  # fmt: skip


async def test_first_page_cursor_and_opening(ledger: Ledger) -> None:
    first = await _statement(ledger, limit=3)
    assert [e["event_id"] for e in first["entries"]] == ["s0", "s1", "s2"]
    assert first["next"] == str(ledger.entry("s3")["position"])
    assert first["closing_balance"] == 700
    second = await _statement(ledger, limit=3, cursor=first["next"])
    assert [e["event_id"] for e in second["entries"]] == ["s3", "s4", "s5"]
    assert second["opening_balance"] == 700


async def test_csv_equals_json(ledger: Ledger) -> None:
    response = await ledger.client.get(
        f"/accounts/{ACCOUNT}/statement", params={"format": "csv"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    lines = response.text.splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert len(lines) == 1 + len(ledger.expected[ACCOUNT])
    assert parse_csv(response.text) == ledger.expected[ACCOUNT]
    assert response.headers["x-opening-balance"] == "0"
    assert response.headers["x-closing-balance"] == "775"
    assert "x-next-cursor" not in response.headers
    assert "link" not in response.headers


async def test_csv_pages_follow_the_link_header(ledger: Ledger) -> None:
    rows: list[dict[str, Any]] = []
    url: str | None = f"/accounts/{ACCOUNT}/statement?format=csv&limit=3"
    cursors = []
    while url is not None:
        response = await ledger.client.get(url, headers=AUTH)
        assert response.status_code == 200
        rows.extend(parse_csv(response.text))
        cursor = response.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in response.headers
            url = None
            continue
        cursors.append(cursor)
        link = response.headers["link"]
        assert link.endswith('>; rel="next"')
        url = link[1 : link.index(">")]
        assert f"cursor={cursor}" in url
        assert "format=csv" in url
    assert rows == ledger.expected[ACCOUNT]
    assert len(cursors) == 3


async def _balance(ledger: Ledger, as_of: str, account: str = ACCOUNT) -> dict[str, Any]:
    response = await ledger.client.get(
        f"/accounts/{account}/balance", params={"as_of": as_of}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_balance_as_of_position(ledger: Ledger) -> None:
    for entry in ledger.expected[ACCOUNT]:
        body = await _balance(ledger, str(entry["position"]))
        assert body == {
            "account_id": ACCOUNT,
            "as_of": entry["position"],
            "balance": entry["balance"],
            "position": entry["position"],
        }
    # Every position, also those of the other account's events in between: the last event of
    # the account at or before it counts.
    top = max(e["position"] for entries in ledger.expected.values() for e in entries)
    for position in range(top + 2):
        earlier = [e for e in ledger.expected[ACCOUNT] if e["position"] <= position]
        body = await _balance(ledger, str(position))
        assert body["balance"] == (earlier[-1]["balance"] if earlier else 0)
        assert body["position"] == (earlier[-1]["position"] if earlier else None)
    first = ledger.entry("s0")["position"]
    before = await _balance(ledger, str(first - 1))
    assert (before["balance"], before["position"]) == (0, None)
    assert (await _balance(ledger, "999999"))["balance"] == 775
    other = await _balance(ledger, "999999", OTHER)
    assert (other["balance"], other["position"]) == (385, ledger.entry("t3", OTHER)["position"])


async def test_balance_as_of_time(ledger: Ledger) -> None:
    for entry in ledger.expected[ACCOUNT]:
        exactly = await _balance(ledger, entry["time"])
        assert exactly == {
            "account_id": ACCOUNT,
            "as_of": entry["time"],
            "balance": entry["balance"],
            "position": entry["position"],
        }
    just_before = await _balance(ledger, "2026-01-01T02:59:59.999999Z")
    assert (just_before["balance"], just_before["position"]) == (
        700,
        ledger.entry("s2")["position"],
    )
    offset = await _balance(ledger, "2026-01-01T05:00:00+02:00")  # 03:00Z, exactly s3
    assert offset["as_of"] == "2026-01-01T03:00:00Z"
    assert (offset["balance"], offset["position"]) == (650, ledger.entry("s3")["position"])
    early = await _balance(ledger, "2025-12-31T23:59:59Z")
    assert (early["balance"], early["position"]) == (0, None)


async def test_unknown_account_and_bad_parameters(ledger: Ledger) -> None:
    client = ledger.client
    for path in ("/accounts/nobody/statement", "/accounts/nobody/balance?as_of=1",
                 "/accounts/catalog/statement"):  # fmt: skip
        response = await client.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert "unknown account" in response.json()["error"]["message"]
    for query in ("", "?as_of=", "?as_of=yesterday", "?as_of=-1", "?as_of=2026-01-01T00:00:00",
                  "?as_of=2026-13-01T00:00:00Z", "?as_of=1.5"):  # fmt: skip
        response = await client.get(f"/accounts/{ACCOUNT}/balance{query}", headers=AUTH)
        assert response.status_code == 400, query
        assert "as_of" in response.json()["error"]["message"]
    for query in ("since=soon", "until=2026-01-01", "cursor=abc", "cursor=0"):
        response = await client.get(f"/accounts/{ACCOUNT}/statement?{query}", headers=AUTH)
        assert response.status_code == 400, query
        assert query.split("=")[0] in response.json()["error"]["message"]
    for query in ("limit=0", "limit=5001", "format=xml"):
        response = await client.get(f"/accounts/{ACCOUNT}/statement?{query}", headers=AUTH)
        assert response.status_code == 422, query


@pytest.mark.parametrize("path", [f"/accounts/{ACCOUNT}/statement", f"/accounts/{ACCOUNT}/balance"])
async def test_admin_auth(ledger: Ledger, path: str) -> None:
    params = {"as_of": "1"}
    assert (await ledger.client.get(path, params=params)).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert (await ledger.client.get(path, params=params, headers=wrong)).status_code == 403
    assert (await ledger.client.get(path, params=params, headers=AUTH)).status_code == 200


async def test_cli_statement(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUOTA_DATABASE_URL", ledger.database_url)
    monkeypatch.setattr("services.ledger.statement_cli.PAGE_SIZE", 3)  # several pages

    assert await asyncio.to_thread(statement_command, ACCOUNT, None, None, "json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body == await _statement(ledger)

    assert await asyncio.to_thread(statement_command, ACCOUNT, None, None, "csv") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert parse_csv(out) == ledger.expected[ACCOUNT]

    since, until = ledger.entry("s2")["time"], str(ledger.entry("s5")["position"])
    assert await asyncio.to_thread(statement_command, ACCOUNT, since, until, "json") == 0
    windowed = json.loads(capsys.readouterr().out)
    assert windowed == await _statement(ledger, since=since, until=until)
    assert [e["event_id"] for e in windowed["entries"]] == ["s2", "s3", "s4"]

    assert await asyncio.to_thread(statement_command, "nobody", None, None, "json") == 1
    assert "unknown account" in capsys.readouterr().err
    assert await asyncio.to_thread(statement_command, ACCOUNT, "soon", None, "json") == 2
    assert "--since" in capsys.readouterr().err
    assert await asyncio.to_thread(statement_command, ACCOUNT, None, None, "xml") == 2
