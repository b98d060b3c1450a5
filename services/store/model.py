"""The state model both services share: the projections' rows as frozen dataclasses, the
`State` a fold works on, and the `Changes` it reports. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final


class FoldError(Exception):
    """The event is well-formed but cannot be applied to this state (e.g. an unknown token)."""


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
    #: At most this many active holds at once (None: no cap), and how many there are.
    max_concurrent: int | None = None
    holds: int = 0


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
    max_concurrent: int | None = None
    #: After a rotation: the previous key, accepted until `previous_valid_until`.
    previous_key_sha256: str | None = None
    previous_valid_until: datetime | None = None
    #: Active holds made with this token (what `max_concurrent` caps).
    holds: int = 0


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
    #: At most this much `estimated_cost` over allowed decisions per window (None: no cap).
    units: int | None = None


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
    token_id: str | None = None
    model: str | None = None


ACCOUNT_SCOPE: Final = "account"
TOKEN_SCOPE: Final = "token"


@dataclass(frozen=True, slots=True)
class Budget:
    """A cap on what an account (or one of its tokens; optionally for one model) may spend per
    period. `held` is the active holds it covers, kept with it like an account's `held`."""

    budget_id: str
    account_id: str
    scope: str
    token_id: str | None
    model: str | None
    amount: int
    period: str
    timezone: str
    held: int
    position: int

    def covers(self, token_id: str | None, model: str | None) -> bool:
        """Whether spend (or a hold) by `token_id` on `model` counts toward this budget."""
        if self.token_id is not None and token_id != self.token_id:
            return False
        return self.model is None or model == self.model


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
    #: key_sha256 -> token_id for every known token (revoked ones too: a key is never reused);
    #: a rotated token's previous key too.
    token_keys: dict[str, str] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)
    #: account_id -> its budgets, account budgets first, each scope by id: the order checks
    #: 13a and 13b weigh them in (an index over `budgets`).
    budgets_by_account: dict[str, tuple[Budget, ...]] = field(default_factory=dict)
    #: (budget_id, period start) -> the usage spent in that period.
    budget_spend: dict[tuple[str, datetime], int] = field(default_factory=dict)
    #: account_id -> ids of its held reservations (an index over `reservations`; held for
    #: the accounts whose reservations the state holds).
    active: dict[str, set[str]] = field(default_factory=dict)
    #: (account_id, token_id, model, 15-minute bucket start) -> usage amount. Not a projection:
    #: what a budget set mid-period counts from the history (a replay folds it all; the ledger
    #: reads the part a batch's budgets need from the event store).
    usage: dict[tuple[str, str | None, str | None, datetime], int] = field(default_factory=dict)
    #: Whether the fold keeps `usage` (a replay: always; a ledger batch: when it sets a budget).
    track_usage: bool = True

    def account_budgets(self, account_id: str) -> tuple[Budget, ...]:
        return self.budgets_by_account.get(account_id, ())

    def put_token(self, token: Token) -> None:
        """Store a token row, indexing its key (and a rotated token's previous key)."""
        self.tokens[token.token_id] = token
        self.token_keys[token.key_sha256] = token.token_id
        if token.previous_key_sha256 is not None:
            self.token_keys[token.previous_key_sha256] = token.token_id

    def put_budget(self, budget: Budget) -> None:
        self.budgets[budget.budget_id] = budget
        others = (b for b in self.account_budgets(budget.account_id)
                  if b.budget_id != budget.budget_id)  # fmt: skip
        self.budgets_by_account[budget.account_id] = tuple(
            sorted((*others, budget), key=lambda b: (b.scope != ACCOUNT_SCOPE, b.budget_id))
        )

    def drop_budget(self, budget_id: str) -> None:
        budget = self.budgets.pop(budget_id, None)
        if budget is not None:
            rest = tuple(b for b in self.account_budgets(budget.account_id)
                         if b.budget_id != budget_id)  # fmt: skip
            if rest:
                self.budgets_by_account[budget.account_id] = rest
            else:
                del self.budgets_by_account[budget.account_id]

    def put_reservation(self, reservation: Reservation) -> None:
        """Store a reservation row, keeping the `active` index in step."""
        self.reservations[reservation.reservation_id] = reservation
        ids = self.active.setdefault(reservation.account_id, set())
        if reservation.state == HELD:
            ids.add(reservation.reservation_id)
        else:
            ids.discard(reservation.reservation_id)

    def active_reservations(self, account_id: str) -> list[Reservation]:
        return [self.reservations[i] for i in sorted(self.active.get(account_id, ()))]

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
            budgets=dict(self.budgets),
            budgets_by_account=dict(self.budgets_by_account),
            budget_spend=dict(self.budget_spend),
            active={key: set(ids) for key, ids in self.active.items()},
            usage=dict(self.usage),
            track_usage=self.track_usage,
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
    #: Budgets written or removed (`budget_spend` rows are only ever added to).
    budgets: set[str] = field(default_factory=set)
    budget_spend: set[tuple[str, datetime]] = field(default_factory=set)
    #: The accounts whose budgets, or their spend or held, changed.
    budget_accounts: set[str] = field(default_factory=set)
    #: Tokens whose count of active holds changed (and nothing else: policies need not hear).
    token_holds: set[str] = field(default_factory=set)

    @property
    def catalog(self) -> bool:
        return bool(self.channels or self.models or self.routes)
