"""The policy service: `POST /authorize` and forward-auth, answered from an in-memory snapshot.

Start it with `quota policy --host --port` (QUOTA_DATABASE_URL, QUOTA_SERVICE_TOKEN,
QUOTA_REDIS_URL, QUOTA_MAX_STALENESS_SECONDS, QUOTA_FAIL_OPEN). `GET /readyz` answers 200 with
`{"ready": true, "position": N}` once the snapshot is loaded; N is the ledger position the
snapshot has seen, which tests and operators can wait on.

Gateways authenticate with `X-Quota-Service-Token` (compared in constant time): every route
but `/healthz`, `/readyz` and `/metrics` refuses a missing or wrong one with 401
`service_token_invalid` when QUOTA_SERVICE_TOKEN is set, and `quota policy` does not start
without it unless QUOTA_ALLOW_ANONYMOUS_GATEWAYS=true (`Settings.check_secrets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import quote

import orjson
import structlog
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.contract.cloudevent import format_time
from services.ledger import repository as repo
from services.ledger.fold import Reservation
from services.openapi_docs import inline_schema
from services.policy.api_models import (
    DECISION_RESPONSES,
    FORWARD_PARAMETERS,
    RESERVATION_REFUSALS,
    Health,
    forward_responses,
)
from services.policy.api_models import Reservation as ReservationState
from services.policy.decision import (
    INSUFFICIENT_USER_QUOTA,
    AuthorizeRequest,
    Decision,
    Snapshot,
    decide,
    deny,
    extract_key,
    rate_limited,
)
from services.policy.ratelimit import RateLimiter, build_rate_limiter
from services.policy.reservations import HoldOutcome, Reservations
from services.policy.snapshot_store import SnapshotStore
from services.reject_nul import RejectNul
from services.settings import Settings, asyncpg_dsn
from services.supervise import (
    DATABASE_ERRORS,
    Readiness,
    cancel_and_wait,
    describe_database,
    exit_process,
    probe_database,
    supervise_task,
    wait_until_up,
)

log = structlog.get_logger("quota.policy.http")

DECISIONS = Counter("quota_policy_decisions_total", "Decisions by outcome", ["reason"])

INVALID_REQUEST: Final = "invalid_request"
SERVICE_TOKEN_INVALID: Final = "service_token_invalid"
SNAPSHOT_STALE: Final = "snapshot_stale"
RESERVATION_UNAVAILABLE: Final = "reservation_unavailable"
#: What a lost or refusing database raises; a hold that meets one is answered 503.
DATABASE_FAILURES: Final = DATABASE_ERRORS
REQUEST_TOO_LARGE: Final = "request_too_large"


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson: the decision path is answered thousands of times a second."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class Policy:
    def __init__(
        self,
        settings: Settings,
        store: SnapshotStore,
        limiter: RateLimiter,
        reservations: Reservations,
    ) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.reservations = reservations


def create_app(
    settings: Settings, *, on_fatal: Callable[[BaseException], None] = exit_process
) -> FastAPI:
    """The policy application; its lifespan waits for PostgreSQL, loads the snapshot and keeps
    it fresh. Its loops (snapshot listener, holds, expiry) retry what they can survive;
    `on_fatal` is called if one ends otherwise (by default the process exits non-zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = asyncpg_dsn(settings.database_url)
        await wait_until_up(
            describe_database(dsn), lambda: probe_database(dsn), settings.startup_timeout_seconds
        )
        async with contextlib.AsyncExitStack() as stack:
            store = SnapshotStore(dsn)
            limiter = build_rate_limiter(settings.redis_url)
            stack.push_async_callback(limiter.close)
            pool = await repo.create_pool(dsn, max_size=6)
            stack.push_async_callback(pool.close)
            reservations = Reservations(pool, settings.reservation_ttl_seconds)
            app.state.policy = Policy(settings, store, limiter, reservations)
            for name, loop in (("snapshot", store.run()), ("reservations", reservations.run())):
                task = asyncio.create_task(loop, name=name)
                stack.push_async_callback(cancel_and_wait, task)
                supervise_task(task, on_fatal)
            yield

    app = FastAPI(
        title="quota policy",
        version="0.1.0",
        lifespan=lifespan,
        description="Answers whether a gateway request may go ahead.",
    )
    _routes(app)
    app.add_middleware(RejectNul)
    app.add_middleware(AuthorizeFastPath)  # outermost: /authorize skips the rest
    for error in DATABASE_FAILURES:
        app.add_exception_handler(error, _database_unavailable)
    return app


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A reservation read or release that met a lost or refusing database: 503, retry."""
    log.warning("database unavailable", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    policy: Policy = request.app.state.policy
    decision = _reservation_unavailable(policy.store.position)
    return FastJSONResponse(decision.body, status_code=decision.status, headers=decision.headers)


def _error(status: int, reason: str, message: str, position: int, type_: str) -> JSONResponse:
    body = {
        "allowed": False,
        "error": {"message": message, "type": type_, "code": reason, "reason": reason},
        "position": position,
    }
    headers = {"Retry-After": "1"} if status == 503 else None
    return FastJSONResponse(body, status_code=status, headers=headers)


def _reservation_unavailable(position: int) -> Decision:
    """503: the hold could not be written (the database failed); retry after a second."""
    body = {
        "allowed": False,
        "error": {
            "message": "Quota could not be reserved right now; try again later.",
            "type": "service_unavailable",
            "code": RESERVATION_UNAVAILABLE,
            "reason": RESERVATION_UNAVAILABLE,
        },
        "position": position,
    }
    return Decision(503, False, RESERVATION_UNAVAILABLE, body, retry_after=1)


def _service_refusal(policy: Policy, service_token: str | None) -> JSONResponse | None:
    """401 when a service token is configured and the gateway did not send it, or sent
    another (compared in constant time). Every route but health and metrics asks this."""
    expected = policy.settings.service_token
    # Header values arrive decoded as latin-1: back to their bytes, against the token's UTF-8.
    sent = (service_token or "").encode("latin-1", "replace")
    if expected and not hmac.compare_digest(sent, expected.encode()):
        return _error(
            401,
            SERVICE_TOKEN_INVALID,
            "Unauthorized – missing or wrong X-Quota-Service-Token.",
            policy.store.position,
            "authentication_error",
        )
    return None


def _gate(policy: Policy, service_token: str | None) -> JSONResponse | Snapshot:
    """Service authentication and freshness; the snapshot to decide from, or the refusal."""
    settings = policy.settings
    position = policy.store.position
    refused = _service_refusal(policy, service_token)
    if refused is not None:
        return refused
    snapshot = policy.store.snapshot
    if snapshot is None:
        return _error(
            503, SNAPSHOT_STALE, "Quota snapshot is not loaded yet.", 0, "service_unavailable"
        )
    if (
        not settings.fail_open
        and policy.store.seconds_since_heard() > settings.max_staleness_seconds
    ):
        return _error(
            503,
            SNAPSHOT_STALE,
            "Quota state is stale: the ledger has not been heard from; try again later.",
            position,
            "service_unavailable",
        )
    return snapshot


async def authorize_request(
    policy: Policy, request: AuthorizeRequest, snapshot: Snapshot
) -> Decision:
    """Checks 1-13 from the snapshot (pure), the hold when a cost is estimated (check 13
    again, authoritative, under the ledger lock), then check 14 against the shared limiter.

    A hold with a request id is decided by the hold alone from check 13 on: `decide` skips
    check 13 for it, the hold answers a known request id (within its TTL, whatever the
    reservation's state) with its reservation before applying check 13, and a repeat is not
    counted by check 14 again."""
    decision = decide(request, snapshot, datetime.now(UTC))
    key = extract_key(request.authorization)
    held: HoldOutcome | None = None
    if decision.allowed and request.estimated_cost is not None:
        body = decision.body
        try:
            held = await policy.reservations.hold(
                body["account_id"],
                request.estimated_cost,
                request.request_id,
                actor=f"token:{body['token_id']}",
            )
        except DATABASE_FAILURES as exc:
            # Nothing was held (the statement is one transaction): refuse, never fail open.
            log.warning("hold failed", error=str(exc), account_id=body["account_id"])
            decision = _reservation_unavailable(snapshot.position)
            _count(RESERVATION_UNAVAILABLE)
            return decision
        if held.reservation is None:
            decision = deny(INSUFFICIENT_USER_QUOTA, snapshot.position, key_last6=key[-6:])
        else:
            decision = _with_reservation(decision, held)
    if (
        decision.allowed
        and decision.rate_limit is not None
        and decision.rate_limit_key
        and not (held is not None and held.repeated)
    ):
        account_id, model = decision.rate_limit_key
        retry_after = await policy.limiter.hit(account_id, model, decision.rate_limit)
        if retry_after is not None:
            if held is not None and held.reservation is not None:
                try:
                    await policy.reservations.release(
                        held.reservation.reservation_id, "policy:rate_limited"
                    )
                except DATABASE_FAILURES as exc:  # the TTL ends it instead
                    log.warning("release after 429 failed", error=str(exc))
            decision = rate_limited(decision, retry_after)
    _count(decision.reason or "allowed")
    return decision


_COUNTERS: dict[str, Any] = {}


def _count(reason: str) -> None:
    counter = _COUNTERS.get(reason)
    if counter is None:
        counter = _COUNTERS[reason] = DECISIONS.labels(reason=reason)
    counter.inc()


async def answer_authorize(
    policy: Policy, service_token: str | None, body: bytes | None
) -> JSONResponse:
    """The whole `POST /authorize`: gate, parse, decide; `body` None when it was too large."""
    gate = _gate(policy, service_token)
    if isinstance(gate, JSONResponse):
        return gate
    if body is None:
        return _error(
            413, REQUEST_TOO_LARGE, "Request body too large.", gate.position,
            "invalid_request_error",
        )  # fmt: skip
    try:
        parsed = AuthorizeRequest.model_validate_json(body)
    except ValidationError as exc:
        return _invalid(exc, gate.position)
    decision = await authorize_request(policy, parsed, gate)
    return FastJSONResponse(decision.body, status_code=decision.status, headers=decision.headers)


class AuthorizeFastPath:
    """`POST /authorize` straight to the decision, ahead of FastAPI's routing and dependency
    solving (which cost more than the decision itself); everything else passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/authorize" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        policy: Policy = scope["app"].state.policy
        token = None
        for name, value in scope["headers"]:
            if name == b"x-quota-service-token":
                token = value.decode("latin-1")
        limit = policy.settings.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks) if size <= limit else None
        response = await answer_authorize(policy, token, body)
        await response(scope, receive, send)


def _with_reservation(decision: Decision, held: HoldOutcome) -> Decision:
    reservation = held.reservation
    assert reservation is not None
    body = dict(decision.body)
    body["balance"] = held.balance
    body["available"] = held.balance - held.held
    body["reservation"] = {
        "id": reservation.reservation_id,
        "amount": reservation.amount,
        "expires_at": format_time(reservation.expires_at),
        "state": reservation.state,
    }
    body["position"] = max(body["position"], reservation.held_position)
    return Decision(  # not dataclasses.replace: this runs for every hold
        decision.status, decision.allowed, decision.reason, body, decision.retry_after,
        decision.rate_limit_key, decision.rate_limit,
    )  # fmt: skip


def reservation_body(reservation: Reservation) -> dict[str, Any]:
    return {
        "id": reservation.reservation_id,
        "account_id": reservation.account_id,
        "amount": reservation.amount,
        "state": reservation.state,
        "request_id": reservation.request_id,
        "expires_at": format_time(reservation.expires_at),
        "held_position": reservation.held_position,
        "ended_position": reservation.ended_position,
        "settled_amount": reservation.settled_amount,
        "ended_by": reservation.ended_by,
    }


def _invalid(exc: ValidationError | ValueError, position: int) -> JSONResponse:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        detail = f"{where}: {first['msg']}"
    else:
        detail = str(exc)
    return _error(
        400,
        INVALID_REQUEST,
        f"Bad Request – {detail}",
        position,
        "invalid_request_error",
    )


_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,30}\s*")


def _header_integer(value: str, name: str) -> int:
    """An integer header value in ASCII digits; a `ValueError` naming the header otherwise."""
    if not _INTEGER.fullmatch(value):
        raise ValueError(f"{name}: must be an integer, got {value[:40]!r}")
    return int(value)


def _header_value(value: object) -> str:
    """A value as an HTTP header can carry it: printable ASCII as is, anything else (an id with
    a newline, or beyond Latin-1) percent-encoded as UTF-8."""
    text = str(value)
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["ops"], response_model=None, responses={200: {"model": Health}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Snapshot not loaded, or stale"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """200 while decisions can be answered: the snapshot is loaded and the ledger was heard
        from within QUOTA_MAX_STALENESS_SECONDS (or QUOTA_FAIL_OPEN); `reason` names what is
        degraded meanwhile (e.g. the database is away: holds are refused, checks answered)."""
        policy: Policy = request.app.state.policy
        store = policy.store
        settings = policy.settings
        reason = None if store.health.ok else f"snapshot listener: {store.health.reason}"
        ready = store.snapshot is not None
        if not ready:
            reason = "snapshot not loaded" + (f" ({reason})" if reason else "")
        elif not settings.fail_open and (
            store.seconds_since_heard() > settings.max_staleness_seconds
        ):
            ready = False
            reason = (
                f"stale: the ledger was last heard from {store.seconds_since_heard():.1f}s ago"
                + (f" ({reason})" if reason else "")
            )
        body = Readiness(ready=ready, position=store.position, reason=reason)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/authorize",
        tags=["authorize"],
        response_model=None,
        responses=DECISION_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": inline_schema(AuthorizeRequest)}},
            }
        },
    )
    async def authorize(
        request: Request,
        x_quota_service_token: Annotated[str | None, Header()] = None,
    ) -> Response:
        # Served by `AuthorizeFastPath` in front of the router; this route documents it and
        # answers the same should the middleware be bypassed.
        body = await request.body()
        policy: Policy = request.app.state.policy
        too_large = len(body) > policy.settings.max_request_bytes
        return await answer_authorize(policy, x_quota_service_token, None if too_large else body)

    @app.get(
        "/reservations/{reservation_id}",
        tags=["reservations"],
        response_model=None,
        responses={200: {"model": ReservationState}, **RESERVATION_REFUSALS},
    )
    async def get_reservation(
        reservation_id: str,
        request: Request,
        x_quota_service_token: Annotated[str | None, Header()] = None,
    ) -> Response:
        policy: Policy = request.app.state.policy
        refused = _service_refusal(policy, x_quota_service_token)
        if refused is not None:
            return refused
        reservation = await policy.reservations.get(reservation_id)
        if reservation is None:
            return JSONResponse({"error": f"unknown reservation {reservation_id}"}, 404)
        return JSONResponse(reservation_body(reservation))

    @app.post(
        "/reservations/{reservation_id}/release",
        tags=["reservations"],
        response_model=None,
        responses={
            200: {"model": ReservationState, "description": "Released (now or before)"},
            **RESERVATION_REFUSALS,
            409: {"model": ReservationState, "description": "Already settled or expired"},
        },
    )
    async def release_reservation(
        reservation_id: str,
        request: Request,
        x_quota_service_token: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Release a hold; releasing it again answers the same (idempotent)."""
        policy: Policy = request.app.state.policy
        refused = _service_refusal(policy, x_quota_service_token)
        if refused is not None:
            return refused
        reservation = await policy.reservations.release(reservation_id, "api:release")
        if reservation is None:
            return JSONResponse({"error": f"unknown reservation {reservation_id}"}, 404)
        status = 200 if reservation.state == "released" else 409
        return JSONResponse(reservation_body(reservation), status_code=status)

    async def forward(
        request: Request,
        x_quota_service_token: Annotated[str | None, Header()] = None,
    ) -> Response:
        """nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz: inputs from headers."""
        policy: Policy = request.app.state.policy
        gate = _gate(policy, x_quota_service_token)
        if isinstance(gate, JSONResponse):
            return _for_nginx(request, gate)
        headers = request.headers
        forwarded_for = headers.get("x-forwarded-for", "")
        fields: dict[str, Any] = {
            "authorization": headers.get("authorization"),
            "client_ip": forwarded_for.split(",")[0].strip() or None,
            "route": headers.get("x-forwarded-uri") or headers.get("x-original-uri"),
            "model": headers.get("x-quota-model"),
            "channel_id": headers.get("x-quota-channel") or None,
            "request_id": headers.get("x-request-id") or None,
        }
        cost = headers.get("x-quota-estimated-cost")
        try:
            if cost:
                fields["estimated_cost"] = _header_integer(cost, "X-Quota-Estimated-Cost")
            parsed = AuthorizeRequest.model_validate(fields)
        except (ValidationError, ValueError) as exc:
            return _for_nginx(request, _invalid(exc, gate.position))
        decision = await authorize_request(policy, parsed, gate)
        response = JSONResponse(
            decision.body, status_code=decision.status, headers=decision.headers
        )
        return _for_nginx(request, response)

    for method in ("GET", "POST"):
        app.add_api_route(
            "/authorize/forward",
            forward,
            methods=[method],
            tags=["authorize"],
            operation_id=f"authorize_forward_{method.lower()}",
            response_model=None,
            responses=forward_responses(),
            openapi_extra={"parameters": FORWARD_PARAMETERS},
        )


def _for_nginx(request: Request, response: JSONResponse) -> Response:
    """Add X-Quota-* headers; nginx's auth_request only passes 2xx, 401 and 403 through."""
    body: dict[str, Any] = json.loads(bytes(response.body))
    status = response.status_code
    headers = response.headers
    headers["X-Quota-Allowed"] = "true" if body.get("allowed") else "false"
    headers["X-Quota-Status"] = str(status)
    headers["X-Quota-Position"] = str(body.get("position", 0))
    if body.get("allowed"):
        for name, field in (("Account", "account_id"), ("Token", "token_id"), ("Role", "role"),
                            ("Group", "group"), ("Balance", "balance"),
                            ("Available", "available")):  # fmt: skip
            headers[f"X-Quota-{name}"] = _header_value(body[field])
        if body.get("reservation"):
            headers["X-Quota-Reservation"] = _header_value(body["reservation"]["id"])
    else:
        headers["X-Quota-Reason"] = _header_value(body["error"]["reason"])
        headers["X-Quota-Error-Body"] = json.dumps(body, ensure_ascii=True)
        if request.headers.get("x-quota-auth-request", "").lower() == "nginx" and status not in (
            401,
            403,
        ):
            response.status_code = 403
    return response
