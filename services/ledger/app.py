"""The ledger's HTTP side: health, metrics, account reads, quarantine, `POST /events`, and (from
`keys_api`) the key lifecycle."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from services import http_metrics
from services.contract.cloudevent import Rejection, decode_http_object, encode_structured
from services.contract.events import INT64_MAX, Event
from services.errors import ApiError, ErrorBody, error_response, install
from services.infra.topics import ensure_topic, kafka_metadata
from services.ledger import audit_api, budgets_api, keys_api, offset_store, ui
from services.ledger import metrics as ledger_metrics
from services.ledger.api_models import (
    ADMIN_RESPONSES,
    NOT_FOUND,
    Account,
    EventsAccepted,
    RejectedPage,
    VerifyReport,
    admin_read,
    events_request_body,
)
from services.ledger.audit import verify
from services.ledger.consumer import CommittedBatch, LedgerConsumer
from services.ledger.deps import Admin, Ledger, LedgerDep
from services.ledger.wire import publish, read_body
from services.ops import add_ops_routes
from services.reject_nul import RejectNul
from services.settings import Settings, asyncpg_dsn
from services.store import db, event_store, projections
from services.store.notify import Notification
from services.supervise import (
    DATABASE_ERRORS,
    LoopHealth,
    Readiness,
    cancel_and_wait,
    describe_database,
    exit_process,
    probe_database,
    supervise_task,
    wait_until_up,
)

log = structlog.get_logger("quota.ledger.http")

MAX_EVENTS_BODY_BYTES = 4 * 1024 * 1024
MAX_EVENTS_PER_REQUEST = 10_000
#: One encoded event at most (the producer's default max_request_size is 1 MiB, overhead aside).
MAX_EVENT_BYTES = 1_000_000


def create_app(
    settings: Settings,
    *,
    run_consumer: bool = True,
    on_fatal: Callable[[BaseException], None] = exit_process,
    on_commit: Callable[[CommittedBatch], None] | None = None,
) -> FastAPI:
    """The ledger application; with `run_consumer` it also folds the topic in the background.

    Its background loops are supervised: they retry what they can survive, and when one ends
    with anything else, `on_fatal` is called with the exception (by default the process
    exits non-zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = asyncpg_dsn(settings.database_url)
        bootstrap = settings.kafka_bootstrap
        timeout = settings.startup_timeout_seconds
        await wait_until_up(describe_database(dsn), lambda: probe_database(dsn), timeout)
        await wait_until_up(f"Kafka at {bootstrap}", lambda: kafka_metadata(bootstrap), timeout)
        async with contextlib.AsyncExitStack() as stack:
            pool = await db.create_pool(dsn)
            stack.push_async_callback(pool.close)
            await ensure_topic(bootstrap, settings.topic, settings.topic_partitions)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
            await producer.start()
            stack.push_async_callback(producer.stop)
            consumer = LedgerConsumer(settings, pool, on_commit=on_commit) if run_consumer else None
            ledger = Ledger(settings, pool, producer, consumer)
            app.state.ledger = ledger
            if consumer is not None:
                ledger_metrics.watch(
                    lambda: sum(consumer.lag().values()), lambda: consumer.last_commit
                )
            tasks: list[asyncio.Task[None]] = []
            if consumer is not None:
                tasks.append(asyncio.create_task(consumer.run(), name="consumer"))
                stack.push_async_callback(_stop_consumer, consumer, tasks[0])
            beat = asyncio.create_task(
                heartbeat(pool, settings.heartbeat_seconds, consumer), name="heartbeat"
            )
            tasks.append(beat)
            stack.push_async_callback(cancel_and_wait, beat)
            for task in tasks:
                supervise_task(task, on_fatal)
            yield

    app = FastAPI(
        title="quota ledger",
        version="0.1.0",
        lifespan=lifespan,
        description="Folds CloudEvents from Kafka into PostgreSQL exactly once; audit reads.",
    )
    _routes(app)
    app.include_router(audit_api.router)
    app.include_router(keys_api.router)
    app.include_router(budgets_api.router)
    app.include_router(ui.router)
    app.add_middleware(RejectNul)
    http_metrics.install(app, "ledger")
    install(app)
    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, _database_unavailable)
    return app


async def _stop_consumer(consumer: LedgerConsumer, task: asyncio.Task[None]) -> None:
    await consumer.stop()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(task, timeout=10)


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """A read that met a lost or refusing database: 503, to be retried."""
    log.warning("database unavailable", error=f"{type(exc).__name__}: {exc}")
    return error_response(
        503,
        "database_unavailable",
        f"database unavailable: {type(exc).__name__}",
        headers={"Retry-After": "1"},
    )


async def heartbeat(pool: asyncpg.Pool, interval: float, consumer: LedgerConsumer | None) -> None:
    """Tell listeners the ledger's position even when idle, so they can tell stale from quiet.

    Only a live consumer loop is vouched for: while the consumer cannot commit (or has not
    polled yet) nothing is sent, and each heartbeat carries `cycle_age`, the seconds since
    the loop's last successful cycle, which listeners subtract from their freshness."""
    health = LoopHealth("heartbeat")
    while True:
        if consumer is None or consumer.health.ok:
            try:
                async with pool.acquire() as conn:
                    head = await event_store.read_head(conn)
                    age = consumer.health.seconds_since_ok() if consumer is not None else 0.0
                    beat = Notification(head.position, heartbeat=True, cycle_age=round(age, 3))
                    await db.notify_changes(conn, beat)
                health.succeeded()
            except DATABASE_ERRORS as exc:
                await asyncio.sleep(min(health.failed("heartbeat", exc), interval))
                continue
        await asyncio.sleep(interval)


async def _readiness(request: Request) -> Readiness:
    """Ready while the database answers and the consumer commits; else the reason."""
    ledger: Ledger = request.app.state.ledger
    consumer = ledger.consumer
    position = consumer.position if consumer is not None else 0
    reason: str | None = None
    try:
        async with ledger.pool.acquire() as conn:
            position = (await event_store.read_head(conn)).position
    except DATABASE_ERRORS as exc:
        reason = f"database: {type(exc).__name__}: {exc}"
    if reason is None and consumer is not None:
        if not consumer.started.is_set():
            reason = "consumer starting"
        elif consumer.health.reason is not None:
            reason = f"consumer: {consumer.health.reason}"
    return Readiness(ready=reason is None, position=position, reason=reason)


def _routes(app: FastAPI) -> None:
    add_ops_routes(app, _readiness, "Not ready, and why")

    @app.get(
        "/accounts/{account_id}",
        dependencies=[Admin],
        tags=["accounts"],
        response_model=None,
        responses=admin_read(Account, NOT_FOUND),
    )
    async def get_account(account_id: str, ledger: LedgerDep) -> dict[str, Any]:
        async with ledger.pool.acquire() as conn:
            account = await projections.get_account(conn, account_id)
        if account is None:
            raise ApiError(404, "unknown_account", f"unknown account {account_id}")
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

    @app.get(
        "/audit/rejected",
        dependencies=[Admin],
        tags=["audit"],
        response_model=None,
        responses=admin_read(RejectedPage),
    )
    async def rejected(
        ledger: LedgerDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[
            int, Query(ge=0, le=INT64_MAX, description="cursor: `next` of the last page")
        ] = 0,
    ) -> dict[str, Any]:
        async with ledger.pool.acquire() as conn:
            rows = await offset_store.list_rejected(conn, limit, after)
        items = [_rejected_item(row) for row in rows]
        return {"items": items, "next": rows[-1]["id"] if len(rows) == limit else None}

    @app.get(
        "/audit/verify",
        dependencies=[Admin],
        tags=["audit"],
        response_model=None,
        responses=admin_read(VerifyReport),
    )
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
        response_model=None,
        openapi_extra={"requestBody": events_request_body(MAX_EVENTS_PER_REQUEST)},
        responses={
            202: {"model": EventsAccepted, "description": "Published; the ids, in order"},
            **ADMIN_RESPONSES,
            400: {
                "model": ErrorBody,
                "description": "Not JSON, or at least one event is invalid; nothing was published",
            },
            413: {"model": ErrorBody, "description": "Body too large"},
            503: {"model": ErrorBody, "description": "The broker did not accept them"},
        },
    )
    async def post_events(request: Request, ledger: LedgerDep) -> Response:
        body = await read_body(request, MAX_EVENTS_BODY_BYTES)
        if body is None:
            return error_response(
                413, "request_too_large", f"body over {MAX_EVENTS_BODY_BYTES} bytes"
            )
        try:
            parsed = parse_json(body)
        except ValueError as exc:
            reason = printable(str(exc))
            details = [{"index": None, "code": "invalid_json", "reason": reason}]
            return error_response(400, "invalid_json", reason, details=details)
        items = parsed if isinstance(parsed, list) else [parsed]
        if not items:
            return error_response(400, "no_events", "no events given")
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return error_response(
                400, "too_many_events", f"more than {MAX_EVENTS_PER_REQUEST} events in one request"
            )
        events, errors = validate_batch(items)
        if errors:
            message = f"{len(errors)} of {len(items)} events are invalid; nothing was published"
            return error_response(400, "invalid_events", message, details=errors)
        try:
            await publish(ledger.producer, ledger.settings.topic, events)
        except KafkaError as exc:
            log.error("publish failed", error=str(exc))
            return error_response(
                503,
                "broker_unavailable",
                f"broker unavailable: {exc}",
                headers={"Retry-After": "1"},
            )
        return JSONResponse({"ids": [event.id for event in events]}, status_code=202)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: a `ValueError` for anything that is not (bad syntax or encoding, NaN and
    Infinity, an integer beyond Python's 4300 digits, nesting beyond the recursion limit)."""
    try:
        return json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate (from a JSON escape) becomes `?`."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode()


def validate_batch(items: list[Any]) -> tuple[list[Event], list[dict[str, Any]]]:
    """Validate every event; any error means none of them is published."""
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, bytes] = {}
    for index, item in enumerate(items):
        event_id = item.get("id") if isinstance(item, dict) else None
        event_id = printable(event_id) if isinstance(event_id, str) else None
        try:
            event = decode_http_object(item)
        except Rejection as rejection:
            errors.append(
                {
                    "index": index,
                    "id": event_id,
                    "code": rejection.code,
                    "reason": printable(rejection.reason),
                }
            )
            continue
        encoded = encode_structured(event)
        if len(encoded) > MAX_EVENT_BYTES:
            errors.append(
                {
                    "index": index,
                    "id": event.id,
                    "code": "event_too_large",
                    "reason": f"event_too_large: {len(encoded)} bytes encoded, the broker takes "
                    f"at most {MAX_EVENT_BYTES}",
                }
            )
            continue
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
