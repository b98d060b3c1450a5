"""The state model both services share: the projections' rows as frozen dataclasses, the
`State` a fold works on, and the `Changes` it reports. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

ACTIVE: Final = "active"
SUSPENDED: Final = "suspended"
BLACKLISTED: Final = "blacklisted"


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    balance: int = 0
    held: int = 0
    status: str = ACTIVE
    role: str = "user"
    group: str = "default"
    position: int = 0


@dataclass(frozen=True, slots=True)
class Token:
    token_id: str
    account_id: str
    key_sha256: str
    key_last6: str
    expires_at: datetime | None
    allowed_cidrs: tuple[str, ...]
    allowed_models: tuple[str, ...]
    revoked: bool
    position: int


@dataclass(frozen=True, slots=True)
class Channel:
    channel_id: int
    models: tuple[str, ...]
    groups: tuple[str, ...]
    enabled: bool
    rate_limited_until: datetime | None
    position: int


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model: str
    kind: str
    limits: dict[str, Any]
    position: int


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    route: str
    min_role: str
    position: int


@dataclass(frozen=True, slots=True)
class RateLimit:
    account_id: str
    model: str
    requests: int
    window_seconds: int
    position: int


HELD: Final = "held"
SETTLED: Final = "settled"
RELEASED: Final = "released"
EXPIRED: Final = "expired"

#: Where derived events (written by the ledger itself, not received) say they come from.
LEDGER_SOURCE: Final = "quota/ledger"


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    account_id: str
    amount: int
    request_id: str | None
    state: str
    expires_at: datetime
    held_position: int
    ended_position: int | None = None
    settled_amount: int | None = None
    ended_by: str | None = None


@dataclass(slots=True)
class State:
    """The projections, or the part of them a batch needs. Keys are the tables' primary keys."""

    accounts: dict[str, Account] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    routes: dict[str, RoutePolicy] = field(default_factory=dict)
    rate_limits: dict[tuple[str, str], RateLimit] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    #: key_sha256 -> token_id for every known token (revoked ones too: a key is never reused).
    token_keys: dict[str, str] = field(default_factory=dict)

    def copy(self) -> State:
        return State(
            accounts=dict(self.accounts),
            tokens=dict(self.tokens),
            channels=dict(self.channels),
            models=dict(self.models),
            routes=dict(self.routes),
            rate_limits=dict(self.rate_limits),
            reservations=dict(self.reservations),
            token_keys=dict(self.token_keys),
        )


@dataclass(slots=True)
class Changes:
    """Primary keys of the rows a fold wrote; `rate_limits` includes removed ones."""

    accounts: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    channels: set[int] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    routes: set[str] = field(default_factory=set)
    rate_limits: set[tuple[str, str]] = field(default_factory=set)
    reservations: set[str] = field(default_factory=set)

    @property
    def catalog(self) -> bool:
        return bool(self.channels or self.models or self.routes)
