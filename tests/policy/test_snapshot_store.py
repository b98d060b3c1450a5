"""The policy's snapshot store loads what decisions need, and no more."""

from __future__ import annotations

import asyncio

import asyncpg

from services.contract.cloudevent import decode_http_object
from services.policy.reservations import Reservations, _HoldRequest
from services.policy.snapshot_store import SnapshotStore
from services.store.append import append_local
from tests.builders import recharge, wait_for


async def test_the_snapshot_leaves_the_reservations_history_out(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Every hold ever made stays in the reservations table; a policy (re)loading its snapshot
    must not read them all (its memory and reload time would grow with the history)."""
    async with pool.acquire() as conn, conn.transaction():
        await append_local(conn, [decode_http_object(recharge("acct_s", 100))])
    reservations = Reservations(pool, ttl_seconds=60)
    loop = asyncio.get_running_loop()
    holds = [_HoldRequest("acct_s", 10, None, "test", loop.create_future()) for _ in range(3)]
    try:
        await reservations._commit_holds(holds)
    finally:
        await reservations.close()
    assert all(h.future.result().reservation is not None for h in holds)
    store = SnapshotStore(database_url)
    task = asyncio.create_task(store.run())
    try:
        await wait_for(lambda: _loaded(store), timeout=30, what="the snapshot")
        snapshot = store.snapshot
        assert snapshot is not None
        assert snapshot.accounts["acct_s"].held == 30
        assert store.state.reservations == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _loaded(store: SnapshotStore) -> bool:
    return store.snapshot is not None
