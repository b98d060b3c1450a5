"""Prometheus metrics of the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.contract.cloudevent import (
    BAD_DATA,
    ID_CONFLICT,
    INVALID_JSON,
    NOT_CLOUDEVENT,
    UNKNOWN_TYPE,
)

if TYPE_CHECKING:
    from services.ledger.ingest import BatchResult

EVENTS_APPLIED = Counter("quota_ledger_events_applied_total", "Events folded into the projections")
EVENTS_DUPLICATE = Counter(
    "quota_ledger_events_duplicate_total", "Events skipped because their id was already applied"
)
EVENTS_QUARANTINED = Counter(
    "quota_ledger_events_quarantined_total", "Events quarantined instead of applied", ["code"]
)
# Every code exported from the start (at 0), so the first quarantined event is an increase.
for _code in (INVALID_JSON, NOT_CLOUDEVENT, UNKNOWN_TYPE, BAD_DATA, ID_CONFLICT):
    EVENTS_QUARANTINED.labels(code=_code)
RECORDS_CONSUMED = Counter("quota_ledger_records_consumed_total", "Kafka records processed")
BATCH_FAILURES = Counter(
    "quota_ledger_batch_failures_total", "Batches rolled back and retried after an error"
)
BATCH_SECONDS = Histogram(
    "quota_ledger_batch_seconds",
    "Time to decode and commit one batch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
POSITION = Gauge("quota_ledger_position", "Last position committed by this process")
KEY_OPERATIONS = Counter(
    "quota_ledger_key_operations_total",
    "Key lifecycle operations applied through the key API (issue, rotate, revoke)",
    ["operation"],
)


def record_batch(result: BatchResult, records: int, seconds: float) -> None:
    EVENTS_APPLIED.inc(result.applied)
    EVENTS_DUPLICATE.inc(result.duplicates)
    for code, count in result.quarantined.items():
        EVENTS_QUARANTINED.labels(code=code).inc(count)
    RECORDS_CONSUMED.inc(records)
    BATCH_SECONDS.observe(seconds)
    POSITION.set(result.position)


CONSUMER_LAG = Gauge(
    "quota_ledger_consumer_lag",
    "Records on the owned partitions not yet applied (high watermark - next offset)",
)
SECONDS_SINCE_COMMIT = Gauge(
    "quota_ledger_seconds_since_last_commit",
    "Seconds since this process last committed a batch (since start when it has not)",
)


def watch(lag: Callable[[], int], last_commit: Callable[[], float]) -> None:
    """Compute the consumer's lag (records) and the age of its last commit (from its
    monotonic time) at each scrape."""
    CONSUMER_LAG.set_function(lambda: float(lag()))
    SECONDS_SINCE_COMMIT.set_function(lambda: time.monotonic() - last_commit())
