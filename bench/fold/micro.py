"""Per-event CPU cost of each in-Python step of the fold, measured on produced values.

These run the same functions the ledger runs, one step at a time, on a sample of the
benchmark's own records, so the fold's per-event budget can be split without a sampler.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.bindings.kafka import KafkaMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from services.contract.cloudevent import canonical_json, decode_kafka, event_content, to_event
from services.contract.events import EVENT_TYPES, Event
from services.ledger import ingest
from services.ledger.chain import chain_hash, payload_hash
from services.ledger.fold import State, fold


@dataclass(frozen=True, slots=True)
class Cost:
    step: str
    micros_per_event: float
    note: str


def _timed(samples: int, action: Callable[[], Any], repeat: int = 3) -> float:
    """Best of `repeat` runs of `action` (which processes `samples` items), in µs per item."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best / samples * 1e6


def per_event_costs(values: list[bytes]) -> list[Cost]:
    """Split the in-Python part of the fold into its steps, µs per event (best of 3)."""
    n = len(values)
    fmt = JSONFormat()
    loads = json.loads
    messages = [KafkaMessage({}, None, value) for value in values]
    sdk_events = [from_structured(m, fmt, CloudEvent) for m in messages]
    events: list[Event] = [decode_kafka((), value) for value in values]
    payloads = [canonical_json(event_content(e)) for e in events]
    digests = [payload_hash(p) for p in payloads]
    raw_data = [e.raw_data for e in events]
    model = EVENT_TYPES[events[0].type]
    records = [ingest.Incoming("t", 0, i, (), v) for i, v in enumerate(values)]
    now = datetime.now(UTC)

    def chain() -> None:
        prev = "0" * 64
        for i, d in enumerate(digests):
            prev = chain_hash(prev, i + 1, d)

    def event_tuples() -> None:
        # What apply_batch builds per applied event for COPY (without the hashing).
        for i, e in enumerate(events):
            _ = (i, e.id, e.type, e.source, e.subject, e.time or now, now, -1,
                 payloads[i].decode(), digests[i], "p", "h", "t", 0, i)  # fmt: skip

    costs = [
        Cost("json.loads (the raw baseline's work)", _timed(n, lambda: [loads(v) for v in values]),
             "stdlib json"),
        Cost("decode_all (whole decode step)", _timed(n, lambda: ingest.decode_all(records)),
             "= SDK parse + to_event + wrappers"),
        Cost("  SDK from_structured", _timed(n, lambda: [from_structured(m, fmt, CloudEvent)
                                                        for m in messages]),
             "cloudevents JSONFormat.read + CloudEvent(...) validation"),
        Cost("  to_event (checks + pydantic)", _timed(n, lambda: [to_event(c) for c in sdk_events]),
             "type/subject checks, model_validate, Event()"),
        Cost("    pydantic model_validate", _timed(n, lambda: [model.model_validate(d)
                                                              for d in raw_data]),
             "AccountUsageRecorded"),
        Cost("canonical_json(event_content)", _timed(n, lambda: [canonical_json(event_content(e))
                                                                for e in events]),
             "json.dumps sort_keys + isoformat of time"),
        Cost("payload_hash (sha256)", _timed(n, lambda: [payload_hash(p) for p in payloads]),
             "content hash"),
        Cost("chain_hash (sha256)", _timed(n, chain), "f-string + sha256"),
        Cost("fold (pure)", _timed(n, lambda: fold(State(), events, 1)),
             "replace() of a frozen Account per event"),
        Cost("COPY tuple building", _timed(n, event_tuples), "tuple + payload.decode()"),
    ]  # fmt: skip
    return costs
