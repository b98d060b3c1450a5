"""What the ledger's routes answer, as models for its OpenAPI schema.

The routes build their JSON themselves; these models only document it (`responses=`), so the
schema says what every status code carries and a fuzzer can hold the service to it. Models
allow fields they do not name, so a route that grows a field stays within its schema.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, Field

from services.contract.cloudevent import MAX_SUBJECT_CHARS
from services.contract.events import CATALOG_EVENTS, CATALOG_SUBJECT, EVENT_TYPES
from services.errors import ErrorBody
from services.openapi_docs import inline_schema

Responses = dict[int | str, dict[str, Any]]


class Account(BaseModel):
    account_id: str
    balance: int
    held: int
    available: int
    status: str
    role: str
    group: str
    position: int


class AccountSummary(BaseModel):
    account_id: str
    balance: int
    status: str


class AccountSearch(BaseModel):
    items: list[AccountSummary]


class RejectedEvent(BaseModel):
    id: int
    reason: str
    code: str | None = None
    event_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    raw: str | None = Field(description="The raw bytes as text, or base64 (see raw_encoding)")
    raw_encoding: str
    headers: Any = None
    received_at: str


class RejectedPage(BaseModel):
    items: list[RejectedEvent]
    next: int | None = Field(description="Pass as `after` for the next page; null at the end")


class Difference(BaseModel):
    what: str
    row: str
    expected: Any = None
    found: Any = None


class VerifyReport(BaseModel):
    ok: bool
    events_checked: int
    head_hash: str
    differences: list[Difference]


class StatementEntry(BaseModel):
    position: int
    time: str
    type: str
    amount: int
    balance: int
    event_id: str
    source: str


class Statement(BaseModel):
    account_id: str
    opening_balance: int
    closing_balance: int
    entries: list[StatementEntry]
    next: str | None


class BalanceAsOf(BaseModel):
    account_id: str
    as_of: int | str
    balance: int
    position: int | None


class EventsAccepted(BaseModel):
    ids: list[str]


class EventError(BaseModel):
    """One item of an `invalid_events` error's `details`: `index` is the event's place in the
    request (null: the request as a whole)."""

    index: int | None
    id: str | None = None
    code: str | None = None
    reason: str


# --- reusable `responses=` entries ---------------------------------------------------------

ADMIN_RESPONSES: Final[Responses] = {
    401: {"model": ErrorBody, "description": "No admin bearer token"},
    403: {"model": ErrorBody, "description": "Wrong admin bearer token"},
}
BAD_REQUEST: Final[Responses] = {
    400: {"model": ErrorBody, "description": "A bad parameter, or U+0000 in the path or query"},
}
DATABASE_UNAVAILABLE: Final[Responses] = {
    503: {
        "model": ErrorBody,
        "description": "The database is unavailable; retry (Retry-After)",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    },
}
NOT_FOUND: Final[Responses] = {404: {"model": ErrorBody, "description": "Unknown account"}}


def admin_read(ok: type[BaseModel] | None, extra: Responses | None = None) -> Responses:
    """`responses=` for an admin route answering `ok` (None: the route documents its 200),
    with its auth, bad-parameter and database refusals, and `extra`."""
    responses: Responses = {**ADMIN_RESPONSES, **BAD_REQUEST, **DATABASE_UNAVAILABLE}
    if ok is not None:
        responses[200] = {"model": ok}
    return {**responses, **(extra or {})}


# --- POST /events: the request body -------------------------------------------------------


def _event_schema(event_type: str, data_model: type[BaseModel]) -> dict[str, Any]:
    subject: dict[str, Any] = (
        {"const": CATALOG_SUBJECT}
        if event_type in CATALOG_EVENTS
        else {"type": "string", "minLength": 1, "maxLength": MAX_SUBJECT_CHARS}
    )
    return {
        "type": "object",
        "title": event_type,
        "required": ["specversion", "id", "source", "type", "subject"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "minLength": 1},
            "source": {"type": "string", "minLength": 1},
            "type": {"const": event_type},
            "subject": subject,
            # An attribute given as null is an attribute not given (null data: no data).
            "time": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
            "datacontenttype": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "data": {"anyOf": [inline_schema(data_model), {"type": "null"}]},
        },
    }


def events_request_body(max_events: int) -> dict[str, Any]:
    """The OpenAPI `requestBody` of `POST /events`: one CloudEvent or an array of them."""
    event = {"oneOf": [_event_schema(name, model) for name, model in EVENT_TYPES.items()]}
    schema = {
        "oneOf": [event, {"type": "array", "items": event, "minItems": 1, "maxItems": max_events}]
    }
    example = {
        "specversion": "1.0",
        "id": "8f9c6a2e-1d1b-4c55-9d0e-2f4a3c1b7e01",
        "source": "billing/stripe",
        "type": "quota.account.recharged",
        "subject": "acct_42",
        "time": "2026-11-24T12:00:00Z",
        "datacontenttype": "application/json",
        "data": {"amount": 500000},
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": schema, "example": example}},
    }
