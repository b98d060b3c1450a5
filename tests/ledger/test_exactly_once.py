"""Exactly-once under crashes and rebalances, with real `quota ledger` processes.

The ledger is SIGKILLed mid-stream and restarted, two ledgers split the topic as one consumer
group and one of them dies, and a stale owner's batch is fenced. After each, the store must hold
every event exactly once, in a gap-free, hash-chained order, with the balances the events add up
to and the offsets at the end of every partition.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from services.ledger import ingest, offset_store
from services.settings import Settings
from services.store import db, event_store
from services.store.chain import GENESIS_HASH, chain_hash
from tests.builders import recharge, structured, usage, wait_for
from tests.processes import QuotaProcess, QuotaProcesses

ACCOUNTS = 200

# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    value: bytes


@dataclass(slots=True)
class Workload:
    """Usage and recharge events over many accounts, with what they must add up to."""

    rng: random.Random
    accounts: int = ACCOUNTS
    balances: dict[str, int] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)
    sent: list[Record] = field(default_factory=list)
    unique: int = 0
    duplicates: int = 0

    def events(self, count: int, *, duplicates: int = 0, prefix: str = "evt") -> list[Record]:
        """`count` new events, plus `duplicates` resends of earlier ones (identical bytes),
        each placed somewhere after its original."""
        fresh: list[Record] = []
        for index in range(count):
            account = f"acct_{self.rng.randrange(self.accounts):04d}"
            event_id = f"{prefix}-{index:06d}"
            if self.rng.random() < 0.4:
                amount = self.rng.randint(1, 1_000)
                event = recharge(account, amount, event_id=event_id)
                self.balances[account] = self.balances.get(account, 0) + amount
            else:
                amount = self.rng.randint(1, 500)
                event = usage(account, amount, event_id=event_id)
                self.balances[account] = self.balances.get(account, 0) - amount
            self.order.setdefault(account, []).append(event_id)
            fresh.append(Record(account.encode(), structured(event)))
        base = len(self.sent)
        pool = self.sent + fresh
        keyed: list[tuple[float, Record]] = [(float(base + i), r) for i, r in enumerate(fresh)]
        for _ in range(duplicates):
            original = self.rng.randrange(len(pool))
            after = max(original, base) + 0.5
            keyed.append((self.rng.uniform(after, base + len(fresh)), pool[original]))
        batch = [record for _, record in sorted(keyed, key=lambda item: item[0])]
        self.sent.extend(fresh)
        self.unique += count
        self.duplicates += duplicates
        return batch


async def produce_records(
    bootstrap: str, topic: str, records: Sequence[Record], *, chunk: int = 5_000
) -> dict[int, int]:
    """Send in chunks (send() per record, then one flush); return the end offset of every
    partition written to."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        for start in range(0, len(records), chunk):
            futures = [
                await producer.send(topic, key=record.key, value=record.value)
                for record in records[start : start + chunk]
            ]
            await producer.flush()
            for future in futures:
                metadata = future.result()
                ends[metadata.partition] = max(ends.get(metadata.partition, 0), metadata.offset + 1)
    finally:
        await producer.stop()
    return ends


# --------------------------------------------------------------------------- ledger processes


def consumer_owner(ledger: QuotaProcess) -> str | None:
    """The consumer's owner id (as in `consumer_offsets.owner`), from its start log line."""
    for line in ledger.log_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "consumer started":
            owner = entry.get("owner")
            return owner if isinstance(owner, str) else None
    return None


async def wait_for_owner(fleet: QuotaProcesses, ledger: QuotaProcess) -> str:
    async def started() -> bool:
        fleet.check_alive()
        return consumer_owner(ledger) is not None

    await wait_for(started, timeout=30, what=f"ledger {ledger.name} to start consuming")
    owner = consumer_owner(ledger)
    assert owner is not None
    return owner


# --------------------------------------------------------------------------- the invariants


async def head(pool: asyncpg.Pool) -> event_store.Head:
    async with pool.acquire() as conn:
        return await event_store.read_head(conn)


async def offsets(pool: asyncpg.Pool, settings: Settings) -> dict[int, int]:
    async with pool.acquire() as conn:
        return await offset_store.stored_offsets(conn, settings.consumer_group, settings.topic)


async def wait_until_applied(
    pool: asyncpg.Pool,
    settings: Settings,
    fleet: QuotaProcesses,
    unique: int,
    ends: dict[int, int],
) -> None:
    """Wait until the head reaches `unique` and every partition's offset its end."""

    async def done() -> bool:
        fleet.check_alive()
        return (await head(pool)).position >= unique and await offsets(pool, settings) == ends

    await wait_for(done, timeout=90, what=f"position {unique} and offsets {ends}")


async def assert_exactly_once(
    pool: asyncpg.Pool, settings: Settings, work: Workload, ends: dict[int, int]
) -> None:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT position, event_id, subject, payload, content_hash, prev_hash, hash
            FROM event_store ORDER BY position
            """
        )
        balances = {
            r["account_id"]: r["balance"]
            for r in await conn.fetch("SELECT account_id, balance FROM accounts")
        }
        ledger_head = await event_store.read_head(conn)
        stored = await offset_store.stored_offsets(conn, settings.consumer_group, settings.topic)
        rejected = await conn.fetchval("SELECT count(*) FROM rejected_events")

    ids = [row["event_id"] for row in rows]
    assert len(ids) == work.unique, f"{len(ids)} events stored, {work.unique} sent"
    assert len(set(ids)) == len(ids), "an event id is stored twice"
    expected_ids = {event_id for seq in work.order.values() for event_id in seq}
    assert set(ids) == expected_ids
    assert [row["position"] for row in rows] == list(range(1, work.unique + 1))

    prev = GENESIS_HASH
    for row in rows:
        payload: str = row["payload"]
        content_hash = hashlib.sha256(payload.encode()).hexdigest()
        assert row["content_hash"] == content_hash, f"content hash at {row['position']}"
        assert json.loads(payload)["id"] == row["event_id"]
        assert row["prev_hash"] == prev, f"chain broken at {row['position']}"
        assert row["hash"] == chain_hash(prev, row["position"], content_hash)
        prev = row["hash"]
    assert ledger_head.position == work.unique
    assert ledger_head.hash == prev

    by_subject: dict[str, list[str]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row["event_id"])
    assert by_subject == work.order, "an account's events were applied out of order"
    assert balances == work.balances

    assert ledger_head.duplicates == work.duplicates
    assert rejected == 0
    assert stored == ends


# --------------------------------------------------------------------------- the tests

#: Whether a ledger is inside a batch transaction (its only multi-statement transaction).
OPEN_TRANSACTIONS = """
    SELECT count(*) > 0 FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND state = 'idle in transaction'
"""


@pytest.mark.timeout(240)
async def test_sigkill_mid_stream_applies_every_event_once(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    work = Workload(random.Random(20261124))
    records = work.events(50_000, duplicates=500)
    ends = await produce_records(settings.kafka_bootstrap, settings.topic, records)
    assert sum(ends.values()) == len(records)
    assert len(ends) == 4, "the keys should spread over every partition"

    first = quota_processes.start("ledger", "first", batch_max_records=1_000)

    async def a_third_applied_and_a_batch_open() -> bool:
        quota_processes.check_alive()
        if (await head(pool)).position < work.unique // 3:
            return False
        async with pool.acquire() as conn:
            return bool(await conn.fetchval(OPEN_TRANSACTIONS))

    await wait_for(
        a_third_applied_and_a_batch_open,
        timeout=60,
        what="a third of the stream to be applied, with a batch in flight",
    )
    first.sigkill()
    at_kill = (await head(pool)).position
    assert at_kill < work.unique, "the ledger finished before it could be killed mid-stream"

    quota_processes.start("ledger", "second", batch_max_records=1_000)
    await wait_until_applied(pool, settings, quota_processes, work.unique, ends)
    await assert_exactly_once(pool, settings, work, ends)


@pytest.mark.timeout(240)
async def test_two_ledgers_in_one_group_split_partitions_and_apply_each_event_once(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    work = Workload(random.Random(7))
    a = quota_processes.start("ledger", "a", batch_max_records=500)
    b = quota_processes.start("ledger", "b", batch_max_records=500)
    owner_a = await wait_for_owner(quota_processes, a)
    owner_b = await wait_for_owner(quota_processes, b)

    ends = await produce_records(
        settings.kafka_bootstrap, settings.topic, work.events(10_000, duplicates=100, prefix="one")
    )

    async def split() -> bool:
        quota_processes.check_alive()
        async with pool.acquire() as conn:
            owners = await conn.fetch(
                "SELECT DISTINCT owner FROM consumer_offsets WHERE group_id = $1",
                settings.consumer_group,
            )
        return {row["owner"] for row in owners} == {owner_a, owner_b}

    await wait_for(split, timeout=60, what="both ledgers to own partitions")
    await wait_until_applied(pool, settings, quota_processes, work.unique, ends)
    await assert_exactly_once(pool, settings, work, ends)

    async with pool.acquire() as conn:
        before = {
            row["partition"]: (row["owner"], row["epoch"])
            for row in await conn.fetch(
                "SELECT partition, owner, epoch FROM consumer_offsets WHERE group_id = $1",
                settings.consumer_group,
            )
        }
    orphaned = sorted(p for p, (owner, _) in before.items() if owner == owner_a)
    assert orphaned, "ledger a owns no partition"
    a.sigkill()

    more = await produce_records(
        settings.kafka_bootstrap, settings.topic, work.events(10_000, duplicates=100, prefix="two")
    )
    ends = {p: max(ends.get(p, 0), more.get(p, 0)) for p in ends.keys() | more.keys()}

    async def taken_over() -> bool:
        quota_processes.check_alive()
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT owner FROM consumer_offsets WHERE group_id = $1", settings.consumer_group
            )
        return len(rows) == 4 and {row["owner"] for row in rows} == {owner_b}

    await wait_for(taken_over, timeout=90, what="ledger b to take over every partition")
    await wait_until_applied(pool, settings, quota_processes, work.unique, ends)
    await assert_exactly_once(pool, settings, work, ends)

    async with pool.acquire() as conn:
        after = {
            row["partition"]: row["epoch"]
            for row in await conn.fetch(
                "SELECT partition, epoch FROM consumer_offsets WHERE group_id = $1",
                settings.consumer_group,
            )
        }
    for partition in orphaned:
        assert after[partition] > before[partition][1], f"partition {partition} not re-claimed"
    assert b.alive()


@pytest.mark.timeout(240)
async def test_a_ledger_joining_mid_stream_takes_partitions_without_double_applying(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    work = Workload(random.Random(99))
    ends = await produce_records(
        settings.kafka_bootstrap, settings.topic, work.events(40_000, duplicates=400)
    )
    a = quota_processes.start("ledger", "a", batch_max_records=500)
    owner_a = await wait_for_owner(quota_processes, a)

    async def started_applying() -> bool:
        quota_processes.check_alive()
        return (await head(pool)).position >= 1_000

    await wait_for(started_applying, timeout=60, what="ledger a to start applying")
    b = quota_processes.start("ledger", "b", batch_max_records=500)
    owner_b = await wait_for_owner(quota_processes, b)

    async def split() -> bool:
        quota_processes.check_alive()
        async with pool.acquire() as conn:
            owners = await conn.fetch(
                "SELECT DISTINCT owner FROM consumer_offsets WHERE group_id = $1",
                settings.consumer_group,
            )
        return {row["owner"] for row in owners} == {owner_a, owner_b}

    await wait_for(split, timeout=60, what="ledger b to take partitions from a")
    at_split = (await head(pool)).position
    assert at_split < work.unique, "the stream was applied before the rebalance"

    await wait_until_applied(pool, settings, quota_processes, work.unique, ends)
    await assert_exactly_once(pool, settings, work, ends)


@pytest.mark.timeout(240)
async def test_a_fenced_ledger_drops_stolen_partitions_and_a_rebalance_recovers_them(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    """Another owner claims two partitions under a running ledger: its next batch is fenced
    and rolled back, it goes on with the partitions it still owns and applies nothing more
    from the stolen ones, and the next rebalance gives them back and everything is applied."""
    work = Workload(random.Random(4242))
    ends = await produce_records(
        settings.kafka_bootstrap, settings.topic, work.events(30_000, duplicates=300)
    )
    a = quota_processes.start("ledger", "a", batch_max_records=500)
    await wait_for_owner(quota_processes, a)

    async def under_way() -> bool:
        quota_processes.check_alive()
        return (await head(pool)).position >= 3_000

    await wait_for(under_way, timeout=60, what="ledger a to be under way")
    stolen = [0, 1]
    kept = [2, 3]
    async with pool.acquire() as conn:
        claims = await offset_store.claim_partitions(
            conn, settings.consumer_group, settings.topic, stolen, "thief"
        )
    stolen_at = {p: claims[p].next_offset or 0 for p in stolen}
    assert all(stolen_at[p] < ends[p] for p in stolen), "nothing left to steal"

    async def fenced_and_kept_going() -> bool:
        quota_processes.check_alive()
        if "offset commit fenced" not in a.log_text():
            return False
        stored = await offsets(pool, settings)
        return all(stored[p] == ends[p] for p in kept)

    await wait_for(fenced_and_kept_going, timeout=60, what="a fence, then the kept partitions")
    async with pool.acquire() as conn:
        late = await conn.fetchval(
            """
            SELECT count(*) FROM event_store
            WHERE (partition = $1 AND kafka_offset >= $2) OR (partition = $3 AND kafka_offset >= $4)
            """,
            stolen[0],
            stolen_at[stolen[0]],
            stolen[1],
            stolen_at[stolen[1]],
        )
        rows = await conn.fetch(
            """
            SELECT partition, next_offset, owner FROM consumer_offsets
            WHERE group_id = $1 AND partition = ANY($2::int[])
            """,
            settings.consumer_group,
            stolen,
        )
    assert late == 0, "a fenced ledger applied events from partitions it no longer owns"
    assert {r["partition"]: (r["next_offset"], r["owner"]) for r in rows} == {
        p: (claims[p].next_offset if claims[p].next_offset is not None else -1, "thief")
        for p in stolen
    }
    assert (await head(pool)).position < work.unique

    quota_processes.start("ledger", "b", batch_max_records=500)
    await wait_until_applied(pool, settings, quota_processes, work.unique, ends)
    await assert_exactly_once(pool, settings, work, ends)


@pytest.mark.timeout(240)
async def test_a_stale_epoch_is_fenced_and_its_batch_leaves_nothing_behind(
    database_url: str, pool: asyncpg.Pool
) -> None:
    group, topic = "ledger-fence", "quota.events.fence"
    notices: list[dict[str, Any]] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(
        db.CHANGES_CHANNEL, lambda *args: notices.append(json.loads(args[3]))
    )

    def batch(events: Sequence[dict[str, Any]], first_offset: int) -> list[ingest.Decoded]:
        return ingest.decode_all(
            [
                ingest.Incoming(topic, 0, first_offset + i, (), structured(event))
                for i, event in enumerate(events)
            ]
        )

    try:
        async with pool.acquire() as conn:
            stale = (await offset_store.claim_partitions(conn, group, topic, [0], "owner-a"))[0]
            current = (await offset_store.claim_partitions(conn, group, topic, [0], "owner-b"))[0]
            assert stale.next_offset is None and current.next_offset is None
            assert current.epoch > stale.epoch

            # Committing offsets alone with the stale epoch is refused...
            with pytest.raises(offset_store.OffsetFenced):
                async with conn.transaction():
                    await offset_store.commit_offsets(conn, group, topic, {0: (5, stale.epoch)})

            # ...while the current owner applies its batch.
            first = recharge("acct_f", 100, event_id="f-1")
            async with conn.transaction():
                result = await ingest.apply_batch(
                    conn, batch([first], 0), {(topic, 0): (1, current.epoch)}, group
                )
            assert result.applied == 1
            head_after_first = await event_store.read_head(conn)
            assert (head_after_first.position, head_after_first.duplicates) == (1, 0)

            # The stale owner's batch: new events, a new account, a duplicate, a poison record.
            stale_batch = [
                *batch([recharge("acct_f", 50, event_id="f-2")], 1),
                *batch([first], 2),
                *batch([usage("acct_g", 7, event_id="f-3")], 3),
                *ingest.decode_all([ingest.Incoming(topic, 0, 4, (), b"{not json")]),
            ]
            with pytest.raises(offset_store.OffsetFenced):
                async with conn.transaction():
                    await ingest.apply_batch(
                        conn, stale_batch, {(topic, 0): (5, stale.epoch)}, group
                    )

            assert await conn.fetchval("SELECT count(*) FROM event_store") == 1
            assert await conn.fetchval("SELECT event_id FROM event_store") == "f-1"
            accounts = await conn.fetch("SELECT account_id, balance, position FROM accounts")
            assert [(r["account_id"], r["balance"], r["position"]) for r in accounts] == [
                ("acct_f", 100, 1)
            ]
            assert await event_store.read_head(conn) == head_after_first
            assert await conn.fetchval("SELECT count(*) FROM rejected_events") == 0
            row = await conn.fetchrow(
                "SELECT next_offset, epoch, owner FROM consumer_offsets WHERE group_id = $1",
                group,
            )
            assert (row["next_offset"], row["epoch"], row["owner"]) == (
                1,
                current.epoch,
                "owner-b",
            )

            # The current owner goes on from there; its notification is the next one delivered.
            async with conn.transaction():
                await ingest.apply_batch(
                    conn,
                    batch([recharge("acct_f", 1, event_id="f-4")], 1),
                    {(topic, 0): (2, current.epoch)},
                    group,
                )

        async def notified() -> bool:
            return len(notices) >= 2

        await wait_for(notified, timeout=10, what="two change notifications")
        assert [n["position"] for n in notices] == [1, 2]
    finally:
        await listener.close()


async def test_a_batch_written_before_its_ids_are_looked_up_finds_stored_ones_after_all(
    pool: asyncpg.Pool,
) -> None:
    """`apply_batch` writes a batch without looking its ids up; one holding an event stored
    before is rolled back to a savepoint and folded again after the lookup, with the same
    duplicates and id conflicts as when looked up first."""
    group, topic = "ledger-optimistic", "quota.events.optimistic"

    def batch(events: Sequence[dict[str, Any]], first_offset: int) -> list[ingest.Decoded]:
        records = [
            ingest.Incoming(topic, 0, first_offset + i, (), structured(event))
            for i, event in enumerate(events)
        ]
        return ingest.decode_all(records)

    async def apply(
        decoded: list[ingest.Decoded], next_offset: int, *, optimistic: bool = True
    ) -> ingest.BatchResult:
        async with pool.acquire() as conn, conn.transaction():
            claim = (await offset_store.claim_partitions(conn, group, topic, [0], "me"))[0]
            return await ingest.apply_batch(
                conn, decoded, {(topic, 0): (next_offset, claim.epoch)}, group,
                optimistic=optimistic,
            )  # fmt: skip

    first = recharge("acct_o", 100, event_id="o-1")
    clean = await apply(batch([first, usage("acct_o", 5, event_id="o-2")], 0), 2)
    assert (clean.applied, clean.looked_up) == (2, False)

    again = [
        recharge("acct_o", 50, event_id="o-3"),
        first,  # stored before: a duplicate
        recharge("acct_o", 999, event_id="o-2"),  # stored id, other content: a conflict
        usage("acct_o", 7, event_id="o-4"),
    ]
    result = await apply(batch(again, 2), 6)
    assert (result.applied, result.duplicates, result.looked_up) == (2, 1, True)
    assert result.quarantined == {"id_conflict": 1}
    # Looked up first (as after such a batch): nothing stored among these, so the next is not.
    fresh = await apply(batch([usage("acct_o", 1, event_id="o-5")], 6), 7, optimistic=False)
    assert (fresh.applied, fresh.looked_up) == (1, False)

    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT position, event_id FROM event_store ORDER BY position")
        assert [(r["position"], r["event_id"]) for r in rows] == [
            (1, "o-1"), (2, "o-2"), (3, "o-3"), (4, "o-4"), (5, "o-5"),
        ]  # fmt: skip
        assert (
            await conn.fetchval("SELECT balance FROM accounts WHERE account_id = 'acct_o'")
            == 100 - 5 + 50 - 7 - 1
        )
        head = await event_store.read_head(conn)
        assert (head.position, head.duplicates) == (5, 1)
