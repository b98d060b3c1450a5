"""What the policy's routes answer, as models for its OpenAPI schema.

The routes render their JSON themselves (the decision path does not go through FastAPI); these
models only document it (`responses=`), so the schema says what every status code carries and a
fuzzer can hold the service to it. Models allow fields they do not name.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, Field

from services.errors import ErrorBody as ServiceError

Responses = dict[int | str, dict[str, Any]]


class ReservationRef(BaseModel):
    id: str
    amount: int
    expires_at: str


class Allowed(BaseModel):
    allowed: Literal[True]
    account_id: str
    token_id: str
    role: str
    group: str
    balance: int
    available: int
    channels: list[int] = Field(description="The eligible channel ids")
    reservation: ReservationRef | None
    position: int = Field(description="The ledger position the decision saw")


class DecisionError(BaseModel):
    message: str
    type: str
    code: str | None
    reason: str


class Denied(BaseModel):
    """A refusal: a denied decision, or the service's own (service token, body, freshness)."""

    allowed: Literal[False]
    error: DecisionError
    position: int


class Reservation(BaseModel):
    id: str
    account_id: str
    amount: int
    state: Literal["held", "settled", "released", "expired"]
    request_id: str | None
    expires_at: str
    held_position: int
    ended_position: int | None
    settled_amount: int | None
    ended_by: str | None


_RETRY_AFTER: Final = {
    "Retry-After": {"description": "Whole seconds", "schema": {"type": "string"}},
}

#: Check 14's figures, when the account has a limit for the model and the decision was counted
#: against it: the cap (requests or units, whichever is closer to used up, or the one that
#: denied), what is left of it, and the whole seconds until the window holds nothing.
_RATE_LIMIT: Final = {
    name: {"description": text, "required": False, "schema": {"type": "string"}}
    for name, text in (
        ("X-RateLimit-Limit", "The cap reported: requests or units per window"),
        ("X-RateLimit-Remaining", "What is left of that cap in the window, after this decision"),
        ("X-RateLimit-Reset", "Whole seconds until every counted decision has left the window"),
    )
}

#: Every answer of `POST /authorize` and forward-auth (CONTRACT §3).
DECISION_RESPONSES: Final[Responses] = {
    200: {"model": Allowed, "description": "Allowed", "headers": _RATE_LIMIT},
    400: {
        "model": Denied,
        "description": "Invalid request (not JSON, a wrong type, a bad header), invalid channel "
        "ID, or a request-limit check",
    },
    401: {"model": Denied, "description": "No or invalid key, or wrong X-Quota-Service-Token"},
    403: {
        "model": Denied,
        "description": "IP, suspension, permission, model, pin, channel or quota",
    },
    413: {"model": Denied, "description": "Request body too large"},
    429: {"model": Denied, "description": "Rate limited", "headers": _RETRY_AFTER | _RATE_LIMIT},
    503: {
        "model": Denied,
        "description": "Model unavailable, provider rate limited, a stale snapshot, or a hold "
        "that could not be written",
        "headers": _RETRY_AFTER,
    },
}

#: The refusals of the reservation routes (the service token, a NUL, the database).
RESERVATION_REFUSALS: Final[Responses] = {
    400: {"model": Denied, "description": "U+0000 in the path"},
    401: {"model": Denied, "description": "Missing or wrong X-Quota-Service-Token"},
    404: {"model": ServiceError, "description": "Unknown reservation"},
    503: {
        "model": Denied,
        "description": "The database is unavailable (reservation_unavailable)",
        "headers": _RETRY_AFTER,
    },
}

_HEADERS: Final = (
    ("Authorization", "The client's own Authorization value: `Bearer <key>` or a bare key"),
    ("X-Forwarded-For", "The client's address (the first of the list)"),
    ("X-Forwarded-Uri", "The route the client called"),
    ("X-Original-URI", "The route the client called (nginx), when X-Forwarded-Uri is absent"),
    ("X-Quota-Model", "The model asked for"),
    ("X-Quota-Channel", "A pinned channel id"),
    ("X-Quota-Estimated-Cost", "A positive integer: hold this much (a reservation)"),
    ("X-Request-Id", "Makes the hold idempotent"),
    ("X-Quota-Auth-Request", "`nginx`: answer 403 for every refusal but 401 (auth_request)"),
)

#: Forward-auth's inputs, documented as the header parameters they are.
FORWARD_PARAMETERS: Final = [
    {"name": name, "in": "header", "required": False, "description": text,
     "schema": {"type": "string"}}
    for name, text in _HEADERS
]  # fmt: skip

#: What forward-auth adds to every answer, whatever its status.
FORWARD_HEADERS: Final = {
    name: {"description": text, "required": True, "schema": {"type": "string"}}
    for name, text in (
        ("X-Quota-Allowed", "`true` or `false`"),
        ("X-Quota-Status", "The decision's own status (the answer's may differ for nginx)"),
        ("X-Quota-Position", "The ledger position the decision saw"),
    )
}


def forward_responses() -> Responses:
    """`DECISION_RESPONSES` with the X-Quota-* headers forward-auth sets on each."""
    responses: Responses = {}
    for status, entry in DECISION_RESPONSES.items():
        headers = {**entry.get("headers", {}), **FORWARD_HEADERS}
        responses[status] = {**entry, "headers": headers}
    return responses
