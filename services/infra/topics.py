"""Kafka admin helpers shared by the ledger (against Apache Kafka) and the local tooling (Tansu)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno


async def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    replication_factor: int = 1,
    request_timeout_ms: int = 30_000,
) -> bool:
    """Create `topic` with `partitions` partitions unless it already exists.

    Returns True when this call created the topic, False when it was already there (its
    partition count is then left as it is). Any other broker error is raised as the matching
    `aiokafka.errors` exception.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        try:
            response = await admin.create_topics(
                [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)]
            )
        except TopicAlreadyExistsError:
            # Some aiokafka versions raise instead of reporting the code in the response.
            return False
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if name != topic or code == 0:
                continue
            if code == _TOPIC_ALREADY_EXISTS:
                return False
            message = entry[2] if len(entry) > 2 else None
            raise for_code(code)(f"creating topic {topic!r}: {message or 'no message'}")
        return True
    finally:
        await admin.close()


async def kafka_metadata(bootstrap: str, *, request_timeout_ms: int = 5_000) -> dict[str, Any]:
    """One cluster-metadata round trip: `{"brokers": [...], "cluster_id": ..., ...}`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    try:
        await admin.start()
        metadata: dict[str, Any] = await admin.describe_cluster()
        return metadata
    finally:
        await admin.close()


async def wait_for_kafka(bootstrap: str, max_wait: float = 30.0) -> dict[str, Any]:
    """Retry `kafka_metadata` until it lists a broker; raise TimeoutError after `max_wait` s.

    Callers that can cheaply check that the port accepts connections should do so first:
    aiokafka logs an ERROR line for every refused bootstrap attempt.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    last_error: BaseException | None = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(
                f"Kafka at {bootstrap} did not answer a metadata request within {max_wait:.0f}s"
                f" (last error: {last_error!r})"
            )
        try:
            metadata = await asyncio.wait_for(
                kafka_metadata(bootstrap, request_timeout_ms=max(500, int(remaining * 1000))),
                remaining,
            )
        except Exception as exc:  # any failure means "not ready yet"
            last_error = exc
        else:
            if metadata.get("brokers"):
                return metadata
            last_error = RuntimeError(f"metadata lists no brokers: {metadata!r}")
        await asyncio.sleep(0.1)
