"""OpenTelemetry traces (`services.tracing`), in process, with the SDK's in-memory exporter.

`POST /authorize` and forward-auth get a server span parented by the gateway's W3C
`traceparent`, with `decide`, `hold` and `rate_limit` children and the decision's outcome
(never the key); each ledger batch gets a `ledger batch` span with its figures. Off (the
default) nothing is recorded and neither the SDK nor the exporter is imported.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services import tracing
from services.ledger import ingest, offset_store
from services.ledger.consumer import LedgerConsumer, Owned, _Prepared
from services.policy.app import create_app
from services.policy.ratelimit import InProcessRateLimiter
from services.policy.reservations import Reservations
from services.policy.service import Policy
from services.policy.snapshot import Snapshot
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings
from services.store.model import RateLimit, State
from tests.builders import recharge, structured
from tests.policy.test_decision import POSITION, USER_KEY, world

ROOT = Path(__file__).resolve().parents[1]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
GATEWAY = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "gw=edge-1"}
ASK: dict[str, Any] = {
    "authorization": f"Bearer {USER_KEY}",
    "client_ip": "203.0.113.7",
    "route": "/v1/chat/completions",
    "model": "gpt-4o",
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Traces on, every span kept in memory as it ends; off again afterwards."""
    exporter = InMemorySpanExporter()
    on = Settings(otel_enabled=True)
    assert tracing.configure(on, "quota-test", SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


def limited_world() -> State:
    """test_decision's world, with a limit on acct_user so check 14 runs (`rate_limit`)."""
    state = world()
    state.rate_limits[("acct_user", "*")] = RateLimit("acct_user", "*", 100, 60, 1)
    return state


def policy(reservations: Reservations | None = None) -> Policy:
    """A policy deciding from an in-memory snapshot; holds need real `reservations`."""
    settings = Settings(allow_anonymous_gateways=True)
    store = SnapshotStore("postgresql://127.0.0.1:1/unused")
    store.snapshot = Snapshot.from_state(limited_world(), POSITION)
    held = reservations or Reservations(cast(asyncpg.Pool, None), 300)
    return Policy(settings, store, InProcessRateLimiter(), held)


@asynccontextmanager
async def client(served: Policy) -> AsyncIterator[httpx.AsyncClient]:
    """The policy's application around `served`, called in process (no lifespan)."""
    app = create_app(served.settings)
    app.state.policy = served
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://policy") as http:
        yield http


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[str]:
    parent_id = parent.context.span_id
    return sorted(
        span.name
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent_id
    )


def assert_parented_by_the_gateway(span: ReadableSpan) -> None:
    assert span.kind is SpanKind.SERVER
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.span_id == int(PARENT_ID, 16)
    assert span.parent.is_remote
    assert span.context.trace_state.get("gw") == "edge-1"


def assert_no_key(exporter: InMemorySpanExporter) -> None:
    for span in exporter.get_finished_spans():
        for value in (span.attributes or {}).values():
            assert USER_KEY[-12:] not in str(value), (span.name, value)


# --------------------------------------------------------------------------- the policy


async def test_authorize_is_a_server_span_under_the_gateways_traceparent(
    spans: InMemorySpanExporter,
) -> None:
    async with client(policy()) as http:
        allowed = await http.post("/authorize", json=ASK, headers=GATEWAY)
        denied = await http.post("/authorize", json={**ASK, "model": "nope"}, headers=GATEWAY)
        untraced = await http.post("/authorize", json=ASK)
    assert (allowed.status_code, denied.status_code, untraced.status_code) == (200, 503, 200)

    first, second, third = named(spans, "POST /authorize")
    assert_parented_by_the_gateway(first)
    assert children(spans, first) == ["decide", "rate_limit"]
    assert dict(first.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/authorize",
        "quota.allowed": True,
        "quota.reason": "allowed",
        "quota.status": 200,
        "quota.position": POSITION,
        "quota.account_id": "acct_user",
        "quota.token_id": "tok_user",
    }
    assert_parented_by_the_gateway(second)
    assert children(spans, second) == ["decide"]  # denied before check 14
    attributes = second.attributes or {}
    assert (attributes["quota.allowed"], attributes["quota.status"]) == (False, 503)
    assert attributes["quota.reason"] == denied.json()["error"]["reason"]
    # No traceparent: a trace of its own.
    assert third.parent is None and third.context.trace_id != int(TRACE_ID, 16)
    assert children(spans, third) == ["decide", "rate_limit"]
    assert_no_key(spans)


async def test_forward_auth_gets_the_same_server_span(spans: InMemorySpanExporter) -> None:
    headers = {
        **GATEWAY,
        "Authorization": f"Bearer {USER_KEY}",
        "X-Forwarded-Uri": "/v1/chat/completions",
        "X-Forwarded-For": "203.0.113.7",
        "X-Quota-Model": "gpt-4o",
    }
    async with client(policy()) as http:
        answer = await http.get("/authorize/forward", headers=headers)
    assert answer.status_code == 200
    (server,) = named(spans, "GET /authorize/forward")
    assert_parented_by_the_gateway(server)
    assert children(spans, server) == ["decide", "rate_limit"]
    attributes = server.attributes or {}
    assert (attributes["quota.allowed"], attributes["quota.account_id"]) == (True, "acct_user")
    assert_no_key(spans)


async def test_a_hold_is_a_child_span(
    spans: InMemorySpanExporter, db_settings: Settings, pool: asyncpg.Pool
) -> None:
    await apply_batch(db_settings, pool, [structured(recharge("acct_user", 1000))])
    reservations = Reservations(pool, 300)
    running = asyncio.create_task(reservations.run())
    try:
        async with client(policy(reservations)) as http:
            answer = await http.post(
                "/authorize", json={**ASK, "estimated_cost": 10}, headers=GATEWAY
            )
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert answer.status_code == 200, answer.text
    (server,) = named(spans, "POST /authorize")
    assert_parented_by_the_gateway(server)
    assert children(spans, server) == ["decide", "hold", "rate_limit"]
    attributes = server.attributes or {}
    assert attributes["quota.reservation_id"] == answer.json()["reservation"]["id"]


# --------------------------------------------------------------------------- the ledger


async def apply_batch(settings: Settings, pool: asyncpg.Pool, values: list[bytes]) -> None:
    """`values` as records of partition 0, committed by a `LedgerConsumer` (no broker)."""
    consumer = LedgerConsumer(settings, pool)
    topic, group = settings.topic, settings.consumer_group
    async with pool.acquire() as conn:
        claim = (await offset_store.claim_partitions(conn, group, topic, [0], consumer.owner))[0]
    consumer.owned[TopicPartition(topic, 0)] = Owned(claim.epoch, 0)
    records = [ingest.Incoming(topic, 0, i, (), value) for i, value in enumerate(values)]
    prepared = _Prepared(ingest.decode_all(records), {(topic, 0): claim.epoch}, time.perf_counter())
    assert await consumer._commit(cast(AIOKafkaConsumer, None), prepared)


async def test_a_ledger_batch_is_a_span_with_its_figures(
    spans: InMemorySpanExporter, db_settings: Settings, pool: asyncpg.Pool
) -> None:
    first = structured(recharge("acct_t", 100, event_id="t-1"))
    values = [first, structured(recharge("acct_t", 5, event_id="t-2")), first, b"{not json"]
    await apply_batch(db_settings, pool, values)
    (batch,) = named(spans, "ledger batch")
    assert batch.parent is None
    assert dict(batch.attributes or {}) == {
        "quota.batch.records": 4,
        "quota.batch.applied": 2,
        "quota.batch.duplicates": 1,
        "quota.batch.quarantined": 1,
        "quota.batch.looked_up": False,
        "quota.position": 2,
    }


# --------------------------------------------------------------------------- configuration


def test_the_service_name_defaults_to_the_service_unless_otel_service_name_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default processor (batching, OTLP/HTTP) is built without a collector to talk to."""
    on = Settings(otel_enabled=True)
    try:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        assert tracing.configure(on, "quota-policy")
        assert tracing._PROVIDER is not None
        assert tracing._PROVIDER.resource.attributes[SERVICE_NAME] == "quota-policy"
        monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-quota")
        assert tracing.configure(on, "quota-policy")
        assert tracing._PROVIDER.resource.attributes[SERVICE_NAME] == "edge-quota"
    finally:
        tracing.shutdown()
    assert tracing.TRACER is None


OFF = """
import asyncio, json, sys

def otel():
    return sorted(m for m in sys.modules if m.startswith("opentelemetry"))

from services import tracing
alone = otel()
# FastAPI imports the OpenTelemetry API, and redis the SDK's metrics when it is installed.
import httpx
from services.ledger import app as ledger_app, consumer
from services.policy.app import create_app
from services.policy.ratelimit import InProcessRateLimiter
from services.policy.reservations import Reservations
from services.policy.service import Policy
from services.policy.snapshot import Snapshot
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings
from tests.policy.test_decision import USER_KEY, world

before = otel()
settings = Settings(allow_anonymous_gateways=True)
configured = tracing.configure(settings, "quota-policy")
store = SnapshotStore("postgresql://127.0.0.1:1/unused")
store.snapshot = Snapshot.from_state(world(), 1)
app = create_app(settings)
app.state.policy = Policy(settings, store, InProcessRateLimiter(), Reservations(None, 300))
body = {"authorization": "Bearer " + USER_KEY, "route": "/v1/chat/completions",
        "model": "gpt-4o"}

async def ask():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://policy") as http:
        answer = await http.post("/authorize", json=body, headers={"traceparent": sys.argv[1]})
        return answer.status_code

status = asyncio.run(ask())
after = otel()
sys.modules["opentelemetry.sdk"] = None  # as if the `otel` extra were not installed
enabled = tracing.configure(Settings(otel_enabled=True), "quota-policy")
print(json.dumps({"alone": alone, "before": before, "after": after, "configured": configured,
                  "status": status, "enabled": enabled, "tracer": repr(tracing.TRACER)}))
"""


def test_off_records_nothing_and_loads_neither_the_sdk_nor_the_exporter() -> None:
    """Off (the default), and on without the `otel` extra: TRACER stays None, the request path
    reads only that, and `services` imports no OpenTelemetry module (FastAPI and redis load
    some of their own): not the SDK's traces, not the exporter."""
    ran = subprocess.run(
        [sys.executable, "-c", OFF, GATEWAY["traceparent"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
    )
    assert ran.returncode == 0, ran.stderr
    *logged, last = ran.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["configured"] is False and result["status"] == 200
    assert result["alone"] == []
    assert result["after"] == result["before"]
    unwanted = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
    assert not [m for m in result["after"] if m.startswith(unwanted)]
    assert result["enabled"] is False and result["tracer"] == "None"
    assert "OpenTelemetry is not installed" in "\n".join(logged)
