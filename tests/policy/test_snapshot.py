"""Snapshot updates re-index only what changed."""

from __future__ import annotations

from services.contract.cloudevent import decode_http_object
from services.policy.snapshot import Snapshot
from services.store.fold import fold
from services.store.model import State
from tests.builders import cloud_event, recharge, token_issued


def state_after(events: list[dict[str, object]]) -> State:
    return fold(State(), [decode_http_object(e) for e in events], 1).state


def test_an_account_change_keeps_the_other_indexes() -> None:
    state = state_after([
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["m"], "groups": ["default"]}),
        recharge("a", 10),
        token_issued("a", "t", "sk-snapshot-key-000001"),
    ])  # fmt: skip
    before = Snapshot.from_state(state, 3)
    state.accounts["a"] = state.accounts["a"].__class__("a", balance=99, position=4)
    after = before.updated(state, 4, accounts=True)
    assert after.position == 4
    assert after.accounts["a"].balance == 99
    # Accounts are a live read-only view of the store's state, not a copy per change: the
    # store moves them and the position together, with no await in between.
    assert before.accounts["a"].balance == 99
    assert not hasattr(after.accounts, "__setitem__")
    assert after.tokens is before.tokens
    assert after.serving is before.serving
    assert after.routes is before.routes


def test_a_heartbeat_moves_only_the_position() -> None:
    before = Snapshot.from_state(state_after([recharge("a", 1)]), 1)
    after = before.updated(State(), 7)
    assert after.position == 7
    assert after.accounts is before.accounts


def test_catalog_and_token_changes_rebuild_their_indexes() -> None:
    state = state_after([recharge("a", 1)])
    before = Snapshot.from_state(state, 1)
    grown = state_after([
        recharge("a", 1),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 2, "models": ["m"], "groups": ["default"]}),
        token_issued("a", "t", "sk-snapshot-key-000002"),
    ])  # fmt: skip
    after = before.updated(grown, 3, tokens=True, catalog=True)
    assert [c.channel_id for c in after.serving[("default", "m")]] == [2]
    assert len(after.tokens) == 1
    assert after.accounts is before.accounts
