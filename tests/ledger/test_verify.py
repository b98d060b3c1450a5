"""`verify` re-folds the stored history and checks the hash chain: a clean history verifies,
and tampering with a stored event or a projection row is named (what, row, expected, found)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import asyncpg
import pytest

from services.ledger.audit import VerifyReport, compare_states, verify
from services.settings import Settings
from services.store import event_store
from services.store.model import Account, State
from tests.builders import recharge, wait_for_position
from tests.conftest import ADMIN_TOKEN
from tests.ledger.conftest import RECHARGE_ID
from tests.ledger.ledger_app import running_ledger
from tests.processes import QUOTA, quota_env

AUTH_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _verify(pool: asyncpg.Pool, page_size: int = 5000) -> VerifyReport:
    async with pool.acquire() as conn:
        return await verify(conn, page_size=page_size)


async def _tamper_events(pool: asyncpg.Pool, statement: str, *args: Any) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE event_store DISABLE TRIGGER USER")
        await conn.execute(statement, *args)
        await conn.execute("ALTER TABLE event_store ENABLE TRIGGER USER")


async def _position_of(pool: asyncpg.Pool, event_id: str) -> int:
    async with pool.acquire() as conn:
        position: int = await conn.fetchval(
            "SELECT position FROM event_store WHERE event_id = $1", event_id
        )
    return position


def _named(report: VerifyReport, what: str, row: str) -> dict[str, Any]:
    matches = [d for d in report.differences if d["what"] == what and d["row"] == row]
    assert matches, f"no {what} difference for {row}: {report.differences}"
    return matches[0]


@pytest.mark.parametrize("page_size", [5000, 3])
async def test_clean_history_verifies(pool: asyncpg.Pool, history: int, page_size: int) -> None:
    report = await _verify(pool, page_size)
    async with pool.acquire() as conn:
        head = await event_store.read_head(conn)
    assert report.differences == []
    assert report.ok
    assert report.events_checked == history
    assert report.head_hash == head.hash
    body = report.as_json()
    assert set(body) == {"ok", "events_checked", "head_hash", "differences"}
    assert json.loads(json.dumps(body)) == body


async def test_empty_ledger_verifies(pool: asyncpg.Pool) -> None:
    report = await _verify(pool)
    assert report.ok
    assert report.events_checked == 0
    assert report.head_hash == "0" * 64


async def test_tampered_payload_is_named(pool: asyncpg.Pool, history: int) -> None:
    position = await _position_of(pool, RECHARGE_ID)
    await _tamper_events(
        pool,
        "UPDATE event_store SET payload = replace(payload, '\"amount\":1000', '\"amount\":1001')"
        " WHERE position = $1",
        position,
    )
    report = await _verify(pool)
    assert not report.ok
    assert report.events_checked == history
    row = f"position {position}"
    content = _named(report, "event_store.content_hash", row)
    assert content["expected"] != content["found"]
    _named(report, "event_store.hash", row)
    # The re-fold believes the tampered payload, so the stored balance no longer agrees.
    balance = _named(report, "accounts.balance", "acct_a")
    assert (balance["expected"], balance["found"]) == (701, 700)
    # Only the tampered row is blamed in the chain: the next row still links to its hash.
    chain = {d["row"] for d in report.differences if d["what"].startswith("event_store.")}
    assert chain == {row}
    json.dumps(report.as_json())


async def test_tampered_type_column_is_named(pool: asyncpg.Pool, history: int) -> None:
    position = await _position_of(pool, RECHARGE_ID)
    await _tamper_events(
        pool, "UPDATE event_store SET type = 'quota.account.refunded' WHERE position = $1", position
    )
    report = await _verify(pool)
    assert not report.ok
    difference = _named(report, "event_store.type", f"position {position}")
    assert difference["expected"] == "quota.account.recharged"
    assert difference["found"] == "quota.account.refunded"
    assert [d["what"] for d in report.differences] == ["event_store.type"]


async def test_broken_chain_link_and_head_are_named(pool: asyncpg.Pool, history: int) -> None:
    await _tamper_events(pool, "UPDATE event_store SET hash = repeat('a', 64) WHERE position = 2")
    report = await _verify(pool)
    _named(report, "event_store.hash", "position 2")
    link = _named(report, "event_store.prev_hash", "position 3")
    assert link["found"] != link["expected"]
    assert link["expected"] == "a" * 64


async def test_gap_in_positions_is_named(pool: asyncpg.Pool, history: int) -> None:
    await _tamper_events(pool, "DELETE FROM event_store WHERE position = 3")
    report = await _verify(pool)
    assert report.events_checked == history - 1
    gap = _named(report, "event_store.position", "position 4")
    assert (gap["expected"], gap["found"]) == (3, 4)
    _named(report, "event_store.prev_hash", "position 4")


async def test_truncated_history_is_named_at_the_head(pool: asyncpg.Pool, history: int) -> None:
    await _tamper_events(pool, "DELETE FROM event_store WHERE position = $1", history)
    report = await _verify(pool)
    assert report.events_checked == history - 1
    position = _named(report, "ledger_head.position", "ledger_head")
    assert (position["expected"], position["found"]) == (history - 1, history)
    _named(report, "ledger_head.hash", "ledger_head")


async def test_tampered_balance_is_named(pool: asyncpg.Pool, history: int) -> None:
    async with pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE account_id = 'acct_a'")
    report = await _verify(pool)
    assert not report.ok
    assert report.differences == [
        {"what": "accounts.balance", "row": "acct_a", "expected": 700, "found": 701}
    ]


async def test_deleted_and_extra_projection_rows_are_named(
    pool: asyncpg.Pool, history: int
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM tokens WHERE token_id = 'tok_a'")
        await conn.execute("DELETE FROM rate_limits WHERE account_id = 'acct_a'")
        await conn.execute(
            "INSERT INTO route_policies (route, min_role, position) VALUES ('/x', 'user', 1)"
        )
    report = await _verify(pool)
    assert not report.ok
    token = _named(report, "tokens.missing", "tok_a")
    assert token["found"] is None
    assert token["expected"]["account_id"] == "acct_a"
    assert token["expected"]["allowed_models"] == ["gpt-4o"]
    limit = _named(report, "rate_limits.missing", "acct_a/gpt-4o")
    assert limit["expected"]["requests"] == 10
    extra = _named(report, "route_policies.extra", "/x")
    assert extra["expected"] is None
    assert extra["found"]["min_role"] == "user"
    assert len(report.differences) == 3


def test_compare_states_names_each_field() -> None:
    expected = State(accounts={"a": Account("a", balance=5, role="admin", position=3)})
    found = State(accounts={"a": Account("a", balance=5, held=2, group="vip", position=3)})
    assert compare_states(expected, found) == [
        {"what": "accounts.held", "row": "a", "expected": 0, "found": 2},
        {"what": "accounts.role", "row": "a", "expected": "admin", "found": "user"},
        {"what": "accounts.group_name", "row": "a", "expected": "default", "found": "vip"},
    ]


async def test_event_the_refold_rejects_is_named(pool: asyncpg.Pool, history: int) -> None:
    async with pool.acquire() as conn:
        position: int = await conn.fetchval(
            "SELECT position FROM event_store WHERE type = 'quota.channel.registered'"
        )
    await _tamper_events(
        pool,
        "UPDATE event_store SET payload = replace(payload, 'quota.channel.registered',"
        " 'quota.channel.enabled') WHERE position = $1",
        position,
    )
    report = await _verify(pool, page_size=4)
    row = f"position {position}"
    rejected = _named(report, "refold.rejected", row)
    assert "channel 7 is not registered" in rejected["found"]
    _named(report, "event_store.type", row)
    _named(report, "channels.extra", "7")
    # Later events still fold at their stored positions: the accounts agree.
    assert not [d for d in report.differences if d["what"].startswith("accounts.")]


async def test_verify_over_http_and_the_command(settings: Settings, pool: asyncpg.Pool) -> None:
    async with running_ledger(settings) as (_, client):
        await client.post("/events", json=[recharge("acct_v", 5)], headers=AUTH_HEADERS)
        await wait_for_position(pool, 1)
        clean = (await client.get("/audit/verify", headers=AUTH_HEADERS)).json()
        unauthorised = await client.get("/audit/verify")
    assert clean["ok"] is True
    assert clean["events_checked"] == 1
    assert unauthorised.status_code == 401
    ok = subprocess.run([str(QUOTA), "verify"], env=quota_env(settings), capture_output=True,
                        timeout=60, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    async with pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE account_id = 'acct_v'")
    bad = subprocess.run([str(QUOTA), "verify"], env=quota_env(settings), capture_output=True,
                         timeout=60, check=False, text=True)  # fmt: skip
    assert bad.returncode == 1
    assert "accounts.balance" in bad.stdout
