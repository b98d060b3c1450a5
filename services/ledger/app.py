"""The ledger's HTTP side: health, metrics, account reads, quarantine, and `POST /events`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.contract.cloudevent import Rejection, decode_http_object, encode_structured
from services.contract.events import Event
from services.infra.topics import ensure_topic
from services.ledger import audit_api, ui
from services.ledger import repository as repo
from services.ledger.audit import verify
from services.ledger.consumer import LedgerConsumer
from services.ledger.deps import Admin, Ledger, LedgerDep
from services.reject_nul import RejectNul
from services.settings import Settings, asyncpg_dsn

log = structlog.get_logger("quota.ledger.http")

MAX_EVENTS_BODY_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_REQUEST = 10_000


def create_app(settings: Settings, *, run_consumer: bool = True) -> FastAPI:
    """The ledger application; with `run_consumer` it also folds the topic in the background."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await repo.create_pool(asyncpg_dsn(settings.database_url))
        await ensure_topic(settings.kafka_bootstrap, settings.topic, settings.topic_partitions)
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5
        )
        await producer.start()
        consumer = LedgerConsumer(settings, pool) if run_consumer else None
        task = asyncio.create_task(consumer.run()) if consumer else None
        beat = asyncio.create_task(heartbeat(pool, settings.heartbeat_seconds))
        app.state.ledger = Ledger(settings, pool, producer, consumer)
        try:
            yield
        finally:
            beat.cancel()
            if consumer and task:
                await consumer.stop()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, timeout=10)
            await producer.stop()
            await pool.close()

    app = FastAPI(
        title="quota ledger",
        version="0.1.0",
        lifespan=lifespan,
        description="Folds CloudEvents from Kafka into PostgreSQL exactly once; audit reads.",
    )
    _routes(app)
    app.include_router(audit_api.router)
    app.include_router(ui.router)
    app.add_middleware(RejectNul)
    return app


async def heartbeat(pool: asyncpg.Pool, interval: float) -> None:
    """Tell listeners the ledger's position even when idle, so they can tell stale from quiet."""
    while True:
        try:
            async with pool.acquire() as conn:
                head = await repo.read_head(conn)
                await repo.notify_changes(conn, {"position": head.position, "heartbeat": True})
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(interval)


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "Not ready"}})
    async def readyz(ledger: LedgerDep) -> Response:
        try:
            async with ledger.pool.acquire() as conn:
                head = await repo.read_head(conn)
        except (asyncpg.PostgresError, OSError) as exc:
            return JSONResponse({"ready": False, "reason": f"database: {exc}"}, status_code=503)
        if ledger.consumer is not None and not ledger.consumer.started.is_set():
            return JSONResponse({"ready": False, "reason": "consumer starting"}, status_code=503)
        return JSONResponse({"ready": True, "position": head.position})

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/accounts/{account_id}",
        dependencies=[Admin],
        tags=["accounts"],
        responses={404: {"description": "Unknown account"}},
    )
    async def get_account(account_id: str, ledger: LedgerDep) -> dict[str, Any]:
        async with ledger.pool.acquire() as conn:
            account = await repo.get_account(conn, account_id)
        if account is None:
            raise HTTPException(status_code=404, detail=f"unknown account {account_id}")
        return {
            "account_id": account.account_id,
            "balance": account.balance,
            "held": account.held,
            "available": account.balance - account.held,
            "status": account.status,
            "role": account.role,
            "group": account.group,
            "position": account.position,
        }

    @app.get("/audit/rejected", dependencies=[Admin], tags=["audit"])
    async def rejected(
        ledger: LedgerDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[int, Query(ge=0, description="cursor: `next` of the last page")] = 0,
    ) -> dict[str, Any]:
        async with ledger.pool.acquire() as conn:
            rows = await repo.list_rejected(conn, limit, after)
        items = [_rejected_item(row) for row in rows]
        return {"items": items, "next": rows[-1]["id"] if len(rows) == limit else None}

    @app.get("/audit/verify", dependencies=[Admin], tags=["audit"])
    async def audit_verify(ledger: LedgerDep) -> dict[str, Any]:
        """Recompute the hash chain, re-fold the history, compare every projection row."""
        async with ledger.pool.acquire() as conn:
            report = await verify(conn)
        return report.as_json()

    @app.post(
        "/events",
        dependencies=[Admin],
        status_code=202,
        tags=["events"],
        responses={
            400: {"description": "At least one event is invalid; nothing was published"},
            413: {"description": "Body too large"},
            503: {"description": "The broker did not accept the events"},
        },
    )
    async def post_events(request: Request, ledger: LedgerDep) -> Response:
        body = await request.body()
        if len(body) > MAX_EVENTS_BODY_BYTES:
            return _errors(413, [{"index": None, "reason": "body too large"}])
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _errors(400, [{"index": None, "code": "invalid_json", "reason": str(exc)}])
        items = parsed if isinstance(parsed, list) else [parsed]
        if not items:
            return _errors(400, [{"index": None, "reason": "no events given"}])
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return _errors(400, [{"index": None, "reason": "too many events in one request"}])
        events, errors = validate_batch(items)
        if errors:
            return _errors(400, errors)
        try:
            await publish(ledger.producer, ledger.settings.topic, events)
        except KafkaError as exc:
            log.error("publish failed", error=str(exc))
            return JSONResponse({"error": f"broker unavailable: {exc}"}, status_code=503)
        return JSONResponse({"ids": [event.id for event in events]}, status_code=202)


def validate_batch(items: list[Any]) -> tuple[list[Event], list[dict[str, Any]]]:
    """Validate every event; any error means none of them is published."""
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, bytes] = {}
    for index, item in enumerate(items):
        event_id = item.get("id") if isinstance(item, dict) else None
        try:
            event = decode_http_object(item)
        except Rejection as rejection:
            errors.append(
                {"index": index, "id": event_id, "code": rejection.code, "reason": rejection.reason}
            )
            continue
        encoded = encode_structured(event)
        if seen.setdefault(event.id, encoded) != encoded:
            errors.append(
                {
                    "index": index,
                    "id": event.id,
                    "code": "id_conflict",
                    "reason": f"id_conflict: id {event.id} appears twice with different content",
                }
            )
            continue
        events.append(event)
    return events, errors


async def publish(producer: AIOKafkaProducer, topic: str, events: list[Event]) -> None:
    """Send in structured mode, keyed by subject so an account's events stay in order."""
    futures = [
        await producer.send(
            topic,
            key=event.subject.encode(),
            value=encode_structured(event),
            headers=[("content-type", b"application/cloudevents+json")],
        )
        for event in events
    ]
    await asyncio.gather(*futures)


def _errors(status: int, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status)


def _rejected_item(row: asyncpg.Record) -> dict[str, Any]:
    raw: bytes | None = row["raw"]
    encoding = "utf-8"
    text: str | None = None
    if raw is not None:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = base64.b64encode(raw).decode()
            encoding = "base64"
    return {
        "id": row["id"],
        "reason": row["reason"],
        "code": row["code"],
        "event_id": row["event_id"],
        "topic": row["topic"],
        "partition": row["partition"],
        "offset": row["kafka_offset"],
        "raw": text,
        "raw_encoding": encoding,
        "headers": row["headers"],
        "received_at": row["received_at"].isoformat(),
    }
