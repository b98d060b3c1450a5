"""Where SQL repeats a rule of the Python store for speed, the two must agree; the checks live
here together.

* The group commit of holds runs in PostgreSQL (`quota_hold()`, migrations 0004-0006): it must
  decide exactly as the Python fold does, chain exactly as the ledger does, and notify the
  policy replicas with the rows it wrote, in the payload `services.store.notify` defines.
  Checked against a model of the rule on random batches, then by verify (the Python re-fold of
  the stored history) and replay --check.
* The hash chain and the content hash written in SQL (the hold function, replay's chain check)
  are `services.store.chain`'s.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.contract.cloudevent import canonical_json, decode_http_object, event_content
from services.ledger.audit import verify
from services.policy.reservations import SWEEP_LIMIT, HoldOutcome, Reservations, _HoldRequest
from services.store import db, event_store, projections
from services.store.append import Unique, append_local, fold_and_append
from services.store.budget_rules import hold_refusal
from services.store.chain import GENESIS_HASH, chain_hash, payload_hash
from services.store.fold import apply_event
from services.store.model import HELD, RELEASED, Changes, Reservation, State
from services.store.notify import (
    ACCOUNT_ROW_FIELDS,
    NOTIFY_MAX_KEYS,
    NOTIFY_MAX_ROWS,
    Notification,
    notify_payload,
)
from tests.builders import (
    assert_history_clean,
    budget_set,
    cloud_event,
    limits_set,
    recharge,
    token_issued,
    usage,
)

ACCOUNTS = ("acct_h1", "acct_h2", "acct_h3")
UNKNOWN = "acct_never_funded"


async def fund(pool: asyncpg.Pool, balances: dict[str, int]) -> None:
    events = [decode_http_object(recharge(a, amount)) for a, amount in balances.items()]
    async with pool.acquire() as conn, conn.transaction():
        result = await append_local(conn, events)
    assert not result.rejected


async def commit(
    reservations: Reservations, batch: list[tuple[str, int, str | None]]
) -> list[HoldOutcome]:
    """One group commit of these holds, in this order."""
    loop = asyncio.get_running_loop()
    requests = [
        _HoldRequest(account, amount, request_id, "test", loop.create_future())
        for account, amount, request_id in batch
    ]
    try:
        await reservations._commit_holds(requests)
    finally:
        await reservations.close()
    return [request.future.result() for request in requests]


@dataclass(slots=True)
class Known:
    """The model's latest reservation of an (account, request id)."""

    reservation_id: str
    amount: int
    state: str
    lapsed: bool  # its TTL has passed: the request id may hold again


@pytest.mark.timeout(120)
async def test_random_batches_decide_as_the_fold_and_verify_clean(pool: asyncpg.Pool) -> None:
    """The model: a request id with a reservation whose TTL is still ahead gets it back, in
    whatever state (held, or released within its TTL: no second hold), before check 13; only
    once its TTL has passed may it hold again. Otherwise check 13 as the fold has it."""
    rng = random.Random(4)
    balances = {account: rng.randrange(50, 400) for account in ACCOUNTS}
    await fund(pool, balances)
    held = dict.fromkeys(ACCOUNTS, 0)
    known: dict[tuple[str, str], Known] = {}
    unended: dict[str, Reservation] = {}  # the lasting holds, by id
    lasting = Reservations(pool, ttl_seconds=3_600)
    brief = Reservations(pool, ttl_seconds=0.05)
    outcomes = dict.fromkeys(
        ("held", "insufficient", "repeated held", "repeated released", "repeated beyond "
         "available", "held again after the ttl"), 0
    )  # fmt: skip
    for _ in range(60):
        batch = []
        for _ in range(rng.randrange(1, 12)):
            account = rng.choice((*ACCOUNTS, *ACCOUNTS, UNKNOWN))
            request_id = rng.choice((None, None, f"req-{rng.randrange(6)}"))
            batch.append((account, rng.randrange(1, 60), request_id))
        reservations = brief if rng.random() < 0.2 else lasting
        answers = await commit(reservations, batch)
        for (account, amount, request_id), outcome in zip(batch, answers, strict=True):
            key = (account, request_id) if request_id is not None else None
            available = balances.get(account, 0) - held.get(account, 0)
            seen = known.get(key) if key is not None else None
            if seen is not None and not seen.lapsed:
                assert outcome.repeated and outcome.reservation is not None
                assert outcome.reservation.reservation_id == seen.reservation_id
                assert (outcome.reservation.amount, outcome.reservation.state) == (
                    seen.amount, seen.state
                )  # fmt: skip
                assert (outcome.balance, outcome.held) == (balances[account], held[account])
                outcomes[f"repeated {seen.state}"] += 1
                if available <= 0 or amount > available:
                    outcomes["repeated beyond available"] += 1
                continue
            if account == UNKNOWN or available <= 0 or amount > available:
                assert outcome.reservation is None and outcome.reason, (account, amount)
                outcomes["insufficient"] += 1
                continue
            assert outcome.reservation is not None and not outcome.repeated
            assert (outcome.reservation.amount, outcome.reservation.state) == (amount, HELD)
            held[account] += amount
            assert (outcome.balance, outcome.held) == (balances[account], held[account])
            if key is not None:
                outcomes["held again after the ttl" if seen is not None else "held"] += 1
                known[key] = Known(outcome.reservation.reservation_id, amount, HELD, False)
            else:
                outcomes["held"] += 1
        new = [a.reservation for a in answers if a.reservation is not None and not a.repeated]
        if reservations is brief and new:  # this batch's holds lapse before the next batch
            last = max(reservation.expires_at for reservation in new)
            while datetime.now(UTC) <= last:
                await asyncio.sleep(0.01)
            lapsed = {reservation.reservation_id for reservation in new}
            for seen in known.values():
                seen.lapsed = seen.lapsed or seen.reservation_id in lapsed
            assert await brief.expire_due(datetime.now(UTC)) == len(new)
            for reservation in new:
                held[reservation.account_id] -= reservation.amount
        elif new:
            unended.update((reservation.reservation_id, reservation) for reservation in new)
        for reservation_id in rng.sample(sorted(unended), min(len(unended), rng.randrange(5))):
            reservation = unended.pop(reservation_id)
            released = await lasting.release(reservation_id, "test")
            assert released is not None and released.state == RELEASED
            held[reservation.account_id] -= reservation.amount
            if reservation.request_id is not None:
                seen = known[reservation.account_id, reservation.request_id]
                assert seen.reservation_id == reservation_id
                seen.state = RELEASED
    assert all(outcomes.values()), outcomes  # every branch was taken
    async with pool.acquire() as conn:
        stored = {r["account_id"]: r["held"] for r in await conn.fetch("SELECT * FROM accounts")}
    assert stored == held
    await assert_history_clean(pool)


async def test_a_commit_notifies_the_rows_it_wrote(pool: asyncpg.Pool, database_url: str) -> None:
    await fund(pool, {"acct_n": 100})
    heard: list[dict[str, Any]] = []
    listener = await db.connect(database_url)
    await listener.add_listener(db.CHANGES_CHANNEL, lambda *args: heard.append(json.loads(args[3])))
    try:
        reservations = Reservations(pool, ttl_seconds=60)
        first, second, refused = await commit(
            reservations, [("acct_n", 30, None), ("acct_n", 50, "r1"), ("acct_n", 40, None)]
        )
        assert first.reservation and second.reservation and refused.reservation is None
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
    finally:
        await listener.close()
    async with pool.acquire() as conn:
        head = await event_store.read_head(conn)
        row = await conn.fetchrow("SELECT * FROM accounts WHERE account_id = 'acct_n'")
    assert heard == [
        {
            "position": head.position,
            "account_rows": [["acct_n", 100, 80, row["status"], row["role"], row["group_name"],
                              head.position, None, 2]],
            "budget_held": [],
        }
    ]  # fmt: skip
    # The same payload the Python append path would send for that change.
    async with pool.acquire() as conn:
        account = await projections.get_account(conn, "acct_n")
    assert account is not None
    python = notify_payload(
        head.position, Changes(accounts={"acct_n"}), State(accounts={"acct_n": account})
    )
    assert Notification.decode(json.dumps(heard[0])) == python
    assert [getattr(account, name) for name in ACCOUNT_ROW_FIELDS] == heard[0]["account_rows"][0]


@pytest.mark.parametrize("accounts", [NOTIFY_MAX_ROWS + 1, NOTIFY_MAX_KEYS + 1])
async def test_a_large_commit_notifies_within_the_python_limits(
    pool: asyncpg.Pool, database_url: str, accounts: int
) -> None:
    """Past NOTIFY_MAX_ROWS accounts the SQL names them; past NOTIFY_MAX_KEYS it asks for a
    full reload: the same payload the Python append path sends for the same change."""
    names = [f"acct_l{i:03d}" for i in range(accounts)]
    await fund(pool, dict.fromkeys(names, 10))
    heard: list[str] = []
    listener = await db.connect(database_url)
    await listener.add_listener(db.CHANGES_CHANNEL, lambda *args: heard.append(args[3]))
    try:
        outcomes = await commit(Reservations(pool, ttl_seconds=60), [(a, 1, None) for a in names])
        assert all(o.reservation is not None for o in outcomes)
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
    finally:
        await listener.close()
    async with pool.acquire() as conn:
        head = await event_store.read_head(conn)
        rows = await projections.load_accounts(conn, names)
    state = State(accounts={a.account_id: a for a in rows})
    python = notify_payload(head.position, Changes(accounts=set(names)), state)
    assert python.all == (accounts > NOTIFY_MAX_KEYS)
    assert not python.account_rows
    assert [Notification.decode(text) for text in heard] == [python]


async def test_the_chain_and_content_hashes_are_the_same_in_sql_and_python(
    pool: asyncpg.Pool,
) -> None:
    payloads = ['{"amount":5}', '{"note":"é€ – \\u0000"}', "{}"]
    cases = [(GENESIS_HASH, 1), ("ab" * 32, 12_345_678_901), ("0f" * 32, 2)]
    async with pool.acquire() as conn:
        for payload, (prev, position) in zip(payloads, cases, strict=True):
            digest = await conn.fetchval(
                "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')", payload
            )
            assert digest == payload_hash(payload.encode())
            chained = await conn.fetchval(
                "SELECT encode(sha256(convert_to($1 || ':' || $2::bigint || ':' || $3,"
                " 'UTF8')), 'hex')",
                prev,
                position,
                digest,
            )
            assert chained == chain_hash(prev, position, digest)


async def test_a_batch_with_nothing_to_hold_writes_and_notifies_nothing(pool: asyncpg.Pool) -> None:
    await fund(pool, {"acct_z": 5})
    async with pool.acquire() as conn:
        before = await event_store.read_head(conn)
    (outcome,) = await commit(Reservations(pool, ttl_seconds=60), [("acct_z", 6, None)])
    assert outcome.reservation is None
    async with pool.acquire() as conn:
        assert await event_store.read_head(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 0


@pytest.mark.timeout(120)
async def test_two_sweepers_expire_a_backlog_in_batches_each_hold_once(pool: asyncpg.Pool) -> None:
    """More holds are due than one sweep takes (SWEEP_LIMIT): two replicas' sweepers, at once,
    expire every one exactly once, each batch in one transaction, never before its TTL."""
    await fund(pool, {"acct_ttl": 10**9})
    first = Reservations(pool, ttl_seconds=0.5)
    total = SWEEP_LIMIT * 2 + 100
    for start in range(0, total, 100):
        outcomes = await commit(first, [("acct_ttl", 1, None)] * min(100, total - start))
        assert all(o.reservation is not None for o in outcomes)
    second = Reservations(pool, ttl_seconds=0.5)
    assert await first.expire_due(datetime.now(UTC) - timedelta(seconds=1)) == 0  # none due yet
    async with pool.acquire() as conn:
        last: datetime = await conn.fetchval("SELECT max(expires_at) FROM reservations")
    while (now := datetime.now(UTC)) <= last:  # until every TTL has passed, by the clock
        await asyncio.sleep(0.05)
    counts = await asyncio.gather(first.expire_due(now), second.expire_due(now))
    assert sum(counts) == total, counts
    async with pool.acquire() as conn:
        states = dict(await conn.fetch("SELECT state, count(*) FROM reservations GROUP BY state"))
        ended = await conn.fetchval(
            "SELECT count(*) FROM event_store WHERE type = 'quota.reservation.expired'"
        )
        early = await conn.fetchval(
            "SELECT count(*) FROM event_store e JOIN reservations r"
            " ON e.event_id = r.reservation_id || ':expired' WHERE e.time < r.expires_at"
        )
        held = await conn.fetchval("SELECT held FROM accounts WHERE account_id = 'acct_ttl'")
        report = await verify(conn)
    assert states == {"expired": total} and ended == total and early == 0 and held == 0
    assert report.ok, report.differences[:5]


@pytest.mark.timeout(120)
async def test_random_holds_under_budgets_and_caps_decide_as_the_fold(pool: asyncpg.Pool) -> None:
    """Holds by several tokens on several models against account, model and token budgets and
    account and token caps: each outcome of the hold function is the Python rule's
    (`hold_refusal`, run on the projections as they were before the batch, in batch order),
    and verify re-folds the stored history clean."""
    rng = random.Random(11)
    now_text = datetime.now(UTC).isoformat()
    setup = [recharge(ACCOUNTS[0], 2_000), recharge(ACCOUNTS[1], 350)]
    setup += [
        token_issued(ACCOUNTS[0], "tok_a", "sk-parity-a-0000000000000000000000"),
        token_issued(ACCOUNTS[0], "tok_b", "sk-parity-b-0000000000000000000000",
                     max_concurrent=3),
        token_issued(ACCOUNTS[1], "tok_c", "sk-parity-c-0000000000000000000000"),
        limits_set(ACCOUNTS[1], 4),
        budget_set(ACCOUNTS[0], "p_day", 600, "day", time=now_text),
        budget_set(ACCOUNTS[0], "p_model", 250, "week", model="m1", timezone="Asia/Kolkata",
                   time=now_text),
        budget_set(ACCOUNTS[0], "p_tok", 300, "month", scope="token", token_id="tok_a",
                   time=now_text),
        budget_set(ACCOUNTS[1], "p_total", 700, "total", time=now_text),
        usage(ACCOUNTS[0], 120, {"model": "m1", "token_id": "tok_a"}, time=now_text),
        usage(ACCOUNTS[1], 90, {"model": "m2"}, time=now_text),
    ]  # fmt: skip
    unique = []
    for raw in setup:
        event = decode_http_object(raw)
        payload = canonical_json(event_content(event))
        unique.append(Unique(event, payload, payload_hash(payload)))
    async with pool.acquire() as conn, conn.transaction():  # as a ledger batch appends
        head = await event_store.lock_head(conn)
        appended = await fold_and_append(conn, head, unique, datetime.now(UTC), derive=True)
        await event_store.write_head(conn, event_store.Head(appended.position, appended.hash, 0))
    assert not appended.rejected, appended.rejected
    tokens = {ACCOUNTS[0]: ("tok_a", "tok_b", None), ACCOUNTS[1]: ("tok_c", None)}
    reservations = Reservations(pool, ttl_seconds=3_600)
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {}
    held_ids: list[str] = []
    for round_ in range(40):
        async with pool.acquire() as conn:
            state = await projections.load_all(conn)
        batch = []
        for _ in range(rng.randrange(1, 10)):
            account = rng.choice(ACCOUNTS[:2])
            token = rng.choice(tokens[account])
            model = rng.choice(("m1", "m2", None))
            batch.append(_HoldRequest(account, rng.randrange(5, 90), None, "test",
                                      loop.create_future(), token, model))  # fmt: skip
        await reservations._commit_holds(batch)
        for number, request in enumerate(batch):
            outcome = request.future.result()
            row = state.accounts[request.account_id]
            refusal = hold_refusal(state, row, request.amount, request.token_id,
                                   request.model, datetime.now(UTC))  # fmt: skip
            expected = "held" if refusal is None else refusal[0]
            found = "held" if outcome.reservation is not None else outcome.refusal
            assert found == expected, (round_, number, request, refusal, outcome)
            seen[expected] = seen.get(expected, 0) + 1
            if outcome.reservation is None:
                continue
            held_ids.append(outcome.reservation.reservation_id)
            event = decode_http_object(cloud_event(
                "quota.reservation.held", request.account_id,
                {"reservation_id": outcome.reservation.reservation_id, "amount": request.amount,
                 "expires_at": outcome.reservation.expires_at.isoformat(), "actor": "test",
                 **({"token_id": request.token_id} if request.token_id else {}),
                 **({"model": request.model} if request.model else {})},
                time=datetime.now(UTC).isoformat()))  # fmt: skip
            apply_event(state, Changes(), event, outcome.reservation.held_position)
        for reservation_id in rng.sample(held_ids, min(len(held_ids), rng.randrange(6))):
            held_ids.remove(reservation_id)
            await reservations.release(reservation_id, "test")
    await reservations.close()
    assert set(seen) == {"held", "insufficient", "budget_exceeded", "token_budget_exceeded",
                         "concurrency_limited"}, seen  # fmt: skip
    await assert_history_clean(pool)
