"""Per-event CPU cost of each in-Python step of the fold, measured on produced values.

The rows marked "ledger" run the functions the ledger runs now (whatever `services/` holds),
one step at a time, on a sample of the benchmark's own records, so the fold's per-event
budget can be split without a sampler. Rows marked "reference" time alternatives or the
parts the ledger's functions are built from, for comparison.
"""

from __future__ import annotations

import gc
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.bindings.kafka import KafkaMessage, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from services.contract.cloudevent import canonical_json, decode_kafka, event_content
from services.contract.events import EVENT_TYPES, Event
from services.ledger import ingest
from services.ledger.chain import chain_hash, payload_hash
from services.ledger.fold import State, fold

#: The RFC 3339 parser the CloudEvents SDK uses (python-dateutil ships no type stubs).
isoparse: Callable[[str], datetime] = importlib.import_module("dateutil.parser").isoparse


@dataclass(frozen=True, slots=True)
class Cost:
    step: str
    micros_per_event: float
    note: str


def _sdk_attributes(parsed: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """A parsed structured-mode event as the SDK's CloudEvent takes it: (attributes, data)."""
    attributes = {name: value for name, value in parsed.items() if name != "data"}
    if isinstance(attributes.get("time"), str):
        attributes["time"] = datetime.fromisoformat(attributes["time"])
    return attributes, parsed.get("data")


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
    parsed = [loads(value) for value in values]
    attributes = [_sdk_attributes(p) for p in parsed]
    times = [p["time"] for p in parsed if isinstance(p.get("time"), str)]
    events: list[Event] = [decode_kafka((), value) for value in values]
    contents = [event_content(e) for e in events]
    payloads = [canonical_json(c) for c in contents]
    digests = [payload_hash(p) for p in payloads]
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
        Cost("json.loads", _timed(n, lambda: [loads(v) for v in values]),
             "reference: the raw baseline's per-record work"),
        Cost("ingest.decode_all", _timed(n, lambda: ingest.decode_all(records)),
             "ledger: the whole decode step"),
        Cost("  SDK from_structured", _timed(n, lambda: [from_structured(m, fmt, CloudEvent)
                                                        for m in messages]),
             "reference: the CloudEvents SDK's structured-mode reader"),
        Cost("    dateutil isoparse(time)", _timed(len(times) or 1, lambda: [isoparse(t)
                                                                            for t in times]),
             "reference: what the SDK's JSON format parses `time` with"),
        Cost("    datetime.fromisoformat(time)", _timed(len(times) or 1, lambda: [
            datetime.fromisoformat(t) for t in times]), "reference: the stdlib parser"),
        Cost("  CloudEvent(attributes, data)", _timed(n, lambda: [CloudEvent(a, d)
                                                                for a, d in attributes]),
             "reference: the SDK event's construction and attribute validation"),
        Cost("    pydantic model_validate", _timed(n, lambda: [model.model_validate(p["data"])
                                                              for p in parsed]),
             "reference: the event's data model alone"),
        Cost("canonical_json(event_content)", _timed(n, lambda: [canonical_json(event_content(e))
                                                                for e in events]),
             "ledger: the payload that is hashed"),
        Cost("  canonical_json alone", _timed(n, lambda: [canonical_json(c) for c in contents]),
             "ledger: serialisation without event_content()"),
        Cost("payload_hash (sha256)", _timed(n, lambda: [payload_hash(p) for p in payloads]),
             "ledger: content hash"),
        Cost("chain_hash (sha256)", _timed(n, chain), "ledger: f-string + sha256"),
        Cost("fold (pure)", _timed(n, lambda: fold(State(), events, 1)),
             "ledger: one new Account row per event"),
        Cost("COPY tuple building", _timed(n, event_tuples), "reference: tuple + decode"),
    ]  # fmt: skip
    try:
        orjson: Any = importlib.import_module("orjson")
    except ImportError:
        orjson = None
    if orjson is not None:
        costs.insert(
            1,
            Cost("orjson.loads", _timed(n, lambda: [orjson.loads(v) for v in values]),
                 "reference: a C JSON parser"),
        )  # fmt: skip
    keys = getattr(ingest, "_keys", None)
    if callable(keys):
        costs.insert(
            -1,
            Cost("ingest._keys", _timed(n, lambda: keys(events)),
                 "ledger: which projection rows a batch touches"),
        )  # fmt: skip
    return costs
