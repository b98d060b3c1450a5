"""`python -m bench.fold.producer BOOTSTRAP EVENTS ACCOUNTS SEED`: bench.fold's producer, a
process of its own so that librdkafka and the loop feeding it do not share the consumers' event
loop (nor, in Python, their interpreter lock).

It makes the workload once (`EVENTS` usage events with unique reproducible ids over `ACCOUNTS`
random accounts) and prints its totals as a JSON line; then, for each topic read from a line of
stdin, it produces all of it there with confluent-kafka (acks=all, keyed by subject) and prints
a JSON line with `time.monotonic_ns()` stamps, which on Linux compare across processes.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from typing import Any

from confluent_kafka import KafkaError, Message, Producer, libversion

from services.contract.samples import structured, usage


def workload(
    events: int, accounts: int, seed: int
) -> tuple[list[tuple[bytes, bytes]], dict[str, Any]]:
    rng = random.Random(seed)
    records, amounts, subjects = [], 0, set()
    for _ in range(events):
        subject, amount = f"acct-{rng.randrange(accounts):05d}", rng.randint(1, 100)
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        value = structured(usage(subject, amount, event_id=event_id, source="bench.fold"))
        records.append((subject.encode(), value))
        amounts += amount
        subjects.add(subject)
    totals = {
        "events": events, "amount_sum": amounts, "accounts": len(subjects),
        "value_bytes_mean": round(sum(len(v) for _, v in records) / max(events, 1)),
        "client": f"confluent-kafka (librdkafka {libversion()[0]})",
    }  # fmt: skip
    return records, totals


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """All `records` to `topic`; the stamps of the first produce and of the last acknowledgement
    (when `flush` returned), and the deliveries that failed."""
    failed: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failed.append(str(error))

    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
        "partitioner": "murmur2_random",  # as the Java client and aiokafka (POST /events)
        "on_delivery": delivered,
    })  # fmt: skip
    producer.list_topics(topic, timeout=30)  # metadata before the clock starts
    first = time.monotonic_ns()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:  # librdkafka's queue is full: let it send
                producer.poll(0.005)
    left = producer.flush(120)
    last = time.monotonic_ns()
    return {"topic": topic, "first_ns": first, "last_ns": last, "unsent": left,
            "failed": len(failed), "errors": failed[:3]}  # fmt: skip


def main(argv: list[str]) -> int:
    bootstrap, events, accounts, seed = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    records, totals = workload(events, accounts, seed)
    print(json.dumps(totals), flush=True)
    for line in sys.stdin:
        print(json.dumps(produce(bootstrap, line.strip(), records)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
