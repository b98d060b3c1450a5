"""Reservations on the policy side: hold, release and expire, written into the ledger's history.

A hold is a `quota.reservation.held` event stored under the ledger head lock, the same lock
every ledger batch takes, and a hold larger than what is available (balance - active holds) is
refused, by the fold's rule. So no interleaving of requests, on any number of policy replicas,
nor of a ledger debit, can hold more than was there. Concurrent holds of one process are
committed together (group commit): one statement, `quota_hold()` (migrations 0007, 0008),
one transaction, one lock, many holds. Releases and expiries go through the Python fold.

A request id is idempotent for the TTL: a hold whose `request_id` names a reservation of the
account whose `expires_at` is still ahead gets that reservation back (`repeated`), whatever its
state: a held one, or one already settled or released, which takes no second hold. This is
decided under the head lock before check 13, so a retry on any replica gets its own hold even
when what is left could not cover a second one (the decision leaves check 13 of such a request
to the hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import structlog
from prometheus_client import Histogram

from services.contract import events as ev
from services.contract.cloudevent import canonical_json, content, format_time
from services.contract.events import Event
from services.policy.budget_view import BudgetFigure, resets_at
from services.store import event_store, reservation_store
from services.store.append import append_local
from services.store.chain import payload_hash
from services.store.model import HELD, Reservation
from services.supervise import DATABASE_ERRORS, LoopHealth

log = structlog.get_logger("quota.policy.reservations")

SOURCE = "quota/policy"
HELD_EVENT = "quota.reservation.held"
SWEEP_LIMIT = 500
#: Group commits in flight at once (each on its own connection; the head lock orders them).
COMMITS_IN_FLIGHT = 2
#: How long a hold may wait for its group commit before it is answered 503.
HOLD_TIMEOUT_SECONDS = 5.0

HOLD_BATCH = Histogram(
    "quota_policy_hold_batch_size",
    "Holds committed together in one transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
HOLD_COMMIT = Histogram(
    "quota_policy_hold_commit_seconds",
    "Time of one group-commit transaction of holds, lock wait included",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """A held (or, for a repeated request id, the existing) reservation, or why not
    (`refusal`, one of the outcomes above, with `reason` in words); with the account's balance
    and held amount right after it, and the budgets that covered it (or the one that refused
    it). A repeat's reservation has its stored state: `held`, or `settled` / `released` when it
    ended within its TTL."""

    reservation: Reservation | None
    balance: int = 0
    held: int = 0
    reason: str | None = None
    repeated: bool = False
    refusal: str | None = None
    budgets: tuple[BudgetFigure, ...] = ()


def _budget_figures(raw: str | None, now: datetime) -> tuple[BudgetFigure, ...]:
    """The hold function's `budgets`: the figures of the budgets it weighed (after a hold:
    with it), as JSON text of [budget_id, scope, period, timezone, amount, spent, held]
    arrays; `now` is the instant the hold was decided at."""
    if not raw:
        return ()
    return tuple(
        BudgetFigure(budget_id, scope, period, timezone, amount, spent, held,
                     resets_at(period, timezone, now))
        for budget_id, scope, period, timezone, amount, spent, held in orjson.loads(raw)
    )  # fmt: skip


def _outcome(request: _HoldRequest, row: asyncpg.Record, now: datetime) -> HoldOutcome:
    outcome = row["outcome"]
    if outcome not in ("held", "repeated"):
        available = (row["balance"] or 0) - (row["held"] or 0)
        return HoldOutcome(
            None,
            reason=f"{outcome} on {request.account_id}: {available} available, "
            f"{request.amount} asked, budget {row['budget_id']}",
            refusal=outcome,
            budgets=_budget_figures(row["budgets"], now),
        )
    reservation = Reservation(
        reservation_id=row["reservation_id"],
        account_id=request.account_id,
        amount=row["amount"],
        request_id=row["request_id"],
        state=row["state"],
        expires_at=row["expires_at"],
        held_position=row["held_position"],
    )
    return HoldOutcome(
        reservation,
        row["balance"],
        row["held"],
        repeated=outcome == "repeated",
        budgets=_budget_figures(row["budgets"], now),
    )


@dataclass(slots=True)
class _HoldRequest:
    account_id: str
    amount: int
    request_id: str | None
    actor: str
    future: asyncio.Future[HoldOutcome]
    token_id: str | None = None
    model: str | None = None


def _time_out(future: asyncio.Future[HoldOutcome]) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"no hold commit within {HOLD_TIMEOUT_SECONDS}s"))


def _fresh_ids(count: int) -> Iterator[str]:
    """`count` random 128-bit ids in hex (one read of the OS's randomness, not one per id)."""
    randomness = os.urandom(16 * count).hex()
    return (randomness[i : i + 32] for i in range(0, 32 * count, 32))


def _event(
    type_: str, account_id: str, event_id: str, data: dict[str, Any], time: datetime | None = None
) -> Event:
    model = ev.RESERVATION_EVENTS[type_]
    return Event(
        id=event_id,
        source=SOURCE,
        type=type_,
        subject=account_id,
        time=time or datetime.now(UTC),
        data=model.model_validate(data),
        raw_data=data,
    )


class Reservations:
    """Holds quota for allowed decisions; runs the expiry sweeper while `run()` is awaited."""

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float) -> None:
        self.pool = pool
        self.ttl = timedelta(seconds=ttl_seconds)
        self._queue: list[_HoldRequest] = []
        self._wake = asyncio.Event()
        #: The group commits' own connections, taken from the pool and kept between commits.
        self._idle: list[asyncpg.Connection] = []
        #: The expiry sweeper's progress (it retries with backoff while the database refuses).
        self.sweeper = LoopHealth("expiry")

    async def run(self) -> None:
        """The group-commit worker and the expiry sweeper, until cancelled.

        Up to COMMITS_IN_FLIGHT group commits run at once, each on its own connection: the
        next one's statement waits for the head lock inside PostgreSQL while the current one
        commits, and is granted it the moment it is released, without a round trip to this
        process in between. The lock still orders them: each reads the rows after the previous
        one committed."""
        sweeper = asyncio.create_task(self._sweep_forever())
        slots = asyncio.Semaphore(COMMITS_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._queue:
                    continue
                await slots.acquire()
                batch, self._queue = self._queue, []  # all that arrived meanwhile, too
                task = asyncio.create_task(self._commit_holds(batch))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _task: slots.release())
        finally:
            for task in [sweeper, *running]:
                task.cancel()
            for task in [sweeper, *running]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for request in self._queue:
                request.future.cancel()
            await self.close()

    async def close(self) -> None:
        """Give the group commits' connections back to the pool."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.pool.release(conn)

    async def hold(
        self,
        account_id: str,
        amount: int,
        request_id: str | None,
        actor: str,
        token_id: str | None = None,
        model: str | None = None,
    ) -> HoldOutcome:
        """Hold `amount` for `token_id` on `model` (the budgets and caps that cover them
        apply); the same `request_id` within the TTL returns the same reservation."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HoldOutcome] = loop.create_future()
        self._queue.append(
            _HoldRequest(account_id, amount, request_id, actor, future, token_id, model)
        )
        self._wake.set()
        # A database that hangs must not hang the gateway: TimeoutError is answered 503 (a
        # hold committed after it is found by its request id, or ends at its TTL). A timer on
        # the future itself, not `asyncio.wait_for` (a task and two callbacks per hold).
        timer = loop.call_later(HOLD_TIMEOUT_SECONDS, _time_out, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def _commit_holds(self, batch: list[_HoldRequest]) -> None:
        HOLD_BATCH.observe(len(batch))
        try:
            with HOLD_COMMIT.time():
                outcomes = await self._commit(batch)
        except asyncio.CancelledError:
            for request in batch:
                request.future.cancel()
            raise
        except Exception as exc:  # every caller must hear back, whatever failed
            log.error("hold transaction failed", error=str(exc))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        for request, outcome in zip(batch, outcomes, strict=True):
            if not request.future.done():
                request.future.set_result(outcome)

    async def _commit(self, batch: list[_HoldRequest]) -> list[HoldOutcome]:
        """The whole batch in one statement, one round trip, committed on its own (see
        `reservation_store.hold`), on a connection kept for group commits (no pool acquire or
        reset)."""
        now = datetime.now(UTC)
        expires_at = now + self.ttl
        # Every hold of the batch shares these: rendered once, not once per hold.
        expires_text, time_text = expires_at.isoformat(), format_time(now)
        holds = []
        for request, reservation_id in zip(batch, _fresh_ids(len(batch)), strict=True):
            reservation_id = f"rsv_{reservation_id}"
            data: dict[str, Any] = {
                "reservation_id": reservation_id,
                "amount": request.amount,
                "expires_at": expires_text,
                "actor": request.actor,
            }
            if request.request_id is not None:
                data["request_id"] = request.request_id
            if request.token_id is not None:
                data["token_id"] = request.token_id
            if request.model is not None:
                data["model"] = request.model
            event_id = f"{reservation_id}:held"
            # No `Event` model per hold: its data is the request's, already validated
            # (tests/policy/test_reservations.py checks the stored payload against the event's
            # model and `event_content`).
            payload = canonical_json(
                content(event_id, SOURCE, HELD_EVENT, request.account_id, time_text, data)
            )
            holds.append(
                reservation_store.NewHold(
                    request.account_id, request.request_id, request.amount, reservation_id,
                    expires_at, event_id, now, payload.decode(), payload_hash(payload),
                    request.token_id, request.model,
                )
            )  # fmt: skip
        conn = await self._connection()
        try:
            rows = await reservation_store.hold(conn, holds, SOURCE, datetime.now(UTC), now)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
            raise
        self._idle.append(conn)
        return [_outcome(request, row, now) for request, row in zip(batch, rows, strict=True)]

    async def _connection(self) -> asyncpg.Connection:
        """A kept connection that is still open, else one from the pool. A connection the
        server dropped (an outage, a failover) is detached by asyncpg while it is kept here."""
        while self._idle:
            conn = self._idle.pop()
            try:
                if not conn.is_closed():
                    return conn
            except asyncpg.InterfaceError:
                pass  # released back to the pool when its backend went away
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
        return await self.pool.acquire()

    async def get(self, reservation_id: str) -> Reservation | None:
        async with self.pool.acquire() as conn:
            return await reservation_store.get_reservation(conn, reservation_id)

    async def release(self, reservation_id: str, actor: str) -> Reservation | None:
        """End a held reservation; an ended one is returned as it is (None: unknown)."""
        return await self._end(reservation_id, "quota.reservation.released", actor)

    async def _end(self, reservation_id: str, type_: str, actor: str) -> Reservation | None:
        async with self.pool.acquire() as conn, conn.transaction():
            head = await event_store.lock_head(conn)
            reservation = await reservation_store.get_reservation(conn, reservation_id)
            if reservation is None or reservation.state != HELD:
                return reservation
            verb = type_.rsplit(".", 1)[1]
            event = _event(
                type_,
                reservation.account_id,
                f"{reservation_id}:{verb}",
                {"reservation_id": reservation_id, "actor": actor},
            )
            result = await append_local(conn, [event], head)
            return result.state.reservations.get(reservation_id, reservation)

    async def expire_due(self, now: datetime) -> int:
        """Expire held reservations whose TTL has passed (never earlier): up to SWEEP_LIMIT at
        a time, in one transaction under the head lock (so replicas sweeping at once never
        end a hold twice). Returns how many expired."""
        async with self.pool.acquire() as conn:
            if not await reservation_store.due_reservations(conn, now, 1):
                return 0  # the usual case: nothing due, no lock taken
            expired = 0
            while True:
                async with conn.transaction():
                    head = await event_store.lock_head(conn)
                    due = await reservation_store.due_reservations(conn, now, SWEEP_LIMIT)
                    if not due:
                        return expired
                    events = [
                        _event(
                            "quota.reservation.expired",
                            reservation.account_id,
                            f"{reservation.reservation_id}:expired",
                            {"reservation_id": reservation.reservation_id, "actor": "policy:ttl"},
                        )
                        for reservation in due
                    ]
                    result = await append_local(conn, events, head)
                expired += len(due) - len(result.rejected)
                if len(due) < SWEEP_LIMIT:
                    return expired

    async def _sweep_forever(self) -> None:
        """Expire due holds every interval; while the database refuses, retry with backoff
        (`sweeper`'s health and `quota_loop_failures_total{loop="expiry"}` say so)."""
        interval = min(1.0, max(0.05, self.ttl.total_seconds() / 10))
        while True:
            try:
                await self.expire_due(datetime.now(UTC))
            except DATABASE_ERRORS as exc:
                await asyncio.sleep(max(interval, self.sweeper.failed("expire", exc)))
                continue
            self.sweeper.succeeded()
            await asyncio.sleep(interval)
