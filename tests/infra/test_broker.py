"""The broker behind `kafka_bootstrap` really speaks Kafka, and `ensure_topic` behaves."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.infra.topics import ensure_topic

TIMEOUT = 30.0


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def test_produce_then_consume_in_a_group(kafka_bootstrap: str) -> None:
    topic = _unique("infra-roundtrip")
    group = _unique("infra-group")
    await ensure_topic(kafka_bootstrap, topic, 1)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b"payload", key=b"key", headers=[("kind", b"probe")]
        )
    finally:
        await producer.stop()
    assert sent.topic == topic
    assert sent.offset == 0

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # Tansu completes a group join only after about half the session timeout (5 s with
        # aiokafka's default 10 s); 6 s is the smallest that Apache Kafka accepts by default.
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), TIMEOUT)
        assert (record.key, record.value) == (b"key", b"payload")
        assert list(record.headers) == [("kind", b"probe")]
        assert (record.partition, record.offset) == (sent.partition, sent.offset)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, record.partition))
        assert committed == record.offset + 1
    finally:
        await consumer.stop()


async def test_ensure_topic_creates_partitions_and_is_idempotent(kafka_bootstrap: str) -> None:
    topic = _unique("infra-topic")

    assert await ensure_topic(kafka_bootstrap, topic, 3) is True
    assert await ensure_topic(kafka_bootstrap, topic, 3) is False
    # An existing topic is left alone, whatever partition count is asked for.
    assert await ensure_topic(kafka_bootstrap, topic, 5) is False

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert description["error_code"] == 0
    assert sorted(p["partition"] for p in description["partitions"]) == [0, 1, 2]
