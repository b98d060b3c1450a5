"""The key lifecycle (CONTRACT section 8): `POST /keys`, `POST /keys/{token_id}/rotate`,
`DELETE /keys/{token_id}` and `GET /accounts/{id}/keys`.

An `APIRouter`; the ledger application includes it. Every route needs the admin bearer token.
The ledger mints the key (a prefix and 43 random base62 characters from `secrets`), publishes
the token event with the key's SHA-256 through the same producer as `POST /events`, waits until
the event is applied (its `event_id` has a position in the event store) and only then answers,
so the key works at every policy that has reached the answer's `position`.

The plaintext key exists in this process only between minting and the answer: it is never
logged, stored, put in an event or a metric. It travels as `PlainKey`, whose `repr` hides it,
so that not even a traceback that shows local variables can print it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import string
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, TypeVar

import structlog
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic import Strict as StrictMode

from services.contract.cloudevent import (
    MAX_SUBJECT_CHARS,
    Rejection,
    decode_http_object,
    format_time,
)
from services.contract.events import Cidr, Event, MaxConcurrent, Name
from services.errors import ApiError, ErrorBody
from services.ledger import key_store
from services.ledger.api_models import NOT_FOUND, Responses, admin_read
from services.ledger.deps import Admin, Ledger, LedgerDep
from services.ledger.metrics import KEY_OPERATIONS
from services.ledger.wire import publish, read_body
from services.openapi_docs import inline_schema

log = structlog.get_logger("quota.ledger.keys")

router = APIRouter(tags=["keys"])

#: The random part of a key: base62, so that it holds no `-` (which would read as the one-api
#: `<key>-<channel_id>` suffix) and nothing that needs quoting anywhere.
ALPHABET: Final = string.ascii_letters + string.digits
#: 43 characters of base62: 43 * log2(62) = 256 bits (the contract asks for at least 190).
RANDOM_CHARS: Final = 43
DEFAULT_PREFIX: Final = "sk-"
PREFIX_PATTERN: Final = r"^[A-Za-z0-9_-]{0,16}$"
MAX_GRACE_SECONDS: Final = 7 * 86400
#: Most CIDRs or models one request may restrict a key to.
MAX_LIST: Final = 256
#: Room for the largest valid request (256 models of 256 characters, each written as a JSON
#: escape), so that anything beyond the schema's bounds is parsed and refused with a 422.
MAX_BODY_BYTES: Final = 1024 * 1024
#: The CloudEvents `source` of the events these routes publish.
SOURCE: Final = "ledger/keys"
#: An answer that carries a key must not be kept by any cache on its way.
NO_STORE: Final = {"Cache-Control": "no-store"}


class PlainKey(str):
    """A plaintext key. A `str` (it is rendered into the answer as one), but its `repr` shows
    only the last six characters, so that a traceback's local variables cannot leak it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"PlainKey(…{self[-6:]})"


def new_key(prefix: str) -> PlainKey:
    """`prefix` and RANDOM_CHARS characters drawn from ALPHABET by the OS CSPRNG."""
    return PlainKey(prefix + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS)))


def new_token_id() -> str:
    return f"tok_{secrets.token_hex(12)}"


def key_sha256(key: str) -> str:
    """What the policy compares: the hex SHA-256 of the whole key as UTF-8."""
    return hashlib.sha256(key.encode()).hexdigest()


# --- requests and answers -------------------------------------------------------------------

StrictTime = Annotated[AwareDatetime, StrictMode()]


class IssueKey(BaseModel):
    """`POST /keys`."""

    model_config = ConfigDict(extra="forbid")

    account_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_SUBJECT_CHARS)]
    prefix: Annotated[
        StrictStr,
        Field(pattern=PREFIX_PATTERN, description="At most 16 of [A-Za-z0-9_-]; may be empty"),
    ] = DEFAULT_PREFIX
    expires_at: StrictTime | None = Field(
        default=None, description="RFC 3339 with an offset, in the future; null: never"
    )
    allowed_cidrs: Annotated[list[Cidr], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="IPv4/IPv6 CIDRs or bare addresses; empty: any"
    )
    allowed_models: Annotated[list[Name], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="Empty: any model"
    )
    max_concurrent: MaxConcurrent | None = Field(
        default=None, description="At most this many active holds of the key at once"
    )


class RotateKey(BaseModel):
    """`POST /keys/{token_id}/rotate` (the body may be left out: no grace, prefix `sk-`)."""

    model_config = ConfigDict(extra="forbid")

    grace_seconds: Annotated[StrictInt, Field(ge=0, le=MAX_GRACE_SECONDS)] = Field(
        default=0, description="How long the previous key keeps working"
    )
    prefix: Annotated[
        StrictStr,
        Field(
            pattern=PREFIX_PATTERN,
            description="The new key's prefix (prefixes are not stored, so give the token's own "
            "if it is not `sk-`)",
        ),
    ] = DEFAULT_PREFIX


class KeyIssued(BaseModel):
    token_id: str
    key: str = Field(description="The plaintext key: shown here once, stored nowhere")
    key_last6: str
    account_id: str
    expires_at: str | None
    position: int = Field(description="The key works at every policy that has reached it")


class KeyRotated(BaseModel):
    token_id: str
    key: str = Field(description="The new plaintext key: shown here once, stored nowhere")
    key_last6: str
    previous_valid_until: str = Field(description="The previous key works until then")
    position: int


class KeyRevoked(BaseModel):
    token_id: str
    position: int


class KeyInfo(BaseModel):
    token_id: str
    key_last6: str
    expires_at: str | None
    revoked: bool
    allowed_cidrs: list[str]
    allowed_models: list[str]
    max_concurrent: int | None
    previous_valid_until: str | None = Field(
        description="After a rotation: until when the previous key was (or is) accepted"
    )
    position: int = Field(description="The position of the token's last change")


class AccountKeys(RootModel[list[KeyInfo]]):
    """The account's keys: a JSON array, by `token_id`."""


Body = TypeVar("Body", bound=BaseModel)


def _request_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": inline_schema(model)}},
        }
    }


_PUBLISHING: Final[Responses] = {
    409: {"model": ErrorBody, "description": "The ledger refused the event (`event_rejected`)"},
    503: {
        "model": ErrorBody,
        "description": "The broker or the database is unavailable, or the event was not "
        "applied in time (`apply_timeout`); retry (Retry-After)",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    },
}
_BODY: Final[Responses] = {
    413: {"model": ErrorBody, "description": "Body over 1 MiB"},
    422: {"model": ErrorBody, "description": "The body is not JSON, or not a valid request"},
}
_UNKNOWN_TOKEN: Final[Responses] = {
    404: {"model": ErrorBody, "description": "Unknown token (or, for rotate, a revoked one)"}
}


# --- the routes -----------------------------------------------------------------------------


@router.post(
    "/keys",
    dependencies=[Admin],
    status_code=201,
    summary="Issue a key",
    response_model=None,
    openapi_extra=_request_body(IssueKey, required=True),
    responses=admin_read(None, {201: {"model": KeyIssued}, **_BODY, **_PUBLISHING}),
)
async def issue_key(request: Request, ledger: LedgerDep) -> JSONResponse:
    """Mint a key for the account (an unknown account is opened, as by any of its events),
    publish `quota.token.issued` and answer once it is applied."""
    body = await _parse(request, IssueKey, required=True)
    now = datetime.now(UTC)
    expires_at = _future(body.expires_at, now)
    token_id = new_token_id()
    key = new_key(body.prefix)
    data: dict[str, Any] = {
        "token_id": token_id,
        "key_sha256": key_sha256(key),
        "key_last6": key[-6:],
        "expires_at": format_time(expires_at) if expires_at is not None else None,
        "allowed_cidrs": list(body.allowed_cidrs),
        "allowed_models": list(body.allowed_models),
    }
    if body.max_concurrent is not None:
        data["max_concurrent"] = body.max_concurrent
    event = _event("quota.token.issued", body.account_id, data, now)
    lost = (
        f"token {token_id} may still be issued later; its key is not returned and can never "
        f"be shown: revoke {token_id} and issue another key"
    )
    position = await _apply(ledger, event, token_id, lost)
    KEY_OPERATIONS.labels(operation="issue").inc()
    log.info("key issued", token_id=token_id, account_id=body.account_id, position=position)
    answer = {
        "token_id": token_id,
        "key": key,
        "key_last6": key[-6:],
        "account_id": body.account_id,
        "expires_at": data["expires_at"],
        "position": position,
    }
    return JSONResponse(answer, status_code=201, headers=NO_STORE)


@router.post(
    "/keys/{token_id}/rotate",
    dependencies=[Admin],
    summary="Rotate a key (a new key for the same token)",
    response_model=None,
    openapi_extra=_request_body(RotateKey, required=False),
    responses=admin_read(KeyRotated, {**_UNKNOWN_TOKEN, **_BODY, **_PUBLISHING}),
)
async def rotate_key(token_id: str, request: Request, ledger: LedgerDep) -> JSONResponse:
    """A new key for the token; the previous one works `grace_seconds` longer. The token keeps
    its id, and with it its budgets, limits and history."""
    body = await _parse(request, RotateKey, required=False)
    async with ledger.pool.acquire() as conn:
        token = await key_store.get_token(conn, token_id)
    if token is None:
        raise _unknown_token(token_id)
    if token.revoked:
        raise ApiError(404, "unknown_token", f"token {token_id} is revoked")
    now = datetime.now(UTC)
    valid_until = format_time(now + timedelta(seconds=body.grace_seconds))
    key = new_key(body.prefix)
    data = {
        "token_id": token_id,
        "key_sha256": key_sha256(key),
        "key_last6": key[-6:],
        "previous_valid_until": valid_until,
    }
    event = _event("quota.token.rotated", token.account_id, data, now)
    lost = (
        f"the rotation of {token_id} may still be applied later, and its new key is not "
        f"returned: check key_last6 in GET /accounts/{{id}}/keys; if it changed, rotate again"
    )
    position = await _apply(ledger, event, token_id, lost)
    KEY_OPERATIONS.labels(operation="rotate").inc()
    log.info("key rotated", token_id=token_id, account_id=token.account_id, position=position,
             previous_valid_until=valid_until)  # fmt: skip
    answer = {
        "token_id": token_id,
        "key": key,
        "key_last6": key[-6:],
        "previous_valid_until": valid_until,
        "position": position,
    }
    return JSONResponse(answer, headers=NO_STORE)


@router.delete(
    "/keys/{token_id}",
    dependencies=[Admin],
    summary="Revoke a key",
    response_model=None,
    responses=admin_read(KeyRevoked, {**_UNKNOWN_TOKEN, **_PUBLISHING}),
)
async def revoke_key(token_id: str, ledger: LedgerDep) -> JSONResponse:
    """Publish `quota.token.revoked` and answer once it is applied. Revoking a revoked token
    publishes nothing and answers the position of the token's last change (its revocation)."""
    async with ledger.pool.acquire() as conn:
        token = await key_store.get_token(conn, token_id)
    if token is None:
        raise _unknown_token(token_id)
    if token.revoked:
        return JSONResponse({"token_id": token_id, "position": token.position})
    event = _event("quota.token.revoked", token.account_id, {"token_id": token_id}, None)
    lost = f"the revocation of {token_id} may still be applied later; repeat the request"
    position = await _apply(ledger, event, token_id, lost)
    KEY_OPERATIONS.labels(operation="revoke").inc()
    log.info("key revoked", token_id=token_id, account_id=token.account_id, position=position)
    return JSONResponse({"token_id": token_id, "position": position})


@router.get(
    "/accounts/{account_id}/keys",
    dependencies=[Admin],
    tags=["accounts"],
    summary="An account's keys (never a secret)",
    response_model=None,
    responses=admin_read(AccountKeys, NOT_FOUND),
)
async def account_keys(account_id: str, ledger: LedgerDep) -> list[dict[str, Any]]:
    """Every token of the account, revoked ones included, by `token_id`, as a JSON array: no
    key and no hash. 404 for an account the ledger has never seen; an account without keys
    has an empty array."""
    async with ledger.pool.acquire() as conn:
        tokens = await key_store.account_tokens(conn, account_id)
        if not tokens and not await key_store.account_exists(conn, account_id):
            raise ApiError(404, "unknown_account", f"unknown account {account_id}")
    return [
        {
            "token_id": token.token_id,
            "key_last6": token.key_last6,
            "expires_at": _time(token.expires_at),
            "revoked": token.revoked,
            "allowed_cidrs": token.allowed_cidrs,
            "allowed_models": token.allowed_models,
            "max_concurrent": token.max_concurrent,
            "previous_valid_until": _time(token.previous_valid_until),
            "position": token.position,
        }
        for token in tokens
    ]


# --- helpers --------------------------------------------------------------------------------


async def _parse(request: Request, model: type[Body], *, required: bool) -> Body:
    """The body as `model`: 413 when too large, 422 (the one error shape) when it is not JSON
    or not valid; an empty body is `{}` unless `required`."""
    raw = await read_body(request, MAX_BODY_BYTES)
    if raw is None:
        raise ApiError(413, "request_too_large", f"body over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if required:
            raise ApiError(422, "invalid_request", "body: a JSON object is required")
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = json.loads(exc.json(include_url=False, include_input=False))
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in ["body", *first.get("loc", ())])
        raise ApiError(
            422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", details=problems
        ) from None


def _future(expires_at: datetime | None, now: datetime) -> datetime | None:
    """`expires_at` in UTC; 422 when it is not after `now` (a dead key) or beyond UTC's range."""
    if expires_at is None:
        return None
    try:
        in_utc = expires_at.astimezone(UTC)
    except OverflowError:
        raise ApiError(422, "invalid_request", "body.expires_at: out of range") from None
    if in_utc <= now:
        raise ApiError(
            422, "invalid_request", "body.expires_at: must be in the future (the key would be dead)"
        )
    return in_utc


def _event(type_: str, subject: str, data: dict[str, Any], now: datetime | None) -> Event:
    """The event as `POST /events` would take it (the same validation); 422 if it is not one."""
    obj = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "type": type_,
        "subject": subject,
        "time": format_time(now or datetime.now(UTC)),
        "datacontenttype": "application/json",
        "data": data,
    }
    try:
        return decode_http_object(obj)
    except Rejection as rejection:
        raise ApiError(422, "invalid_request", rejection.reason) from None


async def _apply(ledger: Ledger, event: Event, token_id: str, lost: str) -> int:
    """Publish `event` and wait until the ledger has applied it; its position.

    409 `event_rejected` when the fold quarantined it (e.g. the token was revoked meanwhile);
    503 `broker_unavailable` when it could not be published, `apply_timeout` when it was not
    applied within QUOTA_KEY_APPLY_TIMEOUT_SECONDS (`lost` says what that leaves behind)."""
    try:
        await publish(ledger.producer, ledger.settings.topic, [event])
    except KafkaError as exc:
        log.error("publish failed", error=str(exc), token_id=token_id)
        raise ApiError(
            503,
            "broker_unavailable",
            f"broker unavailable: {exc}",
            headers={"Retry-After": "1"},
        ) from None
    loop = asyncio.get_running_loop()
    timeout = ledger.settings.key_apply_timeout_seconds
    deadline = loop.time() + timeout
    delay = 0.005
    while True:
        async with ledger.pool.acquire() as conn:
            found = await key_store.outcome(conn, event.id)
        if found.position is not None:
            return found.position
        if found.reason is not None:
            raise ApiError(
                409,
                "event_rejected",
                f"the ledger refused {event.type} for {token_id}: {found.reason}",
                details=[{"event_id": event.id, "code": found.code, "reason": found.reason}],
            )
        if loop.time() >= deadline:
            log.warning("key event not applied in time", token_id=token_id, event_id=event.id,
                        type=event.type, timeout=timeout)  # fmt: skip
            raise ApiError(
                503,
                "apply_timeout",
                f"{event.type} for {token_id} was published but not applied within "
                f"{timeout:g} s (is a ledger consuming the topic?); {lost}",
                details=[{"event_id": event.id, "token_id": token_id}],
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _unknown_token(token_id: str) -> ApiError:
    return ApiError(404, "unknown_token", f"unknown token {token_id}")


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None
