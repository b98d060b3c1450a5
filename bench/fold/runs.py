"""The producer process, the two measured passes (raw consumer, ledger fold with policies
listening), each process's CPU over them, and the checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bench import report
from bench.infra import REJECTED_SQL, say
from services.infra.processes import QuotaProcess, QuotaProcesses
from services.ledger.app import create_app
from services.ledger.audit import verify
from services.ledger.consumer import CommittedBatch, LedgerConsumer
from services.settings import Settings
from services.store import phases
from services.store.event_store import read_head

BACKENDS_SQL: Final = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"


@dataclass(slots=True)
class ProducerProcess:
    """`bench.fold.producer` as a child process: the workload, made once, produced on demand."""

    process: asyncio.subprocess.Process
    #: The workload's totals: events, amount_sum, accounts, value_bytes_mean, client.
    totals: dict[str, Any]

    @property
    def pids(self) -> dict[str, list[int]]:
        return {"producer": [self.process.pid]}

    async def produce(self, topic: str) -> dict[str, Any]:
        """The whole workload to `topic`; the producer's stamps (first_ns, last_ns)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{topic}\n".encode())
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        result: dict[str, Any] = json.loads(line or b"null") or {"unsent": "exited"}
        if result["unsent"] or result["failed"]:
            raise RuntimeError(f"the producer did not deliver everything: {result}")
        return result


@contextlib.asynccontextmanager
async def producer_process(
    bootstrap: str, events: int, accounts: int, seed: int
) -> AsyncIterator[ProducerProcess]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fold.producer", bootstrap, str(events), str(accounts),
        str(seed), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    try:
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError("the producer process exited before making the workload")
        yield ProducerProcess(process, json.loads(line))
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(slots=True)
class Timeline:
    """One consumer's pass in `time.monotonic_ns()` (the producer process's clock too)."""

    #: When its first batch was done, and how many events that batch held.
    first: int = 0
    first_events: int = 0
    last: int = 0
    events: int = 0
    batches: int = 0
    position: int = 0
    #: Each batch's seconds from its decode start to its commit (the fold only).
    batch_seconds: list[float] = field(default_factory=list)

    def batch(self, events: int, position: int) -> None:
        now = time.monotonic_ns()
        if not self.batches:
            self.first, self.first_events = now, events
        self.events += events
        self.batches += 1
        self.last, self.position = now, position

    def as_dict(self, produced: dict[str, Any]) -> dict[str, Any]:
        """Its rates: from the first event produced to its last batch, and steady (from its
        first batch to its last, the events after the first batch)."""
        seconds = (self.last - produced["first_ns"]) / 1e9
        steady = (self.last - self.first) / 1e9
        return {
            "events": self.events, "batches": self.batches,
            "produce_seconds": (produced["last_ns"] - produced["first_ns"]) / 1e9,
            "first_batch_seconds": (self.first - produced["first_ns"]) / 1e9,
            "seconds": seconds, "events_per_second": self.events / seconds,
            "steady_seconds": steady,
            "events_per_second_steady": (self.events - self.first_events) / steady
            if steady > 0 else None,
            "first_produced_ns": produced["first_ns"],
        }  # fmt: skip


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.event.set()


async def _cpu(
    pool: asyncpg.Pool | None, pids: dict[str, list[int]]
) -> dict[str, dict[int, float]]:
    """`report.cpu_of` the named processes and (`pool`) the backends of the bench's database."""
    if pool is not None:
        rows = await pool.fetch(BACKENDS_SQL)
        pids = pids | {"postgres backends": [row["pid"] for row in rows]}
    return report.cpu_of(pids)


async def measured(
    name: str,
    run: Awaitable[tuple[Timeline, dict[str, Any]]],
    pids: dict[str, list[int]],
    pool: asyncpg.Pool | None = None,
) -> dict[str, Any]:
    """A pass (`run`: its timeline and the producer's stamps), with each process's CPU share
    of one core over it."""
    before, started = await _cpu(pool, pids), time.perf_counter()
    timeline, produced = await run
    seconds = time.perf_counter() - started
    shares = report.cpu_shares(before, await _cpu(pool, pids), seconds)
    say("bench.fold", f"{name}: {timeline.events:,} events, {timeline.batches:,} batches")
    return timeline.as_dict(produced) | {"cpu_share": shares, "cpu_window_seconds": seconds}


async def run_raw(
    settings: Settings,
    producer: ProducerProcess,
    max_records: int,
    timeout: float,
    others: dict[str, list[int]],
) -> dict[str, Any]:
    """A plain consumer with the ledger's fetch settings, joined to a fresh topic before the
    producer starts: getmany and json.loads of every value, until it has them all."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=min(3_000, settings.kafka_session_timeout_ms // 3),
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024,
    )  # fmt: skip
    assigned, timeline, expected = _Assigned(), Timeline(), producer.totals["events"]
    joining = time.perf_counter()
    consumer.subscribe([settings.topic], listener=assigned)
    await consumer.start()

    async def consume() -> tuple[Timeline, dict[str, Any]]:
        production = asyncio.create_task(producer.produce(settings.topic))
        loads = json.loads
        while timeline.events < expected:
            batches = await consumer.getmany(timeout_ms=200, max_records=max_records)
            count = 0
            for messages in batches.values():
                for message in messages:
                    loads(message.value)
                count += len(messages)
            if count:
                timeline.batch(count, timeline.events + count)
        return timeline, await production

    try:
        async with asyncio.timeout(timeout):
            while not assigned.event.is_set():  # the topic is empty until the producer starts
                await consumer.getmany(timeout_ms=50)
            for tp in consumer.assignment():
                await consumer.position(tp)  # the offset reset, done before the clock starts
            join = time.perf_counter() - joining
            pids = {"raw consumer (this process)": [os.getpid()]}
            raw = await measured("raw", consume(), pids | producer.pids | others)
    finally:
        await consumer.stop()
    # (Counted here, not with end offsets: Tansu 0.6 reports a partition's end offset wrongly.)
    if timeline.events != expected:
        raise RuntimeError(f"the raw consumer read {timeline.events} records, expected {expected}")
    return raw | {"join_seconds": join}


async def _policy_positions(client: httpx.AsyncClient, policies: list[QuotaProcess]) -> int:
    """The lowest position the policies' snapshots have seen (`/readyz`)."""
    answers = await asyncio.gather(*(client.get(f"{p.url}/readyz") for p in policies))
    return min(int(answer.json()["position"]) for answer in answers)


async def run_fold(
    settings: Settings,
    producer: ProducerProcess,
    fleet: QuotaProcesses,
    policies: int,
    pool: asyncpg.Pool,
    timeout: float,
    others: dict[str, list[int]],
) -> dict[str, Any]:
    """The ledger as `quota ledger` runs it (`create_app` and its lifespan, in this process)
    with `policies` `quota policy` processes listening, all started before the producer; its
    batches heard through `on_commit`, the policies' positions read from `/readyz` every
    100 ms while the ledger folds, then every 5 ms until both have the last event."""
    timeline, target = Timeline(), producer.totals["events"]
    done = asyncio.Event()

    def committed(batch: CommittedBatch) -> None:
        timeline.batch(batch.records, batch.position)
        timeline.batch_seconds.append(batch.seconds)
        if batch.position >= target:
            done.set()

    joining = time.perf_counter()
    app = create_app(settings, on_commit=committed)
    async with app.router.lifespan_context(app), httpx.AsyncClient(timeout=10) as client:
        ledger: LedgerConsumer = app.state.ledger.consumer
        async with asyncio.timeout(120):
            while len(ledger.owned) < settings.topic_partitions:  # assigned and claimed
                await asyncio.sleep(0.01)
        join = time.perf_counter() - joining
        listening = [fleet.start("policy", f"fold-policy-{i}") for i in range(policies)]
        for policy in listening:
            await fleet.wait_ready(policy)
        behind, reached = 0, 0

        async def fold() -> tuple[Timeline, dict[str, Any]]:
            nonlocal behind, reached
            production = asyncio.create_task(producer.produce(settings.topic))
            while not reached:
                fleet.check_alive()
                position = timeline.position
                seen = await _policy_positions(client, listening) if listening else position
                behind = max(behind, position - seen)
                if seen >= target:
                    reached = time.monotonic_ns()
                elif done.is_set():
                    await asyncio.sleep(0.005)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.1)
            return timeline, await production

        pids = {"ledger (this process)": [os.getpid()]} | producer.pids | others
        pids |= {p.name: [p.process.pid] for p in listening}
        phases.SECONDS.clear()
        async with asyncio.timeout(timeout):
            result = await measured("fold", fold(), pids, pool)
    return result | {
        "join_seconds": join,
        "batch_ms": report.summarize([s * 1000 for s in timeline.batch_seconds]),
        "phases": dict(phases.SECONDS),
        "policies": {
            "count": policies, "position": target, "max_events_behind": behind,
            "seconds": (reached - result["first_produced_ns"]) / 1e9,
            "after_ledger_ms": (reached - timeline.last) / 1e6,
        },
    }  # fmt: skip


async def check(
    pool: asyncpg.Pool, events: int, amount_sum: int, accounts: int
) -> list[tuple[str, object, object]]:
    """(check, expected, found): PostgreSQL against what was produced, and the audit's `verify`."""
    async with pool.acquire() as conn:
        audit = await verify(conn)
        return [
            ("ledger_head.position", events, (await read_head(conn)).position),
            ("count(event_store)", events, await conn.fetchval("SELECT count(*) FROM event_store")),
            ("sum(accounts.balance)", -amount_sum,
             await conn.fetchval("SELECT coalesce(sum(balance), 0)::bigint FROM accounts")),
            ("count(accounts)", accounts, await conn.fetchval("SELECT count(*) FROM accounts")),
            ("count(rejected_events)", 0, await conn.fetchval(REJECTED_SQL)),
            ("verify: chain and re-fold ok", [True, events], [audit.ok, audit.events_checked]),
        ]  # fmt: skip
