"""`replay` rebuilds every projection from history: a check finds tampered projections, a
rebuild repairs them, replays are repeatable, Kafka and the store agree, and the SQL-accelerated
fold equals the pure one."""

from __future__ import annotations

import asyncpg
import pytest

from bench.replay.workload import random_events, store_events
from services.ledger.audit import compare_states, verify
from services.ledger.replay import ReplayReport, refold_store, replay
from services.settings import Settings
from services.store import event_store, projections
from services.store.fold import MONEY_EVENTS, balance_delta, fold
from services.store.model import State


async def _replay(pool: asyncpg.Pool, check: bool, **kwargs: object) -> ReplayReport:
    async with pool.acquire() as conn:
        return await replay(conn, check=check, **kwargs)  # type: ignore[arg-type]


async def _projections(pool: asyncpg.Pool) -> State:
    async with pool.acquire() as conn:
        return await projections.load_all(conn)


async def test_check_of_untouched_history_is_clean(pool: asyncpg.Pool, history: int) -> None:
    report = await _replay(pool, check=True)
    async with pool.acquire() as conn:
        head = await event_store.read_head(conn)
    assert report.ok, report.as_json()
    assert report.events == history
    assert report.head_hash == head.hash
    assert not report.replaced


async def test_check_names_tampered_balance_and_rebuild_repairs(
    pool: asyncpg.Pool, history: int
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance = 12345 WHERE account_id = 'acct_a'")
    report = await _replay(pool, check=True)
    assert not report.ok
    assert report.differences == [
        {"what": "accounts.balance", "row": "acct_a", "expected": 700, "found": 12345}
    ]
    assert (await _projections(pool)).accounts["acct_a"].balance == 12345  # check changed nothing
    repaired = await _replay(pool, check=False)
    assert repaired.replaced
    assert repaired.differences == report.differences
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok
        schemas = await conn.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'quota_replay_%'"
        )
    assert schemas == 0
    assert (await _replay(pool, check=True)).ok


async def test_replaying_twice_is_identical(pool: asyncpg.Pool, history: int) -> None:
    first = await _replay(pool, check=False)
    after_first = await _projections(pool)
    second = await _replay(pool, check=False)
    assert first.ok and second.ok
    assert second.head_hash == first.head_hash
    assert compare_states(after_first, await _projections(pool)) == []
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok


async def test_from_kafka_equals_the_store(
    settings: Settings, pool: asyncpg.Pool, history: int
) -> None:
    kafka = dict(from_kafka=True, kafka_bootstrap=settings.kafka_bootstrap, topic=settings.topic)
    checked = await _replay(pool, check=True, **kafka)
    assert checked.ok, checked.as_json()
    assert checked.events == history
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM tokens")
    rebuilt = await _replay(pool, check=False, **kafka)
    assert rebuilt.replaced
    assert [d["what"] for d in rebuilt.differences] == ["tokens.missing"]
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok


def test_money_deltas_cover_the_balance_events() -> None:
    from services.contract.events import ACCOUNT_EVENTS

    events = list(random_events(5_000, 50, seed=3))
    moving = {e.type for e in events if balance_delta(e) is not None}
    assert moving == set(MONEY_EVENTS)
    assert set(MONEY_EVENTS) <= set(ACCOUNT_EVENTS)


@pytest.mark.parametrize("seed", [1, 2])
async def test_accelerated_equals_the_pure_fold(pool: asyncpg.Pool, seed: int) -> None:
    events = list(random_events(3_000, 40, seed=seed))
    async with pool.acquire() as conn:
        async with conn.transaction():
            _, stored = await store_events(conn, iter(events), chunk=700)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            fast = await refold_store(conn, accelerated=True)
            pure = await refold_store(conn, accelerated=False)
    reference = fold(State(), events, 1).state
    assert stored > 2_500
    assert fast.differences == [] and pure.differences == []
    assert compare_states(pure.state, fast.state) == []
    assert compare_states(reference, fast.state) == []
    assert fast.state.token_keys == reference.token_keys
    assert (fast.head_hash, fast.events) == (pure.head_hash, pure.events)
    assert compare_states(reference, await _projections(pool)) == []
    assert (await _replay(pool, check=True)).ok


async def test_tampered_payload_is_reported_and_not_swapped(
    pool: asyncpg.Pool, history: int
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE event_store DISABLE TRIGGER USER")
        await conn.execute(
            "UPDATE event_store SET payload = replace(payload, '\"amount\":300', '\"amount\":30')"
            " WHERE type = 'quota.account.usage_recorded'"
        )
        await conn.execute("ALTER TABLE event_store ENABLE TRIGGER USER")
    report = await _replay(pool, check=False)
    whats = {d["what"] for d in report.history_differences}
    # The chain catches the edit; holding each balance_delta to its payload is verify's part.
    assert {"event_store.content_hash", "event_store.hash"} <= whats
    assert not report.replaced
    assert (await _projections(pool)).accounts["acct_a"].balance == 700


async def test_the_chain_check_on_a_second_connection_is_clean_and_finds_a_gap(
    pool: asyncpg.Pool, history: int, database_url: str
) -> None:
    # `quota replay` checks the chain on another connection in the same snapshot (given a dsn).
    clean = await _replay(pool, check=True, dsn=database_url)
    assert clean.ok, clean.as_json()
    middle = history // 2
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE event_store DISABLE TRIGGER USER")
        await conn.execute("DELETE FROM event_store WHERE position = $1", middle)
        await conn.execute("ALTER TABLE event_store ENABLE TRIGGER USER")
    report = await _replay(pool, check=False, dsn=database_url)
    gaps = [d for d in report.history_differences if d["what"] == "event_store.position"]
    assert gaps and gaps[0]["row"] == f"position {middle + 1}"
    assert not report.replaced
