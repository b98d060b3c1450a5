"""The Kafka edge of the ledger: poll a batch, apply it in one transaction, repeat.

Offsets live in PostgreSQL beside the state (auto-commit is off). On assignment the consumer
claims its partitions in the database, which fences any previous owner, and seeks to the
stored offsets.

The loop is supervised (`services.supervise`): a failed commit, resync, claim or poll is
retried with capped exponential backoff, counted in `quota_loop_failures_total{loop="consumer"}`
and shown in `health` (read by `/readyz` and the heartbeat), never silently fatal. Offsets are
re-read from the database after every failed commit, so nothing is lost or applied twice. A
broker client that broke is closed and built anew. Only an exception of no known kind ends
`run()`; the ledger's lifespan then exits the process with a log line saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition

from services import tracing
from services.ledger import ingest, metrics, offset_store
from services.settings import Settings
from services.store import event_store, phases
from services.supervise import DATABASE_ERRORS, TRANSIENT_ERRORS, LoopHealth

log = structlog.get_logger("quota.ledger.consumer")

DECODE_CHUNK = 500
#: Commits in a row failing with an unexpected exception before the process gives up.
UNKNOWN_FAILURE_LIMIT = 20


@dataclass(slots=True)
class _Prepared:
    """A decoded batch waiting for its transaction, with the epochs it was read under."""

    decoded: list[ingest.Decoded]
    epochs: dict[tuple[str, int], int]
    started: float


@dataclass(frozen=True, slots=True)
class CommittedBatch:
    """What `on_commit` hears: the head after the batch, its records, and the time from the
    batch's decode start to its commit."""

    position: int
    records: int
    result: ingest.BatchResult
    seconds: float


@dataclass(slots=True)
class Owned:
    """A partition this consumer owns: the epoch it claimed and the next offset to apply."""

    epoch: int
    next_offset: int


class LedgerConsumer:
    """Folds `settings.topic` into PostgreSQL; several of them share the topic as one group."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        *,
        on_commit: Callable[[CommittedBatch], None] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        #: Called after each batch commits (benchmarks stamp commits with it).
        self.on_commit = on_commit
        self.owner = f"ledger-{uuid.uuid4()}"
        self.owned: dict[TopicPartition, Owned] = {}
        self.position = 0
        #: When a batch last committed (monotonic; the start until one has).
        self.last_commit = time.monotonic()
        self.started = asyncio.Event()
        #: Whether the loop makes progress; `reason` says why not (read by `/readyz`).
        self.health = LoopHealth("consumer")
        self._batch_lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = False
        #: Offsets must be re-read from the database before the next poll (a commit failed).
        self._resync_needed = False
        #: The last batch held events stored before: the next looks its ids up first.
        self._looked_up = False
        #: Assigned partitions whose claim in the database has not succeeded yet.
        self._unclaimed: set[TopicPartition] = set()
        #: The backoff delay a failed commit asked for, waited before the resync.
        self._retry_delay = 0.0
        #: Commits in a row that failed with an exception of no known kind.
        self._unknown_failures = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.consumer_group,
            client_id=self.owner,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=min(3_000, self.settings.kafka_session_timeout_ms // 3),
            # How long the broker may hold a fetch that has no data: an event's way to the
            # policy snapshot waits on it when the topic is quiet.
            fetch_max_wait_ms=self.settings.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )

    async def run(self) -> None:
        """Consume until `stop()`. Transient failures (database, broker) are retried with
        backoff, building a new broker client when the old one broke; anything else raises."""
        while not self._stopping:
            consumer = self._new_consumer()
            self._consumer = consumer
            try:
                await self._start(consumer)
                await self._consume(consumer)
            except TRANSIENT_ERRORS as exc:
                delay = self.health.failed("kafka client", exc)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                self.owned.clear()
                self._unclaimed.clear()

    async def _start(self, consumer: AIOKafkaConsumer) -> None:
        consumer.subscribe([self.settings.topic], listener=_Rebalance(self))
        await consumer.start()
        while True:
            try:
                async with self.pool.acquire() as conn:
                    self.position = max(self.position, (await event_store.read_head(conn)).position)
                break
            except DATABASE_ERRORS as exc:
                await asyncio.sleep(self.health.failed("read head", exc))
        if not self.started.is_set():
            self.started.set()
            # What exists now lives as long as the process: keep it out of every collection.
            gc.collect()
            gc.freeze()
        log.info("consumer started", topic=self.settings.topic, owner=self.owner)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        inflight: asyncio.Task[bool] | None = None
        try:
            while not self._stopping:
                if not await self._recover(consumer):
                    continue
                # Batch N commits in the background while batch N+1 is polled and decoded:
                # PostgreSQL works on one core while Python decodes on the other.
                polled = time.perf_counter()
                batches = await self._poll(consumer)
                if batches:
                    phases.lap("poll", polled)
                prepared = await self._prepare(batches) if batches else None
                if inflight is not None:
                    committed, inflight = await inflight, None
                    if not committed:
                        prepared = None  # offsets are re-read and sought: records come again
                if prepared is not None:
                    inflight = asyncio.create_task(self._commit(consumer, prepared))
                elif not (self._resync_needed or self._unclaimed):
                    self.health.succeeded()  # polled, and nothing is left undone
        finally:
            if inflight is not None:
                with contextlib.suppress(Exception):
                    await inflight

    async def _recover(self, consumer: AIOKafkaConsumer) -> bool:
        """Claim what is assigned but unclaimed, re-read offsets after a failed commit; False
        (after the backoff delay) while the database refuses."""
        if self._retry_delay:
            delay, self._retry_delay = self._retry_delay, 0.0
            await asyncio.sleep(delay)
        try:
            if self._unclaimed:
                async with self._batch_lock:
                    await self._claim(consumer, list(self._unclaimed))
            if self._resync_needed:
                await self._resync(consumer, list(self.owned))
                self._resync_needed = False
        except DATABASE_ERRORS as exc:
            stage = "claim partitions" if self._unclaimed else "resync offsets"
            await asyncio.sleep(self.health.failed(stage, exc))
            return False
        return True

    def lag(self) -> dict[TopicPartition, int]:
        """Records each owned partition is behind the broker's high watermark (when known)."""
        consumer = self._consumer
        lags: dict[TopicPartition, int] = {}
        if consumer is None:
            return lags
        for tp, owned in list(self.owned.items()):
            with contextlib.suppress(Exception):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    lags[tp] = max(0, highwater - owned.next_offset)
        return lags

    async def _poll(
        self, consumer: AIOKafkaConsumer
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """One batch: wait for records, then take what else is already fetched, up to the cap.

        Bigger transactions amortise the commit; an idle topic still commits at once.
        """
        limit = self.settings.batch_max_records
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
            timeout_ms=self.settings.batch_timeout_ms, max_records=limit
        )
        total = sum(len(records) for records in batches.values())
        while batches and total < limit:
            more = await consumer.getmany(timeout_ms=0, max_records=limit - total)
            if not more:
                break
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                total += len(records)
        return batches

    async def stop(self) -> None:
        self._stopping = True

    async def _prepare(
        self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    ) -> _Prepared | None:
        """Pick the records of partitions we own and decode them, yielding now and then so a
        commit in flight can send its next statement."""
        picked = time.perf_counter()
        records: list[ingest.Incoming] = []
        epochs: dict[tuple[str, int], int] = {}
        for tp, messages in batches.items():
            owned = self.owned.get(tp)
            if owned is None:
                continue  # revoked (or fenced) while this batch was in flight
            fresh = [m for m in messages if m.offset >= owned.next_offset]
            if not fresh:
                continue
            for message in fresh:
                records.append(
                    ingest.Incoming(
                        tp.topic,
                        tp.partition,
                        message.offset,
                        tuple(message.headers or ()),
                        message.value,
                    )
                )
            epochs[(tp.topic, tp.partition)] = owned.epoch
        if not records:
            return None
        started = phases.lap("pick", picked)
        decoded: list[ingest.Decoded] = []
        for start in range(0, len(records), DECODE_CHUNK):
            chunk = time.perf_counter()
            decoded.extend(ingest.decode_all(records[start : start + DECODE_CHUNK]))
            phases.lap("decode", chunk)
            await asyncio.sleep(0)
        return _Prepared(decoded, epochs, started)

    async def _commit(self, consumer: AIOKafkaConsumer, prepared: _Prepared) -> bool:
        """Apply a prepared batch in one transaction; False when offsets had to be re-read."""
        async with self._batch_lock:
            # Ownership may have moved since the batch was prepared: keep what is still ours.
            decoded: list[ingest.Decoded] = []
            offsets: dict[tuple[str, int], tuple[int, int]] = {}
            for item in prepared.decoded:
                record = item.record
                assert record is not None
                key = (record.topic, record.partition)
                owned = self.owned.get(TopicPartition(*key))
                if owned is None or owned.epoch != prepared.epochs[key]:
                    continue
                if record.offset < owned.next_offset:
                    continue
                decoded.append(item)
                offsets[key] = (record.offset + 1, owned.epoch)
            if not decoded:
                return True
            try:
                async with self.pool.acquire() as conn:
                    async with conn.transaction():
                        applying = ingest.apply_batch(
                            conn, decoded, offsets, self.settings.consumer_group,
                            optimistic=not self._looked_up,
                        )  # fmt: skip
                        if tracing.TRACER is not None:  # traces on: a `ledger batch` span
                            applying = tracing.batch_span(len(decoded), applying)
                        result = await applying
                        self._looked_up = result.looked_up
                        applied = time.perf_counter()
                    phases.lap("commit", applied)
                    # Committed: heard now, before the connection's reset on release.
                    seconds = time.perf_counter() - prepared.started
                    self._committed(CommittedBatch(result.position, len(decoded), result, seconds))
            except offset_store.OffsetFenced as exc:
                log.warning("offset commit fenced; dropping stale partitions", error=str(exc))
                self._resync_needed = True
                return False
            except Exception as exc:
                # Rolled back: nothing of the batch is stored. Offsets are re-read (and the
                # records fetched again) once the database answers. A failure of no known kind
                # is retried too, its traceback logged; past UNKNOWN_FAILURE_LIMIT of those in
                # a row it is a fault this process cannot survive (the lifespan exits it).
                if not isinstance(exc, DATABASE_ERRORS):
                    self._unknown_failures += 1
                    log.exception(
                        "batch failed with an unexpected error", attempt=self._unknown_failures
                    )
                    if self._unknown_failures >= UNKNOWN_FAILURE_LIMIT:
                        raise
                metrics.BATCH_FAILURES.inc()
                self._retry_delay = self.health.failed("commit batch", exc)
                self._resync_needed = True
                return False
            self._unknown_failures = 0
            for (topic, partition), (next_offset, _) in offsets.items():
                self.owned[TopicPartition(topic, partition)].next_offset = next_offset
            self.position = result.position
            self.last_commit = time.monotonic()
            metrics.record_batch(result, len(decoded), seconds)
            if not self._unclaimed:
                self.health.succeeded()
            return True

    def _committed(self, batch: CommittedBatch) -> None:
        """Tell `on_commit`; its failure is logged, never taken for the batch's."""
        if self.on_commit is None:
            return
        try:
            self.on_commit(batch)
        except Exception:
            log.exception("on_commit failed")

    async def _resync(
        self, consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
    ) -> None:
        """Re-read ownership and offsets from the database and seek to them."""
        async with self.pool.acquire() as conn:
            stored = await offset_store.group_offsets(conn, self.settings.consumer_group)
        for tp in list(partitions):
            row = stored.get((tp.topic, tp.partition))
            owned = self.owned.get(tp)
            if row is None or owned is None or row.epoch != owned.epoch:
                self.owned.pop(tp, None)
                continue
            owned.next_offset = max(row.next_offset, 0)
            await _seek(consumer, tp, row.next_offset)

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        partitions = list(assigned)
        async with self._batch_lock:
            self._unclaimed.update(partitions)
            try:
                await self._claim(consumer, partitions)
            except DATABASE_ERRORS as exc:
                # The loop claims them once the database answers; until then their records
                # are skipped (and sought again after the claim).
                self.health.failed("claim partitions", exc)
        log.info("partitions assigned", partitions=sorted(str(tp) for tp in partitions))

    async def _claim(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        """Claim `partitions` in the database (fencing any previous owner) and seek to their
        stored offsets; the caller holds the batch lock."""
        by_topic: dict[str, list[int]] = {}
        for tp in partitions:
            if tp in self._unclaimed:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
        async with self.pool.acquire() as conn:
            for topic, numbers in by_topic.items():
                claims = await offset_store.claim_partitions(
                    conn, self.settings.consumer_group, topic, numbers, self.owner
                )
                for partition, claim in claims.items():
                    tp = TopicPartition(topic, partition)
                    self._unclaimed.discard(tp)
                    if tp not in consumer.assignment():
                        continue  # revoked while the claim was being retried
                    self.owned[tp] = Owned(claim.epoch, claim.next_offset or 0)
                    await _seek(consumer, tp, claim.next_offset)

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._batch_lock:
            for tp in revoked:
                self.owned.pop(tp, None)
                self._unclaimed.discard(tp)
        log.info("partitions revoked", partitions=sorted(str(tp) for tp in revoked))


async def _seek(consumer: AIOKafkaConsumer, tp: TopicPartition, next_offset: int | None) -> None:
    if next_offset is None or next_offset < 0:
        await consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, next_offset)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ledger: LedgerConsumer) -> None:
        self.ledger = ledger

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.ledger.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.ledger.on_assigned(assigned)
