"""A typed client of the quota services for Python gateways, on httpx: `QuotaClient` (sync) and
`AsyncQuotaClient` (async), with the same API.

    quota = AsyncQuotaClient("http://policy:8081", fail_mode=FailMode.CLOSED,
                             service_token=SERVICE_TOKEN,
                             ledger_url="http://ledger:8080", ledger_token=ADMIN_TOKEN)
    decision = await quota.authorize(authorization, model="gpt-4o",
                                     route="/v1/chat/completions", estimated_cost=2_000)
    if not decision.allowed:                     # answer the client as the policy did
        return decision.status, decision.raw, decision.headers
    ...                                          # call the upstream, then one of:
    await quota.settle(decision, used)           # usage_recorded with the reservation_id
    await quota.release(decision.reservation.id) # the upstream failed: free the hold

A transport error, or a 503 with Retry-After of the service's own, is retried (`Retry`) with
the same body, hence the same `request_id` (one is made for a hold that has none), so a retry
never holds twice. When the policy cannot decide after the retries, `FailMode` decides, which
the caller must choose. See docs/client.md.

The two classes differ only in their transport (and the retry loop's sleep): requests are built
and answers parsed once, in `_Core`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import quote

import httpx

from services.contract.samples import cloud_event, structured

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: Degraded decisions are logged here (WARNING); as a library, silent until the app configures
#: logging (the decision itself says `degraded`, with its `cause`).
log = logging.getLogger("quota.client")
log.addHandler(logging.NullHandler())

SERVICE_TOKEN_HEADER: Final = "X-Quota-Service-Token"
USAGE_RECORDED: Final = "quota.account.usage_recorded"
#: What a gateway answers when the policy could not decide (as deploy/nginx and deploy/caddy do).
UNAVAILABLE_MESSAGE: Final = "The quota service could not decide; try again later."

Produce = Callable[[bytes, bytes], object]
"""A sync Kafka producer, called with (key, value): the subject and the structured CloudEvent.
The caller binds the topic, e.g. `lambda k, v: producer.produce("quota.events", v, key=k)`."""
AsyncProduce = Callable[[bytes, bytes], Awaitable[object]]
"""An async producer, e.g. `lambda k, v: producer.send_and_wait("quota.events", v, key=k)`."""


class FailMode(StrEnum):
    """What `authorize` answers when the policy cannot decide after the retries (unreachable, a
    timeout, an answer that is not a decision, or its own `snapshot_stale` /
    `reservation_unavailable`): `OPEN` allows, `CLOSED` denies. Either decision is flagged
    `degraded`, with reason `quota_unavailable`, except that `CLOSED` returns the policy's own
    503 as it is when there is one."""

    OPEN = "open"
    CLOSED = "closed"


class Reason(StrEnum):
    """Why a decision is denied (or degraded): every reason the policy answers, and this
    client's own. `UNKNOWN` stands for a reason this client does not know (a newer server);
    `Decision.reason_code` keeps its text."""

    # The error table, checks 1-14 and 13a-13c (services/policy/errors.py).
    TOKEN_MISSING = "token_missing"
    TOKEN_INVALID = "token_invalid"
    IP_NOT_ALLOWED = "ip_not_allowed"
    ACCOUNT_SUSPENDED = "account_suspended"
    INSUFFICIENT_PERMISSIONS = "insufficient_permissions"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    CHANNEL_PIN_FORBIDDEN = "channel_pin_forbidden"
    INVALID_CHANNEL_ID = "invalid_channel_id"
    CHANNEL_DISABLED = "channel_disabled"
    MODEL_UNAVAILABLE = "model_unavailable"
    PROMPT_MISSING = "prompt_missing"
    PROMPT_TOO_LONG = "prompt_too_long"
    SIZE_NOT_SUPPORTED = "size_not_supported"
    N_NOT_WITHIN_RANGE = "n_not_within_range"
    TEXT_TOO_LONG = "text_too_long"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    INSUFFICIENT_USER_QUOTA = "insufficient_user_quota"
    BUDGET_EXCEEDED = "budget_exceeded"
    TOKEN_BUDGET_EXCEEDED = "token_budget_exceeded"
    CONCURRENCY_LIMITED = "concurrency_limited"
    RATE_LIMITED = "rate_limited"
    # The policy service's own refusals (services/policy/service.py).
    INVALID_REQUEST = "invalid_request"
    SERVICE_TOKEN_INVALID = "service_token_invalid"
    REQUEST_TOO_LARGE = "request_too_large"
    SNAPSHOT_STALE = "snapshot_stale"
    RESERVATION_UNAVAILABLE = "reservation_unavailable"
    # This client's.
    QUOTA_UNAVAILABLE = "quota_unavailable"
    UNKNOWN = "unknown"

    @classmethod
    def of(cls, code: str) -> Reason:
        """The reason named `code`; `UNKNOWN` for one this client does not know."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


#: The policy's answers that say it cannot decide now: retried, then the fail mode decides.
_UNDECIDED: Final = frozenset({Reason.SNAPSHOT_STALE, Reason.RESERVATION_UNAVAILABLE})


class QuotaError(Exception):
    """A call the service refused: `status` and the error's `code` (None when there was no
    answer: the transport error is the exception's `__cause__`)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class QuotaUnavailable(QuotaError):
    """No answer after the retries (a transport error), or the service's 503."""


# --------------------------------------------------------------------------------- answers

_T = TypeVar("_T", bound="DataclassInstance")


def _pick(cls: type[_T], obj: Mapping[str, Any]) -> _T:
    """`cls` from the fields of a JSON object it names (absent ones None; others ignored)."""
    return cls(**{f.name: obj.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class Hold:
    """The reservation an allowed decision holds (`state` `held`); for a retried `request_id`
    whose hold has ended, how it ended (`settled`, `released`): nothing is held for it now."""

    id: str
    amount: int
    expires_at: str
    state: str


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget that covered an allowed decision, its figures including the hold."""

    budget_id: str
    scope: str
    period: str
    amount: int
    spent: int
    held: int
    remaining: int
    resets_at: str | None


@dataclass(frozen=True, slots=True)
class Reservation:
    """`GET /reservations/{id}`: `state` is `held`, `settled`, `released` or `expired`."""

    id: str
    account_id: str
    amount: int
    state: str
    request_id: str | None
    expires_at: str
    held_position: int
    ended_position: int | None
    settled_amount: int | None
    ended_by: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to `authorize`.

    Denied: `reason` (`reason_code` is the text answered), `message`, `retry_after` (on 429 and
    the 503s). Allowed: the account, the key's `token_id`, `balance` and `available`, the
    eligible `channels`, the `reservation` held when `estimated_cost` was given, and the
    `budgets` that covered it. Either: `status`, `position` (the ledger position seen), `raw`
    (the JSON answered) and `headers` (Retry-After, X-RateLimit-*): a gateway answers its
    client with `status`, `raw` and `headers` as they are. `request_id` and `model` are what
    was asked (the request id made for a hold included); `settle` records them.

    `degraded`: the policy could not decide and this client did, by its `FailMode`: `reason`
    is `quota_unavailable` and `cause` says what failed; an allowed degraded decision knows no
    account and holds nothing. A `CLOSED` one's `raw` is the body gateways answer then."""

    allowed: bool
    status: int
    reason: Reason | None = None
    reason_code: str | None = None
    message: str | None = None
    retry_after: int | None = None
    position: int | None = None
    account_id: str | None = None
    token_id: str | None = None
    role: str | None = None
    group: str | None = None
    balance: int | None = None
    available: int | None = None
    channels: tuple[int, ...] = ()
    reservation: Hold | None = None
    budgets: tuple[Budget, ...] = ()
    request_id: str | None = None
    model: str | None = None
    degraded: bool = False
    cause: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, hash=False, repr=False)
    headers: Mapping[str, str] = field(default_factory=httpx.Headers, hash=False, repr=False)


# --------------------------------------------------------------------------------- retries


@dataclass(frozen=True, slots=True)
class Retry:
    """When and how calls are retried: after a transport error (no answer, a timeout), or a
    503 with Retry-After that is the service's own (`snapshot_stale`,
    `reservation_unavailable`, the ledger's `broker_unavailable`; not `provider_rate_limited`,
    a decision to pass on). At most `attempts` calls in all, and none started more than
    `total_seconds` after the first; in between, `backoff` seconds doubled per retry up to
    `max_backoff` (with jitter: 50-100%), or the answer's Retry-After up to
    `max_retry_after`. Each call is bounded by the HTTP client's timeout."""

    attempts: int = 3
    total_seconds: float = 5.0
    backoff: float = 0.1
    max_backoff: float = 2.0
    max_retry_after: float = 2.0

    def pause(self, retries: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `retries` (1, 2, ...)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return min(self.backoff * 2.0 ** (retries - 1), self.max_backoff) * random.uniform(0.5, 1)


#: One call, no retry (a load generator that counts every answer, say).
NO_RETRY: Final = Retry(attempts=1)

_Outcome = httpx.Response | httpx.TransportError


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_field(body: Any, name: str) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    value = error.get(name) if isinstance(error, dict) else None
    return value if isinstance(value, str) else None


def _retry_after(outcome: _Outcome) -> tuple[bool, float | None]:
    """Whether `outcome` is worth another attempt, and the Retry-After it asks for."""
    if isinstance(outcome, httpx.TransportError):
        return True, None
    header = outcome.headers.get("retry-after", "").strip()
    if outcome.status_code != 503 or not header.isdigit():
        return False, None
    if _error_field(_json(outcome), "reason") == Reason.PROVIDER_RATE_LIMITED:
        return False, None
    return True, float(header)


class _Attempts:
    """The retry loop's state: `pause(outcome)` is None to stop with `outcome`, else the
    seconds to wait before the next attempt."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.made = 0
        self.started = time.monotonic()

    def pause(self, outcome: _Outcome) -> float | None:
        self.made += 1
        again, retry_after = _retry_after(outcome)
        if not again or self.made >= self.retry.attempts:
            return None
        pause = self.retry.pause(self.made, retry_after)
        if time.monotonic() - self.started + pause > self.retry.total_seconds:
            return None
        return pause


def _describe(outcome: _Outcome) -> str:
    if isinstance(outcome, httpx.TransportError):
        return f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__
    answer = _json(outcome)
    code = _error_field(answer, "reason") or _error_field(answer, "code")
    return f"HTTP {outcome.status_code}" + (f" {code}" if code else "")


def _error(outcome: _Outcome, what: str) -> QuotaError:
    """The exception for a call that did not get the answer it wanted."""
    if isinstance(outcome, httpx.TransportError):
        error: QuotaError = QuotaUnavailable(f"{what}: {_describe(outcome)}")
        error.__cause__ = outcome
        return error
    kind = QuotaUnavailable if outcome.status_code == 503 else QuotaError
    code = _error_field(_json(outcome), "code")
    return kind(f"{what}: {_describe(outcome)}", status=outcome.status_code, code=code)


# --------------------------------------------------------------------------------- the core


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    url: str
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _Core:
    """What both clients share: the configuration, the requests and reading the answers."""

    def __init__(
        self,
        policy_url: str,
        fail_mode: FailMode,
        service_token: str | None,
        ledger_url: str | None,
        ledger_token: str | None,
        retry: Retry,
        source: str,
    ) -> None:
        if not isinstance(fail_mode, FailMode):
            raise TypeError("fail_mode must be FailMode.OPEN or FailMode.CLOSED")
        self.policy_url = policy_url.rstrip("/")
        self.fail_mode = fail_mode
        self.ledger_url = ledger_url.rstrip("/") if ledger_url else None
        self.retry = retry
        self.source = source
        self.policy_headers = {"Content-Type": "application/json"}
        if service_token is not None:
            self.policy_headers[SERVICE_TOKEN_HEADER] = service_token
        self.ledger_headers = {"Content-Type": "application/json"}
        if ledger_token is not None:
            self.ledger_headers["Authorization"] = f"Bearer {ledger_token}"

    # authorize

    def authorize_call(
        self,
        authorization: str | None,
        model: str | None,
        route: str | None,
        client_ip: str | None,
        channel_id: str | int | None,
        request: Mapping[str, Any] | None,
        estimated_cost: int | None,
        request_id: str | None,
        dry_run: bool,
    ) -> tuple[_Call, dict[str, Any]]:
        """The `POST /authorize` call and its body. A hold without `request_id` gets one when
        it may be retried, so that a retry (of this very body) finds the hold instead of making
        a second; with `NO_RETRY` the body is sent as given."""
        retried = self.retry.attempts > 1
        if estimated_cost is not None and request_id is None and not dry_run and retried:
            request_id = f"qc-{uuid.uuid4().hex}"
        given = {
            "authorization": authorization, "model": model, "route": route,
            "client_ip": client_ip, "channel_id": channel_id, "request": request,
            "estimated_cost": estimated_cost, "request_id": request_id,
        }  # fmt: skip
        body = {name: value for name, value in given.items() if value is not None}
        if dry_run:
            body["dry_run"] = True
        content = json.dumps(body, separators=(",", ":")).encode()
        return _Call("POST", f"{self.policy_url}/authorize", content, self.policy_headers), body

    def decision(self, outcome: _Outcome, body: Mapping[str, Any]) -> Decision:
        """The answer as a `Decision`; the fail mode's when the policy could not decide."""
        answer = _json(outcome) if isinstance(outcome, httpx.Response) else None
        if not (isinstance(answer, dict) and isinstance(answer.get("allowed"), bool)):
            return self.fallback(_describe(outcome), body)
        assert isinstance(outcome, httpx.Response)
        decision = _parse_decision(outcome, answer, body)
        if decision.reason in _UNDECIDED and self.fail_mode is FailMode.OPEN:
            return self.fallback(_describe(outcome), body)
        return decision

    def fallback(self, cause: str, body: Mapping[str, Any]) -> Decision:
        """The decision of the fail mode, when the policy could not decide because of `cause`."""
        log.warning("quota policy could not decide (%s): failing %s", cause, self.fail_mode)
        asked: dict[str, Any] = {"request_id": body.get("request_id"), "model": body.get("model")}
        code = Reason.QUOTA_UNAVAILABLE
        if self.fail_mode is FailMode.OPEN:
            return Decision(True, 200, code, code.value, cause=cause, degraded=True, **asked)
        error = {"message": UNAVAILABLE_MESSAGE, "type": "service_unavailable", "code": None,
                 "reason": code.value}  # fmt: skip
        return Decision(
            False, 503, code, code.value, UNAVAILABLE_MESSAGE, retry_after=1, degraded=True,
            cause=cause, raw={"allowed": False, "error": error},
            headers=httpx.Headers({"Retry-After": "1"}),
            **asked,
        )  # fmt: skip

    # reservations

    def reservation_call(self, reservation_id: str, release: bool) -> _Call:
        path = f"/reservations/{quote(reservation_id, safe='')}"
        if release:
            return _Call("POST", f"{self.policy_url}{path}/release", None, self.policy_headers)
        return _Call("GET", f"{self.policy_url}{path}", None, self.policy_headers)

    def reservation(self, outcome: _Outcome, what: str) -> Reservation | None:
        """The reservation answered (200, or a release's 409: already settled or expired);
        None for an unknown id; else `QuotaError`."""
        if isinstance(outcome, httpx.Response):
            answer = _json(outcome)
            if outcome.status_code in (200, 409) and isinstance(answer, dict):
                return _pick(Reservation, answer)
            if outcome.status_code == 404 and _error_field(answer, "code") == "unknown_reservation":
                return None
        raise _error(outcome, what)

    # events

    def usage(
        self, decision: Decision, amount: int, model: str | None, event_id: str | None
    ) -> dict[str, Any] | None:
        """The `usage_recorded` event settling `decision` (its hold, when it has one); None
        for a degraded decision, which knows no account."""
        if not decision.allowed:
            raise ValueError("settle: the decision was denied; there is nothing to settle")
        if decision.account_id is None:
            log.warning("settle: a degraded decision knows no account; usage %d not recorded",
                        amount)  # fmt: skip
            return None
        data: dict[str, Any] = {"amount": amount}
        optional = {
            "model": model or decision.model, "token_id": decision.token_id,
            "request_id": decision.request_id,
            "reservation_id": decision.reservation.id if decision.reservation else None,
        }  # fmt: skip
        data.update((name, value) for name, value in optional.items() if value is not None)
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return cloud_event(USAGE_RECORDED, decision.account_id, data, event_id=event_id,
                           time=now, source=self.source)  # fmt: skip

    def publish_call(self, events: Sequence[Mapping[str, Any]]) -> _Call:
        if self.ledger_url is None:
            raise ValueError("publishing needs ledger_url (POST /events) or a produce callable")
        content = json.dumps(list(events), separators=(",", ":")).encode()
        return _Call("POST", f"{self.ledger_url}/events", content, self.ledger_headers)

    def published(self, outcome: _Outcome) -> list[str]:
        if isinstance(outcome, httpx.Response) and outcome.status_code == 202:
            ids: list[str] = outcome.json()["ids"]
            return ids
        raise _error(outcome, "POST /events")


def _parse_decision(
    response: httpx.Response, answer: dict[str, Any], body: Mapping[str, Any]
) -> Decision:
    """A decision's JSON (CONTRACT section 3), typed."""
    headers = httpx.Headers(
        [
            (name, value)
            for name, value in response.headers.multi_items()
            if name == "retry-after" or name.startswith("x-ratelimit-")
        ]
    )
    retry_after = response.headers.get("retry-after", "").strip()
    common: dict[str, Any] = {
        "status": response.status_code,
        "position": answer.get("position"),
        "retry_after": int(retry_after) if retry_after.isdigit() else None,
        "request_id": body.get("request_id"),
        "model": body.get("model"),
        "raw": answer,
        "headers": headers,
    }
    if not answer["allowed"]:
        code = _error_field(answer, "reason") or _error_field(answer, "code") or "unknown"
        message = _error_field(answer, "message")
        return Decision(False, reason=Reason.of(code), reason_code=code, message=message, **common)
    hold = answer.get("reservation")
    return Decision(
        True,
        account_id=answer.get("account_id"),
        token_id=answer.get("token_id"),
        role=answer.get("role"),
        group=answer.get("group"),
        balance=answer.get("balance"),
        available=answer.get("available"),
        channels=tuple(answer.get("channels") or ()),
        reservation=_pick(Hold, hold) if isinstance(hold, dict) else None,
        budgets=tuple(
            _pick(Budget, item) for item in answer.get("budgets") or () if isinstance(item, dict)
        ),
        **common,
    )


# --------------------------------------------------------------------------------- clients


class QuotaClient:
    """The sync client. `fail_mode` has no default: choose what a gateway does when the policy
    cannot decide. `http`: an `httpx.Client` of your own (connection reuse, tests), used as
    it is (its timeouts apply) and not closed here; else one is made with `timeout` seconds.
    `ledger_url` and `ledger_token` (the ledger's admin bearer token) publish usage through
    `POST /events`; or `produce` publishes it to Kafka (see `Produce`)."""

    def __init__(
        self,
        policy_url: str,
        *,
        fail_mode: FailMode,
        service_token: str | None = None,
        ledger_url: str | None = None,
        ledger_token: str | None = None,
        produce: Produce | None = None,
        retry: Retry = Retry(),
        timeout: float | httpx.Timeout = 2.0,
        http: httpx.Client | None = None,
        source: str = "quota-client",
    ) -> None:
        self._core = _Core(
            policy_url, fail_mode, service_token, ledger_url, ledger_token, retry, source
        )
        self._produce = produce
        self._owned = http is None
        self._http = httpx.Client(timeout=timeout) if http is None else http

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client, when this client made it."""
        if self._owned:
            self._http.close()

    def _send(self, call: _Call) -> _Outcome:
        attempts = _Attempts(self._core.retry)
        while True:
            try:
                outcome: _Outcome = self._http.request(
                    call.method, call.url, content=call.content, headers=call.headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            pause = attempts.pause(outcome)
            if pause is None:
                return outcome
            time.sleep(pause)

    def authorize(
        self,
        authorization: str | None,
        *,
        model: str | None = None,
        route: str | None = None,
        client_ip: str | None = None,
        channel_id: str | int | None = None,
        request: Mapping[str, Any] | None = None,
        estimated_cost: int | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """`POST /authorize` (docs/authorize.md): `authorization` is the client's own
        Authorization value; `request` the fields of its body that validation needs (`prompt`,
        `size`, `n`, `input`); `estimated_cost` holds that much until settled or released."""
        call, body = self._core.authorize_call(
            authorization, model, route, client_ip, channel_id, request, estimated_cost,
            request_id, dry_run,
        )  # fmt: skip
        return self._core.decision(self._send(call), body)

    def reservation(self, reservation_id: str) -> Reservation | None:
        """`GET /reservations/{id}`: the reservation, or None for an unknown id."""
        call = self._core.reservation_call(reservation_id, release=False)
        return self._core.reservation(self._send(call), f"GET reservation {reservation_id}")

    def release(self, reservation_id: str) -> Reservation | None:
        """`POST /reservations/{id}/release` (idempotent): the reservation, `released`, or as
        it ended before (`settled`, `expired`); None for an unknown id. Raises `QuotaError`
        when the policy refuses (`QuotaUnavailable` when it cannot be reached): the hold then
        ends at its TTL."""
        call = self._core.reservation_call(reservation_id, release=True)
        return self._core.reservation(self._send(call), f"release {reservation_id}")

    def publish(self, *events: dict[str, Any]) -> list[str]:
        """Publish CloudEvents (structured, as JSON objects): through `produce`, keyed by
        subject (its errors propagate as they are), else `POST /events`, retried with the same
        events (the ledger stores an id once). Their ids; `QuotaError` when the ledger refuses
        them."""
        if self._produce is not None:
            for event in events:
                self._produce(event["subject"].encode(), structured(event))
            return [event["id"] for event in events]
        return self._core.published(self._send(self._core.publish_call(events)))

    def settle(
        self,
        decision: Decision,
        amount: int,
        *,
        model: str | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """Record `amount` used by an allowed decision: a `quota.account.usage_recorded` with
        its account, token, model, request id and `reservation_id` (which settles the hold).
        The event's id; None for a degraded decision (no account to charge)."""
        event = self._core.usage(decision, amount, model, event_id)
        return None if event is None else self.publish(event)[0]


class AsyncQuotaClient:
    """The async client: `QuotaClient`'s API with coroutines, on an `httpx.AsyncClient`;
    `produce` is async (see `AsyncProduce`)."""

    def __init__(
        self,
        policy_url: str,
        *,
        fail_mode: FailMode,
        service_token: str | None = None,
        ledger_url: str | None = None,
        ledger_token: str | None = None,
        produce: AsyncProduce | None = None,
        retry: Retry = Retry(),
        timeout: float | httpx.Timeout = 2.0,
        http: httpx.AsyncClient | None = None,
        source: str = "quota-client",
    ) -> None:
        self._core = _Core(
            policy_url, fail_mode, service_token, ledger_url, ledger_token, retry, source
        )
        self._produce = produce
        self._owned = http is None
        self._http = httpx.AsyncClient(timeout=timeout) if http is None else http

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client, when this client made it."""
        if self._owned:
            await self._http.aclose()

    async def _send(self, call: _Call) -> _Outcome:
        attempts = _Attempts(self._core.retry)
        while True:
            try:
                outcome: _Outcome = await self._http.request(
                    call.method, call.url, content=call.content, headers=call.headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            pause = attempts.pause(outcome)
            if pause is None:
                return outcome
            await asyncio.sleep(pause)

    async def authorize(
        self,
        authorization: str | None,
        *,
        model: str | None = None,
        route: str | None = None,
        client_ip: str | None = None,
        channel_id: str | int | None = None,
        request: Mapping[str, Any] | None = None,
        estimated_cost: int | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """See `QuotaClient.authorize`."""
        call, body = self._core.authorize_call(
            authorization, model, route, client_ip, channel_id, request, estimated_cost,
            request_id, dry_run,
        )  # fmt: skip
        return self._core.decision(await self._send(call), body)

    async def reservation(self, reservation_id: str) -> Reservation | None:
        """See `QuotaClient.reservation`."""
        call = self._core.reservation_call(reservation_id, release=False)
        return self._core.reservation(await self._send(call), f"GET reservation {reservation_id}")

    async def release(self, reservation_id: str) -> Reservation | None:
        """See `QuotaClient.release`."""
        call = self._core.reservation_call(reservation_id, release=True)
        return self._core.reservation(await self._send(call), f"release {reservation_id}")

    async def publish(self, *events: dict[str, Any]) -> list[str]:
        """See `QuotaClient.publish`."""
        if self._produce is not None:
            for event in events:
                await self._produce(event["subject"].encode(), structured(event))
            return [event["id"] for event in events]
        return self._core.published(await self._send(self._core.publish_call(events)))

    async def settle(
        self,
        decision: Decision,
        amount: int,
        *,
        model: str | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """See `QuotaClient.settle`."""
        event = self._core.usage(decision, amount, model, event_id)
        return None if event is None else (await self.publish(event))[0]
