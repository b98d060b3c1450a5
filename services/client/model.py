"""The client's vocabulary: the fail modes, reasons, decisions, reservations and retry
policy it answers with."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, TypeVar

import httpx

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
