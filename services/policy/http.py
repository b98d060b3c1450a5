"""The policy service's HTTP edge: the routes, the `POST /authorize` fast path, and the
forward-auth adapter (nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz).

Decisions are rendered here, once (`decision_response`); the forward-auth headers come from
the typed decision, not from the JSON it renders. Non-decision errors (an unknown
reservation) answer `{"error": "..."}`; `ReservationUnavailable` is mapped to the decision's
`503 reservation_unavailable` shape in one handler (`register`).
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Final
from urllib.parse import quote

import orjson
import structlog
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from services import http_metrics, tracing
from services.contract.cloudevent import format_time
from services.errors import error_body, error_response, install
from services.openapi_docs import inline_schema
from services.ops import add_ops_routes
from services.policy.api_models import (
    DECISION_RESPONSES,
    FORWARD_PARAMETERS,
    RESERVATION_REFUSALS,
    forward_responses,
)
from services.policy.api_models import Reservation as ReservationState
from services.policy.decision import Decision
from services.policy.request import AuthorizeRequest, parse_authorize
from services.policy.service import (
    Policy,
    ReservationUnavailable,
    counted,
    invalid_request,
    request_too_large,
    reservation_unavailable,
)
from services.store.model import Reservation
from services.supervise import Readiness

log = structlog.get_logger("quota.policy.http")


def _policy(request: Request) -> Policy:
    policy: Policy = request.app.state.policy
    return policy


#: The running policy service, for the routes (built by the lifespan).
PolicyDep = Annotated[Policy, Depends(_policy)]
ServiceToken = Annotated[str | None, Header()]


class ServiceRefused(Exception):
    """The gateway's service token was missing or wrong: `decision` is the 401 to answer."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


def _served_policy(policy: PolicyDep, x_quota_service_token: ServiceToken = None) -> Policy:
    """The policy, for a caller whose service token it accepts (else `ServiceRefused`)."""
    refused = policy.refuse_service(x_quota_service_token)
    if refused is not None:
        raise ServiceRefused(refused)
    return policy


#: The policy behind the service-token gate: the reservation routes take this.
ServedPolicyDep = Annotated[Policy, Depends(_served_policy)]


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson: the decision path is answered thousands of times a second."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def decision_response(decision: Decision) -> Response:
    return FastJSONResponse(decision.body, status_code=decision.status, headers=decision.headers)


async def authorize_decision(
    policy: Policy, service_token: str | bytes | None, body: bytes | None
) -> Decision:
    """The whole `POST /authorize`: gate, parse, decide; `body` None when it was too large."""
    gate = policy.gate(service_token)
    if isinstance(gate, Decision):
        return gate
    if body is None:
        return counted(request_too_large(gate.position))
    try:
        parsed = parse_authorize(body)
    except ValidationError as exc:
        return counted(invalid_request(exc, gate.position))
    return await policy.authorize(parsed, gate)


_JSON: Final = (b"content-type", b"application/json")
_INTERNAL_ERROR: Final = orjson.dumps(
    error_body("internal_error", "Internal server error.", "api_error")
)


def _rendered(decision: Decision) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A decision as the status, headers and body of its HTTP answer."""
    body = orjson.dumps(decision.body)
    headers = [_JSON, (b"content-length", b"%d" % len(body))]
    for name, value in decision.headers.items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return decision.status, headers, body


async def serve_authorize(policy: Policy, scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /authorize` as bare ASGI: read the body (up to QUOTA_MAX_REQUEST_BYTES), decide,
    answer. Counted and timed by `quota_http_*` like every other request; an exception is
    answered 500 and logged, as the framework would."""
    started = time.perf_counter()
    token: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"x-quota-service-token":
            token = value
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
    body = (chunks[0] if len(chunks) == 1 else b"".join(chunks)) if size <= limit else None
    try:
        pending = authorize_decision(policy, token, body)
        if tracing.TRACER is not None:  # traces on: a server span, parent from `traceparent`
            pending = tracing.authorize_span("POST /authorize", scope["headers"], pending)
        status, headers, payload = _rendered(await pending)
    except Exception:
        log.exception("POST /authorize failed")
        status, payload = 500, _INTERNAL_ERROR
        headers = [_JSON, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    _OBSERVED.observe(status, time.perf_counter() - started)


_OBSERVED: Final = http_metrics.observer("policy")


class PolicyApp(FastAPI):
    """The policy's FastAPI application, with `POST /authorize` answered ahead of its
    middleware, routing and dependency solving (which cost more than the decision itself) by
    `serve_authorize`; every other request, and the lifespan, go through FastAPI. The route
    registered for `/authorize` documents it (OpenAPI) and answers the same."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/authorize" and scope["method"] == "POST":
            await serve_authorize(self.state.policy, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


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


def _unknown_reservation(reservation_id: str) -> Response:
    return error_response(404, "unknown_reservation", f"unknown reservation {reservation_id}")


async def _reservation_unavailable(request: Request, exc: Exception) -> Response:
    """A reservation read or release that met a lost or refusing database: 503, retry."""
    log.warning("database unavailable", path=request.url.path, error=str(exc))
    return decision_response(reservation_unavailable(_policy(request).store.position))


async def _service_refused(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceRefused)
    return decision_response(exc.decision)


def register(app: FastAPI) -> None:
    """The routes, the fast path in front of them, and the domain errors' handlers."""
    _routes(app)
    install(app)
    app.add_exception_handler(ReservationUnavailable, _reservation_unavailable)
    app.add_exception_handler(ServiceRefused, _service_refused)


async def _readiness(request: Request) -> Readiness:
    """Ready while decisions can be answered: the snapshot is loaded and the ledger was heard
    from within QUOTA_MAX_STALENESS_SECONDS (or QUOTA_FAIL_OPEN); `reason` names what is
    degraded meanwhile (e.g. the database is away: holds are refused, checks answered)."""
    return _policy(request).readiness()


def _routes(app: FastAPI) -> None:
    add_ops_routes(app, _readiness, "Snapshot not loaded, or stale")

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
        request: Request, policy: PolicyDep, x_quota_service_token: ServiceToken = None
    ) -> Response:
        # Served by `PolicyApp` ahead of the router; this route documents it and answers the
        # same for an app mounted otherwise.
        body = await request.body()
        too_large = len(body) > policy.settings.max_request_bytes
        pending = authorize_decision(policy, x_quota_service_token, None if too_large else body)
        if tracing.TRACER is not None:
            pending = tracing.authorize_span("POST /authorize", request.headers.raw, pending)
        return decision_response(await pending)

    @app.get(
        "/reservations/{reservation_id}",
        tags=["reservations"],
        response_model=None,
        responses={200: {"model": ReservationState}, **RESERVATION_REFUSALS},
    )
    async def get_reservation(reservation_id: str, policy: ServedPolicyDep) -> Response:
        reservation = await policy.get_reservation(reservation_id)
        if reservation is None:
            return _unknown_reservation(reservation_id)
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
    async def release_reservation(reservation_id: str, policy: ServedPolicyDep) -> Response:
        """Release a hold; releasing it again answers the same (idempotent)."""
        reservation = await policy.release(reservation_id)
        if reservation is None:
            return _unknown_reservation(reservation_id)
        status = 200 if reservation.state == "released" else 409
        return JSONResponse(reservation_body(reservation), status_code=status)

    async def forward(
        request: Request, policy: PolicyDep, x_quota_service_token: ServiceToken = None
    ) -> Response:
        """nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz: inputs from headers."""
        pending = _forward_decision(request, policy, x_quota_service_token)
        if tracing.TRACER is not None:  # traces on: a server span, parent from `traceparent`
            name = f"{request.method} /authorize/forward"
            pending = tracing.authorize_span(name, request.headers.raw, pending)
        return _forwarded(request, await pending)

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


# ------------------------------------------------------------------------------ forward-auth

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


async def _forward_decision(
    request: Request, policy: Policy, service_token: str | None
) -> Decision:
    """The forward-auth decision: gate, the inputs from the gateway's headers, decide."""
    gate = policy.gate(service_token)
    if isinstance(gate, Decision):
        return gate
    try:
        parsed = _forward_request(request)
    except (ValidationError, ValueError) as exc:
        return counted(invalid_request(exc, gate.position))
    return await policy.authorize(parsed, gate)


def _forward_request(request: Request) -> AuthorizeRequest:
    """The `/authorize` inputs, from the gateway's headers."""
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
    if cost:
        fields["estimated_cost"] = _header_integer(cost, "X-Quota-Estimated-Cost")
    return AuthorizeRequest.model_validate(fields)


def _forwarded(request: Request, decision: Decision) -> Response:
    """The decision with X-Quota-* headers (and X-RateLimit-* for the limit it was counted
    against); nginx's auth_request only passes 2xx, 401 and 403 through, so for nginx
    (`X-Quota-Auth-Request: nginx`) other denials become 403 (the real status is in
    X-Quota-Status)."""
    body = decision.body
    headers = {
        **decision.headers,
        "X-Quota-Allowed": "true" if decision.allowed else "false",
        "X-Quota-Status": str(decision.status),
        "X-Quota-Position": str(decision.position),
    }
    status = decision.status
    grant, denial = decision.grant, decision.denial
    if grant is not None:
        named = (
            ("Account", grant.account_id), ("Token", grant.token_id), ("Role", grant.role),
            ("Group", grant.group), ("Balance", grant.balance), ("Available", grant.available),
        )  # fmt: skip
        for name, value in named:
            headers[f"X-Quota-{name}"] = _header_value(value)
        if grant.reservation is not None:
            headers["X-Quota-Reservation"] = _header_value(grant.reservation.id)
    elif denial is not None:
        headers["X-Quota-Reason"] = _header_value(denial.reason)
        headers["X-Quota-Error-Body"] = json.dumps(body, ensure_ascii=True)
        nginx = request.headers.get("x-quota-auth-request", "").lower() == "nginx"
        if nginx and status not in (401, 403):
            status = 403
    return JSONResponse(body, status_code=status, headers=headers)
