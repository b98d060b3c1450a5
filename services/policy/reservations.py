"""Reservations on the policy side: hold, release and expire, written into the ledger's history.

A hold is a `quota.reservation.held` event folded and stored under the ledger head lock, the
same lock every ledger batch takes, and the fold refuses a hold larger than what is available
(balance - active holds). So no interleaving of requests, on any number of policy replicas, nor
of a ledger debit, can hold more than was there. Concurrent holds of one process are committed
together (group commit): one transaction, one lock, many holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from services.contract import events as ev
from services.contract.events import Event
from services.ledger import repository as repo
from services.ledger.fold import HELD, Account, Reservation
from services.ledger.ingest import append_local

log = structlog.get_logger("quota.policy.reservations")

SOURCE = "quota/policy"
SWEEP_LIMIT = 500


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """A held (or, for a repeated request id, the existing) reservation, or why not."""

    reservation: Reservation | None
    account: Account | None
    reason: str | None = None
    repeated: bool = False


@dataclass(slots=True)
class _HoldRequest:
    account_id: str
    amount: int
    request_id: str | None
    actor: str
    future: asyncio.Future[HoldOutcome]


def _event(type_: str, account_id: str, event_id: str, data: dict[str, Any]) -> Event:
    model = ev.RESERVATION_EVENTS[type_]
    return Event(
        id=event_id,
        source=SOURCE,
        type=type_,
        subject=account_id,
        time=datetime.now(UTC),
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

    async def run(self) -> None:
        """The group-commit worker and the expiry sweeper, until cancelled."""
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._queue = self._queue, []
                if batch:
                    await self._commit_holds(batch)
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def hold(
        self, account_id: str, amount: int, request_id: str | None, actor: str
    ) -> HoldOutcome:
        """Hold `amount`; the same `request_id` within the TTL returns the same reservation."""
        future: asyncio.Future[HoldOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_HoldRequest(account_id, amount, request_id, actor, future))
        self._wake.set()
        return await future

    async def _commit_holds(self, batch: list[_HoldRequest]) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                outcomes = await self._holds_in(conn, batch)
        except Exception as exc:  # every caller must hear back, whatever failed
            log.error("hold transaction failed", error=str(exc))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        for request, outcome in zip(batch, outcomes, strict=True):
            if not request.future.done():
                request.future.set_result(outcome)

    async def _holds_in(
        self, conn: asyncpg.Connection, batch: list[_HoldRequest]
    ) -> list[HoldOutcome]:
        head = await repo.lock_head(conn)  # serialise with ledger batches before any lookup
        now = datetime.now(UTC)
        planned: dict[tuple[str, str], str] = {}
        existing: dict[int, Reservation] = {}
        repeats: set[int] = set()
        events: list[Event] = []
        reservation_ids: list[str | None] = []
        for index, request in enumerate(batch):
            if request.request_id is not None:
                key = (request.account_id, request.request_id)
                if key in planned:
                    reservation_ids.append(planned[key])
                    repeats.add(index)
                    continue
                found = await repo.find_active_reservation(conn, *key, now)
                if found is not None:
                    existing[index] = found
                    reservation_ids.append(None)
                    continue
            reservation_id = f"rsv_{uuid.uuid4().hex}"
            if request.request_id is not None:
                planned[(request.account_id, request.request_id)] = reservation_id
            data: dict[str, Any] = {
                "reservation_id": reservation_id,
                "amount": request.amount,
                "expires_at": (now + self.ttl).isoformat(),
                "actor": request.actor,
            }
            if request.request_id is not None:
                data["request_id"] = request.request_id
            events.append(
                _event("quota.reservation.held", request.account_id, f"{reservation_id}:held", data)
            )
            reservation_ids.append(reservation_id)
        result = await append_local(conn, events, head)
        outcomes = []
        for index, request in enumerate(batch):
            if index in existing:
                found = existing[index]
                account = await repo.get_account(conn, request.account_id)
                outcomes.append(HoldOutcome(found, account, repeated=True))
                continue
            planned_id = reservation_ids[index]
            assert planned_id is not None
            reason = result.rejected.get(f"{planned_id}:held")
            if reason is not None:
                outcomes.append(HoldOutcome(None, None, reason=reason))
                continue
            outcomes.append(
                HoldOutcome(
                    result.state.reservations[planned_id],
                    result.state.accounts[request.account_id],
                    repeated=index in repeats,
                )
            )
        return outcomes

    async def get(self, reservation_id: str) -> Reservation | None:
        async with self.pool.acquire() as conn:
            return await repo.get_reservation(conn, reservation_id)

    async def release(self, reservation_id: str, actor: str) -> Reservation | None:
        """End a held reservation; an ended one is returned as it is (None: unknown)."""
        return await self._end(reservation_id, "quota.reservation.released", actor)

    async def _end(self, reservation_id: str, type_: str, actor: str) -> Reservation | None:
        async with self.pool.acquire() as conn, conn.transaction():
            head = await repo.lock_head(conn)
            reservation = await repo.get_reservation(conn, reservation_id)
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
        """Expire held reservations whose TTL has passed (never earlier)."""
        async with self.pool.acquire() as conn:
            due = await repo.due_reservations(conn, now, SWEEP_LIMIT)
        expired = 0
        for reservation in due:
            ended = await self._end(
                reservation.reservation_id, "quota.reservation.expired", "policy:ttl"
            )
            if ended is not None and ended.state == "expired":
                expired += 1
        return expired

    async def _sweep_forever(self) -> None:
        interval = min(1.0, max(0.05, self.ttl.total_seconds() / 10))
        while True:
            try:
                await self.expire_due(datetime.now(UTC))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("expiry sweep failed", error=str(exc))
            await asyncio.sleep(interval)
