"""The event contract: one typed model for the data of every event type we consume.

Integers are strict (no floats, no numeric strings) because quota is money: a `1.5` or a `"5"`
in an amount is bad data, not something to coerce.
"""

from __future__ import annotations

import ipaddress
import zoneinfo
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)

INT64_MAX: Final = 2**63 - 1
CATALOG_SUBJECT: Final = "catalog"

Role = Literal["guest", "user", "admin", "root"]
ROLE_RANK: Final[dict[str, int]] = {"guest": 0, "user": 1, "admin": 10, "root": 100}

Amount = Annotated[StrictInt, Field(gt=0, le=INT64_MAX)]
NonNegativeAmount = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=256)]
MaxConcurrent = Annotated[StrictInt, Field(gt=0, le=2**31 - 1)]
KeySha256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{64}$")]


def _check_cidr(value: str) -> str:
    """Accept an IPv4/IPv6 network or bare address; store it in normal form."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR: {value!r}") from exc


Cidr = Annotated[StrictStr, AfterValidator(_check_cidr)]


class EventData(BaseModel):
    """Base of every event's data; unknown extra fields are kept out of the fold but allowed."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class AccountOpened(EventData):
    role: Role = "user"
    group: Name = "default"


class AccountRecharged(EventData):
    amount: Amount


class AccountUsageRecorded(EventData):
    amount: NonNegativeAmount
    model: Name | None = None
    request_id: Name | None = None
    token_id: Name | None = None
    reservation_id: Name | None = None


class AccountRefunded(EventData):
    amount: Amount
    reason: StrictStr | None = None


class AccountAdjusted(EventData):
    delta: Annotated[StrictInt, Field(ge=-INT64_MAX, le=INT64_MAX)]
    reason: StrictStr

    @model_validator(mode="after")
    def _nonzero(self) -> AccountAdjusted:
        if self.delta == 0:
            raise ValueError("delta must not be 0")
        return self


class AccountStatusChanged(EventData):
    """`suspended`, `blacklisted` and `reinstated` share this shape."""

    reason: StrictStr | None = None


class AccountRoleChanged(EventData):
    role: Role


class AccountGroupChanged(EventData):
    group: Name


class AccountRateLimitSet(EventData):
    """`requests` allowed decisions, and at most `units` of their `estimated_cost` summed, per
    window; both 0 (or `units` absent) removes the limit."""

    model: Name
    requests: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
    window_seconds: Annotated[StrictInt, Field(gt=0, le=10 * 365 * 86400)]
    units: Annotated[StrictInt, Field(ge=0, le=INT64_MAX)] | None = None


class AccountLimitsSet(EventData):
    """`max_concurrent`: at most that many active holds of the account at once (null removes)."""

    max_concurrent: MaxConcurrent | None = None


BudgetPeriod = Literal["day", "week", "month", "total"]


def _check_timezone(value: str) -> str:
    """An IANA time zone name this machine knows (`Europe/Berlin`, `UTC`)."""
    if not value or len(value) > 64 or value.startswith(("/", ".")) or ".." in value:
        raise ValueError(f"not an IANA time zone: {value!r}")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"not an IANA time zone: {value!r}") from exc
    return value


class BudgetSet(EventData):
    """A spending cap per period for the account, or for one of its tokens; optionally for one
    model. The same `budget_id` replaces it."""

    budget_id: Name
    scope: Literal["account", "token"]
    token_id: Name | None = None
    model: Name | None = None
    amount: Amount
    period: BudgetPeriod
    timezone: Annotated[StrictStr, AfterValidator(_check_timezone)] = "UTC"

    @model_validator(mode="after")
    def _token_scope(self) -> BudgetSet:
        if self.scope == "token" and self.token_id is None:
            raise ValueError("a token budget needs token_id")
        if self.scope == "account" and self.token_id is not None:
            raise ValueError("an account budget takes no token_id")
        return self


class BudgetRemoved(EventData):
    budget_id: Name


class TokenIssued(EventData):
    token_id: Name
    key_sha256: KeySha256
    key_last6: Annotated[StrictStr, Field(min_length=1, max_length=6)]
    expires_at: AwareDatetime | None = None
    allowed_cidrs: list[Cidr] = Field(default_factory=list)
    allowed_models: list[Name] = Field(default_factory=list)
    max_concurrent: MaxConcurrent | None = None


class TokenUpdated(EventData):
    token_id: Name
    expires_at: AwareDatetime | None = None
    allowed_cidrs: list[Cidr] | None = None
    allowed_models: list[Name] | None = None
    max_concurrent: MaxConcurrent | None = None


class TokenRotated(EventData):
    """A new key for the same token; the previous key works until `previous_valid_until`."""

    token_id: Name
    key_sha256: KeySha256
    key_last6: Annotated[StrictStr, Field(min_length=1, max_length=6)]
    previous_valid_until: AwareDatetime


class TokenRevoked(EventData):
    token_id: Name


ChannelId = Annotated[StrictInt, Field(gt=0, le=INT64_MAX)]


class ChannelRegistered(EventData):
    channel_id: ChannelId
    models: list[Name]
    groups: list[Name]


class ChannelRef(EventData):
    """`quota.channel.disabled` and `.enabled`."""

    channel_id: ChannelId


class ChannelProviderRateLimited(EventData):
    channel_id: ChannelId
    until: AwareDatetime


class ModelLimits(EventData):
    max_prompt_chars: Annotated[StrictInt, Field(gt=0)] | None = None
    sizes: list[Name] | None = None
    n_min: Annotated[StrictInt, Field(ge=0)] | None = None
    n_max: Annotated[StrictInt, Field(ge=0)] | None = None
    max_input_chars: Annotated[StrictInt, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _n_range(self) -> ModelLimits:
        if self.n_min is not None and self.n_max is not None and self.n_min > self.n_max:
            raise ValueError("n_min must not exceed n_max")
        return self


class ModelRegistered(EventData):
    model: Name
    kind: Literal["chat", "image", "audio", "embedding"]
    limits: ModelLimits = Field(default_factory=ModelLimits)


class RoutePolicySet(EventData):
    route: Annotated[StrictStr, Field(min_length=1, max_length=1024, pattern=r"^/")]
    min_role: Role


class ReservationHeld(EventData):
    """The service held `amount` of the account's available quota until `expires_at`."""

    reservation_id: Name
    amount: Amount
    expires_at: AwareDatetime
    request_id: Name | None = None
    actor: StrictStr
    #: What the hold is for: budgets and concurrency caps count it by these.
    token_id: Name | None = None
    model: Name | None = None


class ReservationSettled(EventData):
    """A usage named the hold: the hold ends; the usage itself debits `actual`."""

    reservation_id: Name
    usage_event_id: Name
    actual: NonNegativeAmount
    actor: StrictStr


class ReservationEnded(EventData):
    """`released` (by a caller) and `expired` (at its TTL) share this shape."""

    reservation_id: Name
    actor: StrictStr


RESERVATION_EVENTS: Final[dict[str, type[EventData]]] = {
    "quota.reservation.held": ReservationHeld,
    "quota.reservation.settled": ReservationSettled,
    "quota.reservation.released": ReservationEnded,
    "quota.reservation.expired": ReservationEnded,
}

ACCOUNT_EVENTS: Final[dict[str, type[EventData]]] = {
    "quota.account.opened": AccountOpened,
    "quota.account.recharged": AccountRecharged,
    "quota.account.usage_recorded": AccountUsageRecorded,
    "quota.account.refunded": AccountRefunded,
    "quota.account.adjusted": AccountAdjusted,
    "quota.account.suspended": AccountStatusChanged,
    "quota.account.blacklisted": AccountStatusChanged,
    "quota.account.reinstated": AccountStatusChanged,
    "quota.account.role_changed": AccountRoleChanged,
    "quota.account.group_changed": AccountGroupChanged,
    "quota.account.rate_limit_set": AccountRateLimitSet,
    "quota.account.limits_set": AccountLimitsSet,
    "quota.budget.set": BudgetSet,
    "quota.budget.removed": BudgetRemoved,
    "quota.token.issued": TokenIssued,
    "quota.token.updated": TokenUpdated,
    "quota.token.rotated": TokenRotated,
    "quota.token.revoked": TokenRevoked,
    **RESERVATION_EVENTS,
}

CATALOG_EVENTS: Final[dict[str, type[EventData]]] = {
    "quota.channel.registered": ChannelRegistered,
    "quota.channel.disabled": ChannelRef,
    "quota.channel.enabled": ChannelRef,
    "quota.channel.provider_rate_limited": ChannelProviderRateLimited,
    "quota.model.registered": ModelRegistered,
    "quota.route.policy_set": RoutePolicySet,
}

EVENT_TYPES: Final[dict[str, type[EventData]]] = {**ACCOUNT_EVENTS, **CATALOG_EVENTS}


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event: the CloudEvent attributes we keep, and its typed data."""

    id: str
    source: str
    type: str
    subject: str
    time: datetime | None
    data: EventData
    raw_data: dict[str, Any]
