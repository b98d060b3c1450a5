"""The fold: events in, projections out, as a pure function over plain data.

`fold(state, events)` never touches its input: it copies the tables it is given (rows are
frozen) and returns the new state, which events were applied, which were rejected and why,
and which rows changed. The ledger runs it on the rows a batch touches; replay and verify run
it over the whole history.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, cast

from services.contract import events as ev
from services.contract.events import INT64_MAX, Event
from services.store.budget_rules import (
    budgets_hold,
    hold_refusal,
    set_budget,
    spend,
)
from services.store.model import (
    ACTIVE,
    BLACKLISTED,
    EXPIRED,
    HELD,
    LEDGER_SOURCE,
    RELEASED,
    SETTLED,
    SUSPENDED,
    TOKEN_SCOPE,
    Account,
    Changes,
    Channel,
    FoldError,
    ModelSpec,
    RateLimit,
    Reservation,
    RoutePolicy,
    State,
    Token,
)

__all__ = [
    "MONEY_EVENTS",
    "Applied",
    "FoldError",
    "FoldResult",
    "Rejected",
    "apply_event",
    "balance_delta",
    "fold",
    "settlement",
]


@dataclass(frozen=True, slots=True)
class Applied:
    position: int
    event: Event
    balance_delta: int | None


@dataclass(frozen=True, slots=True)
class Rejected:
    event: Event
    reason: str


@dataclass(slots=True)
class FoldResult:
    state: State
    applied: list[Applied]
    rejected: list[Rejected]
    changes: Changes


def fold(
    state: State,
    events: Iterable[Event],
    first_position: int,
    *,
    derive: bool = False,
    received_at: datetime | None = None,
) -> FoldResult:
    """Apply `events` in order to a copy of `state`.

    Applied events get consecutive positions from `first_position`; rejected ones get none,
    so positions stay gap-free. With `derive` (the live ledger), a usage that names a held
    reservation is followed by a `quota.reservation.settled` event the fold writes itself;
    replaying stored history does not derive, since those events are already in it.
    `received_at` stands for the time of events that carry none (budgets count usage by time).
    """
    new_state = state.copy()
    changes = Changes()
    applied: list[Applied] = []
    rejected: list[Rejected] = []
    position = first_position
    for event in events:
        try:
            delta = apply_event(new_state, changes, event, position, received_at)
        except FoldError as exc:
            rejected.append(Rejected(event, str(exc)))
            continue
        applied.append(Applied(position, event, delta))
        position += 1
        settled = settlement(new_state, event) if derive else None
        if settled is not None:
            apply_event(new_state, changes, settled, position)
            applied.append(Applied(position, settled, None))
            position += 1
    return FoldResult(new_state, applied, rejected, changes)


def settlement(state: State, event: Event) -> Event | None:
    """The `settled` event a usage derives, when it names a reservation that is still held."""
    if event.type != "quota.account.usage_recorded":
        return None
    data = cast(ev.AccountUsageRecorded, event.data)
    if data.reservation_id is None:
        return None
    reservation = state.reservations.get(data.reservation_id)
    if reservation is None or reservation.state != HELD:
        return None
    if reservation.account_id != event.subject:
        return None
    raw = {
        "reservation_id": reservation.reservation_id,
        "usage_event_id": event.id,
        "actual": data.amount,
        "actor": f"usage:{event.id}",
    }
    return Event(
        id=f"{event.id}:settled",
        source=LEDGER_SOURCE,
        type="quota.reservation.settled",
        subject=event.subject,
        time=event.time,
        data=ev.ReservationSettled.model_validate(raw),
        raw_data=raw,
    )


#: The event types that move their subject's balance (`balance_delta` is not None for them,
#: and None for every other type); replay sums their stored deltas in SQL.
MONEY_EVENTS: Final = frozenset(
    {
        "quota.account.recharged",
        "quota.account.refunded",
        "quota.account.usage_recorded",
        "quota.account.adjusted",
    }
)


def balance_delta(event: Event) -> int | None:
    """How an event moves its account's balance, or None when it does not touch it."""
    # Dispatch on the type string: a class pattern on a pydantic model is an `isinstance`
    # through its metaclass, several times slower, and this runs for every event.
    match event.type:
        case "quota.account.recharged":
            return cast(ev.AccountRecharged, event.data).amount
        case "quota.account.refunded":
            return cast(ev.AccountRefunded, event.data).amount
        case "quota.account.usage_recorded":
            return -cast(ev.AccountUsageRecorded, event.data).amount
        case "quota.account.adjusted":
            return cast(ev.AccountAdjusted, event.data).delta
        case _:
            return None


def apply_event(
    state: State,
    changes: Changes,
    event: Event,
    position: int,
    received_at: datetime | None = None,
) -> int | None:
    """Apply one event in place on a working state; raise `FoldError` to reject it.

    The state is only changed once every check has passed, so a rejected event leaves no trace.
    """
    if event.type in ev.CATALOG_EVENTS:
        _apply_catalog(state, changes, event, position)
        return None
    account = state.accounts.get(event.subject) or Account(account_id=event.subject)
    delta = balance_delta(event)
    if delta is not None:
        # The hot path (usage, recharges): build the row directly, no `replace`.
        balance = account.balance + delta
        if not -INT64_MAX <= balance <= INT64_MAX:
            raise FoldError(f"balance of {account.account_id} would leave the int64 range")
        account = Account(
            account.account_id, balance, account.held, account.status, account.role,
            account.group, position, account.max_concurrent, account.holds,
        )  # fmt: skip
        if event.type == "quota.account.usage_recorded":
            spend(state, changes, event, event.time or received_at)
    else:
        changed = _apply_account(state, changes, account, event, position, received_at)
        account = replace(changed, position=position)
    state.accounts[account.account_id] = account
    changes.accounts.add(account.account_id)
    return delta


def _apply_account(
    state: State,
    changes: Changes,
    account: Account,
    event: Event,
    position: int,
    received_at: datetime | None,
) -> Account:
    data: Any = event.data  # the model of `event.type` (checked when it was decoded)
    match event.type:
        case "quota.account.opened":
            role = data.role if "role" in event.raw_data else account.role
            group = data.group if "group" in event.raw_data else account.group
            return replace(account, role=role, group=group)
        case "quota.account.suspended":
            return replace(account, status=SUSPENDED)
        case "quota.account.blacklisted":
            return replace(account, status=BLACKLISTED)
        case "quota.account.reinstated":
            return replace(account, status=ACTIVE)
        case "quota.account.role_changed":
            return replace(account, role=data.role)
        case "quota.account.group_changed":
            return replace(account, group=data.group)
        case "quota.account.rate_limit_set":
            key = (account.account_id, data.model)
            if data.requests == 0 and not data.units:
                state.rate_limits.pop(key, None)
            else:
                state.rate_limits[key] = RateLimit(
                    account.account_id, data.model, data.requests, data.window_seconds, position,
                    data.units or None,
                )  # fmt: skip
            changes.rate_limits.add(key)
            return account
        case "quota.account.limits_set":
            return replace(account, max_concurrent=data.max_concurrent)
        case "quota.budget.set":
            if data.scope == TOKEN_SCOPE:
                _owned_token(state, account, data.token_id)
            set_budget(state, changes, account, data, position, event.time or received_at)
            return account
        case "quota.budget.removed":
            budget = state.budgets.get(data.budget_id)
            if budget is None or budget.account_id != account.account_id:
                raise FoldError(f"budget {data.budget_id} is not a budget of {account.account_id}")
            state.drop_budget(data.budget_id)
            changes.budgets.add(data.budget_id)
            changes.budget_accounts.add(account.account_id)
            return account
        case "quota.token.issued":
            _issue_token(state, account, data, position)
            changes.tokens.add(data.token_id)
            return account
        case "quota.token.updated":
            token = _owned_token(state, account, data.token_id)
            raw = event.raw_data
            token = replace(
                token,
                expires_at=data.expires_at if "expires_at" in raw else token.expires_at,
                allowed_cidrs=tuple(data.allowed_cidrs)
                if data.allowed_cidrs is not None
                else token.allowed_cidrs,
                allowed_models=tuple(data.allowed_models)
                if data.allowed_models is not None
                else token.allowed_models,
                max_concurrent=data.max_concurrent
                if "max_concurrent" in raw
                else token.max_concurrent,
                position=position,
            )
            state.tokens[token.token_id] = token
            changes.tokens.add(token.token_id)
            return account
        case "quota.token.rotated":
            token = _owned_token(state, account, data.token_id)
            key = data.key_sha256.lower()
            if token.revoked:
                raise FoldError(f"token {token.token_id} is revoked")
            if key in state.token_keys:
                raise FoldError("key_sha256 is already used by another token")
            state.tokens[token.token_id] = replace(
                token,
                key_sha256=key,
                key_last6=data.key_last6,
                previous_key_sha256=token.key_sha256,
                previous_valid_until=data.previous_valid_until,
                position=position,
            )
            state.token_keys[key] = token.token_id
            changes.tokens.add(token.token_id)
            return account
        case "quota.token.revoked":
            token = _owned_token(state, account, data.token_id)
            state.tokens[token.token_id] = replace(token, revoked=True, position=position)
            changes.tokens.add(token.token_id)
            return account
        case "quota.reservation.held":
            return _hold(state, changes, account, data, position, event.time or received_at)
        case "quota.reservation.settled":
            return _end_hold(state, changes, account, data.reservation_id, SETTLED, position,
                             data.actor, settled_amount=data.actual)  # fmt: skip
        case "quota.reservation.released":
            return _end_hold(state, changes, account, data.reservation_id, RELEASED, position,
                             data.actor)  # fmt: skip
        case "quota.reservation.expired":
            return _end_hold(state, changes, account, data.reservation_id, EXPIRED, position,
                             data.actor)  # fmt: skip
        case _:
            raise FoldError(f"event type {event.type} has no account fold")


def _hold(
    state: State,
    changes: Changes,
    account: Account,
    data: ev.ReservationHeld,
    position: int,
    now: datetime | None,
) -> Account:
    """Hold quota, in check order: never more than is available (13), nor past a budget that
    covers it (13a, 13b), nor past a concurrency cap (13c); so no interleaving can overdraw.
    The hold function (migration 0007) decides the same, under the same lock, in SQL."""
    if data.reservation_id in state.reservations:
        raise FoldError(f"reservation {data.reservation_id} already exists")
    refusal = hold_refusal(state, account, data.amount, data.token_id, data.model, now)
    if refusal is not None:
        raise FoldError(f"{refusal[0]}: {refusal[1]}")
    state.put_reservation(
        Reservation(
            reservation_id=data.reservation_id,
            account_id=account.account_id,
            amount=data.amount,
            request_id=data.request_id,
            state=HELD,
            expires_at=data.expires_at,
            held_position=position,
            token_id=data.token_id,
            model=data.model,
        )
    )
    changes.reservations.add(data.reservation_id)
    budgets_hold(state, changes, account.account_id, data.token_id, data.model, data.amount)
    _count_token_hold(state, changes, data.token_id, 1)
    return replace(account, held=account.held + data.amount, holds=account.holds + 1)


def _count_token_hold(state: State, changes: Changes, token_id: str | None, step: int) -> None:
    token = state.tokens.get(token_id) if token_id is not None else None
    if token is not None:
        state.tokens[token.token_id] = replace(token, holds=token.holds + step)
        changes.token_holds.add(token.token_id)


def _end_hold(
    state: State,
    changes: Changes,
    account: Account,
    reservation_id: str,
    end: str,
    position: int,
    actor: str,
    settled_amount: int | None = None,
) -> Account:
    """A hold ends exactly once: settled, released or expired."""
    reservation = state.reservations.get(reservation_id)
    if reservation is None or reservation.account_id != account.account_id:
        raise FoldError(
            f"reservation {reservation_id} is not a reservation of {account.account_id}"
        )
    if reservation.state != HELD:
        raise FoldError(f"reservation {reservation_id} is already {reservation.state}")
    state.put_reservation(
        replace(
            reservation,
            state=end,
            ended_position=position,
            settled_amount=settled_amount,
            ended_by=actor,
        )
    )
    changes.reservations.add(reservation_id)
    budgets_hold(state, changes, account.account_id, reservation.token_id, reservation.model,
                 -reservation.amount)  # fmt: skip
    _count_token_hold(state, changes, reservation.token_id, -1)
    return replace(account, held=account.held - reservation.amount, holds=account.holds - 1)


def _issue_token(state: State, account: Account, data: ev.TokenIssued, position: int) -> None:
    key = data.key_sha256.lower()
    if data.token_id in state.tokens:
        raise FoldError(f"token {data.token_id} is already issued")
    if key in state.token_keys:
        raise FoldError("key_sha256 is already used by another token")
    state.tokens[data.token_id] = Token(
        token_id=data.token_id,
        account_id=account.account_id,
        key_sha256=key,
        key_last6=data.key_last6,
        expires_at=data.expires_at,
        allowed_cidrs=tuple(data.allowed_cidrs),
        allowed_models=tuple(data.allowed_models),
        revoked=False,
        position=position,
        max_concurrent=data.max_concurrent,
    )
    state.token_keys[key] = data.token_id


def _owned_token(state: State, account: Account, token_id: str) -> Token:
    token = state.tokens.get(token_id)
    if token is None or token.account_id != account.account_id:
        raise FoldError(f"token {token_id} is not a token of {account.account_id}")
    return token


def _apply_catalog(state: State, changes: Changes, event: Event, position: int) -> None:
    data: Any = event.data  # the model of `event.type` (checked when it was decoded)
    match event.type:
        case "quota.channel.registered":
            old = state.channels.get(data.channel_id)
            state.channels[data.channel_id] = Channel(
                channel_id=data.channel_id,
                models=tuple(data.models),
                groups=tuple(data.groups),
                enabled=old.enabled if old else True,
                rate_limited_until=old.rate_limited_until if old else None,
                position=position,
            )
            changes.channels.add(data.channel_id)
        case "quota.channel.disabled" | "quota.channel.enabled":
            channel = _known_channel(state, data.channel_id)
            enabled = event.type == "quota.channel.enabled"
            state.channels[channel.channel_id] = replace(
                channel, enabled=enabled, position=position
            )
            changes.channels.add(channel.channel_id)
        case "quota.channel.provider_rate_limited":
            channel = _known_channel(state, data.channel_id)
            state.channels[channel.channel_id] = replace(
                channel, rate_limited_until=data.until, position=position
            )
            changes.channels.add(channel.channel_id)
        case "quota.model.registered":
            limits = data.limits.model_dump(exclude_none=True)
            state.models[data.model] = ModelSpec(data.model, data.kind, limits, position)
            changes.models.add(data.model)
        case "quota.route.policy_set":
            state.routes[data.route] = RoutePolicy(data.route, data.min_role, position)
            changes.routes.add(data.route)
        case _:
            raise FoldError(f"event type {event.type} has no catalog fold")


def _known_channel(state: State, channel_id: int) -> Channel:
    channel = state.channels.get(channel_id)
    if channel is None:
        raise FoldError(f"channel {channel_id} is not registered")
    return channel
