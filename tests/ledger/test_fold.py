"""The fold is a pure function: tested without I/O, with examples and properties."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.contract.cloudevent import decode_http_object
from services.contract.events import Event
from services.ledger.ingest import Decoded, Incoming, screen
from services.store.fold import fold
from services.store.model import State
from tests.builders import cloud_event, token_issued


def event(type_: str, subject: str, data: dict[str, Any], event_id: str | None = None) -> Event:
    return decode_http_object(cloud_event(type_, subject, data, event_id=event_id))


def test_fold_does_not_touch_its_input_state() -> None:
    start = fold(State(), [event("quota.account.recharged", "a", {"amount": 5})], 1).state
    before = start.accounts["a"]
    fold(start, [event("quota.account.usage_recorded", "a", {"amount": 2})], 2)
    assert start.accounts["a"] is before
    assert start.accounts["a"].balance == 5


def test_unknown_account_is_opened_with_defaults_by_its_first_event() -> None:
    result = fold(State(), [event("quota.account.usage_recorded", "new", {"amount": 7})], 1)
    account = result.state.accounts["new"]
    assert (account.balance, account.status, account.role, account.group) == (
        -7,
        "active",
        "user",
        "default",
    )
    assert account.position == 1


def test_usage_may_take_the_balance_below_zero() -> None:
    events = [
        event("quota.account.recharged", "a", {"amount": 10}),
        event("quota.account.usage_recorded", "a", {"amount": 25}),
    ]
    assert fold(State(), events, 1).state.accounts["a"].balance == -15


def test_status_role_and_group_events() -> None:
    events = [
        event("quota.account.opened", "a", {"role": "admin", "group": "vip"}),
        event("quota.account.suspended", "a", {"reason": "fraud"}),
        event("quota.account.role_changed", "a", {"role": "root"}),
        event("quota.account.group_changed", "a", {"group": "gold"}),
    ]
    account = fold(State(), events, 1).state.accounts["a"]
    assert (account.status, account.role, account.group, account.position) == (
        "suspended",
        "root",
        "gold",
        4,
    )
    blacklisted = fold(State(), [*events, event("quota.account.blacklisted", "a", {})], 1)
    assert blacklisted.state.accounts["a"].status == "blacklisted"
    reinstated = fold(blacklisted.state, [event("quota.account.reinstated", "a", {})], 6)
    assert reinstated.state.accounts["a"].status == "active"


def test_rate_limit_is_set_replaced_and_removed_by_zero() -> None:
    set_ = event("quota.account.rate_limit_set", "a", {"model": "*", "requests": 5,
                                                        "window_seconds": 60})  # fmt: skip
    result = fold(State(), [set_], 1)
    assert result.state.rate_limits[("a", "*")].requests == 5
    removed = event("quota.account.rate_limit_set", "a", {"model": "*", "requests": 0,
                                                           "window_seconds": 60})  # fmt: skip
    after = fold(result.state, [removed], 2)
    assert ("a", "*") not in after.state.rate_limits
    assert ("a", "*") in after.changes.rate_limits


def test_token_lifecycle() -> None:
    issued = decode_http_object(
        token_issued("a", "t1", "sk-abcdef123456", allowed_models=["gpt-4"],
                     allowed_cidrs=["10.0.0.0/8", "2001:db8::1"])
    )  # fmt: skip
    updated = event("quota.token.updated", "a", {"token_id": "t1", "expires_at": None,
                                                 "allowed_models": []})  # fmt: skip
    revoked = event("quota.token.revoked", "a", {"token_id": "t1"})
    result = fold(State(), [issued, updated, revoked], 1)
    token = result.state.tokens["t1"]
    assert token.revoked
    assert token.allowed_models == ()
    assert token.allowed_cidrs == ("10.0.0.0/8", "2001:db8::1/128")
    assert token.position == 3
    assert result.state.token_keys[token.key_sha256] == "t1"


def test_token_events_that_cannot_apply_are_rejected_without_trace() -> None:
    issued = decode_http_object(token_issued("a", "t1", "sk-key-one-000001"))
    reused_key = decode_http_object(token_issued("b", "t2", "sk-key-one-000001"))
    reused_id = decode_http_object(token_issued("b", "t1", "sk-key-two-000002"))
    foreign_revoke = event("quota.token.revoked", "b", {"token_id": "t1"})
    unknown_update = event("quota.token.updated", "a", {"token_id": "nope"})
    result = fold(State(), [issued, reused_key, reused_id, foreign_revoke, unknown_update], 1)
    assert [a.position for a in result.applied] == [1]
    assert len(result.rejected) == 4
    assert "b" not in result.state.accounts
    assert not result.state.tokens["t1"].revoked


def test_catalog_events() -> None:
    until = "2026-11-24T13:00:00Z"
    events = [
        event("quota.channel.registered", "catalog", {"channel_id": 3, "models": ["m"],
                                                      "groups": ["default"]}),
        event("quota.channel.disabled", "catalog", {"channel_id": 3}),
        event("quota.channel.provider_rate_limited", "catalog", {"channel_id": 3,
                                                                 "until": until}),
        event("quota.model.registered", "catalog", {"model": "m", "kind": "image",
                                                    "limits": {"sizes": ["1024x1024"]}}),
        event("quota.route.policy_set", "catalog", {"route": "/v1/admin/*",
                                                    "min_role": "admin"}),
        event("quota.channel.enabled", "catalog", {"channel_id": 99}),
    ]  # fmt: skip
    result = fold(State(), events, 1)
    channel = result.state.channels[3]
    assert not channel.enabled
    assert channel.rate_limited_until == datetime(2026, 11, 24, 13, tzinfo=UTC)
    assert result.state.models["m"].limits == {"sizes": ["1024x1024"]}
    assert result.state.routes["/v1/admin/*"].min_role == "admin"
    assert [r.reason for r in result.rejected] == ["channel 99 is not registered"]
    assert result.changes.catalog


def test_balance_leaving_int64_is_rejected() -> None:
    big = 2**63 - 1
    result = fold(
        State(),
        [
            event("quota.account.recharged", "a", {"amount": big}),
            event("quota.account.recharged", "a", {"amount": 1}),
        ],
        1,
    )
    assert result.state.accounts["a"].balance == big
    assert len(result.rejected) == 1


def test_positions_stay_gap_free_around_rejections() -> None:
    events = [
        event("quota.account.recharged", "a", {"amount": 1}),
        event("quota.token.revoked", "a", {"token_id": "missing"}),
        event("quota.account.recharged", "a", {"amount": 1}),
    ]
    result = fold(State(), events, 10)
    assert [a.position for a in result.applied] == [10, 11]


# --- properties ------------------------------------------------------------------------------

ACCOUNTS = st.sampled_from(["a", "b", "c"])
MONEY = st.integers(min_value=1, max_value=10**9)


@st.composite
def money_events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["recharged", "usage_recorded", "refunded", "adjusted"]))
    account = draw(ACCOUNTS)
    if kind == "adjusted":
        delta = draw(st.integers(min_value=-(10**9), max_value=10**9).filter(bool))
        data: dict[str, Any] = {"delta": delta, "reason": "ops"}
    elif kind == "usage_recorded":
        data = {"amount": draw(st.integers(min_value=0, max_value=10**9))}
    else:
        data = {"amount": draw(MONEY)}
    return event(f"quota.account.{kind}", account, data, event_id=draw(st.uuids()).hex)


def fold_in_batches(events: list[Event], cuts: list[int]) -> State:
    """What the ledger does: screen each batch against what is stored, fold the new events."""
    stored: dict[str, str] = {}
    state, position = State(), 1
    bounds = sorted({0, len(events), *(c for c in cuts if 0 < c < len(events))})
    for start, end in itertools.pairwise(bounds):
        batch = [Decoded(Incoming("t", 0, i, (), None), e, None) for i, e in
                 enumerate(events[start:end], start)]  # fmt: skip
        screened = screen(batch, stored)
        result = fold(state, [u.event for u in screened.unique], position)
        state, position = result.state, position + len(result.applied)
        stored.update({u.event.id: u.digest for u in screened.unique})
    return state


@given(st.lists(money_events(), max_size=40), st.data())
@settings(max_examples=200, deadline=None)
def test_duplicates_end_in_the_same_state_as_the_deduplicated_sequence(
    events: list[Event], data: st.DataObject
) -> None:
    with_duplicates = list(events)
    copies = data.draw(st.lists(st.sampled_from(events), max_size=20)) if events else []
    for copy in copies:
        # A redelivery comes after the original, anywhere later in the stream.
        earliest = with_duplicates.index(copy) + 1
        index = data.draw(st.integers(min_value=earliest, max_value=len(with_duplicates)))
        with_duplicates.insert(index, copy)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(with_duplicates))))
    assert fold_in_batches(with_duplicates, cuts) == fold(State(), events, 1).state


@given(st.lists(money_events(), max_size=60))
@settings(max_examples=200, deadline=None)
def test_balance_is_recharges_plus_refunds_plus_adjustments_minus_usage(
    events: list[Event],
) -> None:
    state = fold(State(), events, 1).state
    for account_id, account in state.accounts.items():
        mine = [e for e in events if e.subject == account_id]

        def total(kind: str, field: str, mine: list[Event] = mine) -> int:
            return sum(e.raw_data[field] for e in mine if e.type == f"quota.account.{kind}")

        assert account.balance == (
            total("recharged", "amount")
            + total("refunded", "amount")
            + total("adjusted", "delta")
            - total("usage_recorded", "amount")
        )
