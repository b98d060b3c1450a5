"""The budget and concurrency rules of the fold: why a hold is refused (checks 13-13c, the
rule the hold function repeats in SQL), how a usage counts toward the budgets that cover it,
and how a budget set mid-period counts the period's earlier usage. Pure, like the fold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Final, cast

from services.contract import events as ev
from services.contract.events import Event
from services.store.model import (
    ACCOUNT_SCOPE,
    TOKEN_SCOPE,
    Account,
    Budget,
    Changes,
    FoldError,
    State,
)
from services.store.periods import bucket, period_start

#: The refusals of a hold, by check (13, 13a, 13b, 13c), named as the hold function names them.
INSUFFICIENT: Final = "insufficient"
BUDGET_EXCEEDED: Final = "budget_exceeded"
TOKEN_BUDGET_EXCEEDED: Final = "token_budget_exceeded"
CONCURRENCY_LIMITED: Final = "concurrency_limited"
BUDGET_REFUSALS: Final = {ACCOUNT_SCOPE: BUDGET_EXCEEDED, TOKEN_SCOPE: TOKEN_BUDGET_EXCEEDED}


def hold_refusal(
    state: State,
    account: Account,
    amount: int,
    token_id: str | None,
    model: str | None,
    now: datetime | None,
) -> tuple[str, str] | None:
    """Why a hold of `amount` by `token_id` on `model` is refused now, or None: check 13, then
    each covering account budget (13a), token budget (13b), then the caps (13c). The refusal
    is the hold function's outcome name and a sentence."""
    available = account.balance - account.held
    if available <= 0 or amount > available:
        return INSUFFICIENT, (
            f"insufficient available quota on {account.account_id}: "
            f"{available} available, {amount} asked"
        )
    # `account_budgets` come account budgets first, each scope by id: 13a, then 13b.
    for budget in state.account_budgets(account.account_id):
        if not budget.covers(token_id, model):
            continue
        spent = budget_spent(state.budget_spend, budget, now)
        if spent + budget.held + amount > budget.amount:
            return BUDGET_REFUSALS[budget.scope], (
                f"{budget.scope} budget {budget.budget_id} exceeded: {spent} spent, "
                f"{budget.held} held, {amount} asked of {budget.amount}"
            )
    if account.max_concurrent is not None and account.holds >= account.max_concurrent:
        return CONCURRENCY_LIMITED, (
            f"{account.account_id} has {account.holds} of {account.max_concurrent} holds"
        )
    token = state.tokens.get(token_id) if token_id is not None else None
    if token is not None and token.max_concurrent is not None:
        active = token.holds
        if active >= token.max_concurrent:
            return (
                CONCURRENCY_LIMITED,
                f"token {token_id} has {active} of {token.max_concurrent} holds",
            )
    return None


def budget_spent(
    spend: Mapping[tuple[str, datetime], int], budget: Budget, now: datetime | None
) -> int:
    """The usage counted toward `budget` in its period holding `now` (`spend`: a state's, or
    a snapshot's, `budget_spend`)."""
    if now is None:
        return 0
    start = period_start(budget.period, budget.timezone, now)
    return spend.get((budget.budget_id, start), 0)


def budgets_hold(
    state: State, changes: Changes, account_id: str, token_id: str | None, model: str | None,
    amount: int,
) -> None:  # fmt: skip
    """Add `amount` (negative: a hold ended) to the `held` of every budget covering it."""
    for budget in state.account_budgets(account_id):
        if budget.covers(token_id, model):
            state.put_budget(replace(budget, held=budget.held + amount))
            changes.budgets.add(budget.budget_id)
            changes.budget_accounts.add(account_id)


def spend(state: State, changes: Changes, event: Event, when: datetime | None) -> None:
    """Count a usage toward the periods of the budgets that cover it (and the usage buckets
    a budget set later counts from)."""
    data = cast(ev.AccountUsageRecorded, event.data)
    if when is None or data.amount == 0:
        return
    account_id = event.subject
    budgeted = account_id in state.budgets_by_account
    if not (budgeted or state.track_usage):
        return  # the usual case in a ledger batch: no budget to count toward, none to set
    token_id, model = spender(state, event.subject, data)
    if state.track_usage:
        key = (account_id, token_id, model, bucket(when))
        state.usage[key] = state.usage.get(key, 0) + data.amount
    if not budgeted:
        return
    for budget in state.account_budgets(account_id):
        if budget.covers(token_id, model):
            spend_key = (budget.budget_id, period_start(budget.period, budget.timezone, when))
            state.budget_spend[spend_key] = state.budget_spend.get(spend_key, 0) + data.amount
            changes.budget_spend.add(spend_key)
            changes.budget_accounts.add(account_id)


def spender(
    state: State, account_id: str, data: ev.AccountUsageRecorded
) -> tuple[str | None, str | None]:
    """Whose spend a usage is, (token_id, model): its own fields, else those of the hold it
    settles (a gateway may settle with the reservation id alone)."""
    token_id, model = data.token_id, data.model
    if data.reservation_id is not None and (token_id is None or model is None):
        held = state.reservations.get(data.reservation_id)
        if held is not None and held.account_id == account_id:
            token_id = token_id if token_id is not None else held.token_id
            model = model if model is not None else held.model
    return token_id, model


def set_budget(
    state: State,
    changes: Changes,
    account: Account,
    data: ev.BudgetSet,
    position: int,
    when: datetime | None,
) -> None:
    """Set (or replace) a budget. Its spend from the period holding `when` on is counted anew
    from the usage history, so setting a budget mid-period counts what was already spent, and
    replacing one never resets it."""
    old = state.budgets.get(data.budget_id)
    if old is not None and old.account_id != account.account_id:
        raise FoldError(f"budget {data.budget_id} is a budget of {old.account_id}")
    if when is None:
        raise FoldError("a budget needs the event's time")
    budget = Budget(
        budget_id=data.budget_id,
        account_id=account.account_id,
        scope=data.scope,
        token_id=data.token_id,
        model=data.model,
        amount=data.amount,
        period=data.period,
        timezone=data.timezone,
        held=0,
        position=position,
    )
    covered = state.active_reservations(account.account_id)
    held = sum(r.amount for r in covered if budget.covers(r.token_id, r.model))
    budget = replace(budget, held=held)
    state.put_budget(budget)
    changes.budgets.add(budget.budget_id)
    changes.budget_accounts.add(account.account_id)
    start = period_start(budget.period, budget.timezone, when)
    for key in [k for k in state.budget_spend if k[0] == budget.budget_id and k[1] >= start]:
        del state.budget_spend[key]
        changes.budget_spend.add(key)
    for (owner, token_id, model, at), amount in state.usage.items():
        if owner == account.account_id and at >= start and budget.covers(token_id, model):
            key = (budget.budget_id, period_start(budget.period, budget.timezone, at))
            state.budget_spend[key] = state.budget_spend.get(key, 0) + amount
            changes.budget_spend.add(key)
