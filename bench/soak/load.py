"""The soak's load: an open-loop mix of decisions, holds, settling usage, releases, recharges.
Request i starts at start + i / rate, whatever the answers before it; its latency counts from
then, so a late start (the driver lagging) counts against it.

Every request goes through services.client, as a gateway's would, with one call each (no
retry: each answer is counted as it came); a request that got no decision is `ERR <cause>`.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Final

import httpx

from bench.authorize import world
from services.client import NO_RETRY, AsyncQuotaClient, Decision, FailMode, QuotaError
from services.contract.samples import cloud_event

#: The operations and their default shares of the total rate (in percent).
MIX: Final = {"check": 45, "hold": 25, "settle": 15, "release": 10, "recharge": 5}
DECISIONS: Final = ("check", "hold")
RECHARGE: Final = 1_000
#: A hold is settled or released once it is at least this old (a request takes some time).
MIN_HOLD_AGE: Final = 2.0
#: Requests in flight beyond this are not sent (counted as `dropped`): the driver stays bounded.
MAX_IN_FLIGHT: Final = 3_000
#: Connections per service, as a gateway has a pool; more requests wait for one in the driver
#: (their latency still counts from when they were due). httpcore's pool costs O(connections²)
#: per request once it holds hundreds (a stalled ledger would make them), which stalled the
#: driver itself for seconds after the broker pause.
CONNECTIONS: Final = 32

#: One finished request: (seconds after the start it was due, kind, status, latency in ms);
#: kind `lag` is the driver's own delay in starting a request (status "").
Record = tuple[float, str, str, float]


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _decided(decision: Decision) -> str:
    """A decision's status (and reason), or `ERR <cause>` when the policy gave none."""
    if decision.degraded:  # the transport failed, or the answer was not a decision
        return f"ERR {(decision.cause or '').split(':')[0]}"
    return "200" if decision.allowed else f"{decision.status} {decision.reason_code}"


def _failed(exc: QuotaError) -> str:
    """A refused release or publication: its status (and code), or `ERR <transport error>`."""
    if exc.status is None:
        return f"ERR {type(exc.__cause__).__name__}"
    return f"{exc.status} {exc.code}" if exc.code else str(exc.status)


#: A service's client and the gate that bounds the requests in flight to it.
Gated = tuple[AsyncQuotaClient, asyncio.Semaphore]


class Load:
    """The mix at `rate` requests/s over the policies (alternately) and the ledger."""

    def __init__(
        self,
        policies: Sequence[httpx.AsyncClient],
        ledger: httpx.AsyncClient,
        accounts: int,
        hot_share: float,
    ) -> None:
        # Each policy's client, on its httpx client (its service token); the ledger's publishes
        # through the ledger's (its admin token).
        self.policies: list[Gated] = [(self._client(c, ledger), self._gate()) for c in policies]
        self.ledger: Gated = (self._client(ledger, ledger), self._gate())
        self.rng = random.Random(9)
        self.keys = self.account_keys(accounts)
        self.hot_share = hot_share
        self.kinds = list(MIX)
        self.weights = list(MIX.values())
        self.open: deque[tuple[float, Decision]] = deque(maxlen=100_000)
        self.records: list[Record] = []
        self.produced: list[str] = []
        self.unconfirmed: list[str] = []
        self.dropped = 0
        self.in_flight: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.turn = 0
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()

    @staticmethod
    def _client(http: httpx.AsyncClient, ledger: httpx.AsyncClient) -> AsyncQuotaClient:
        return AsyncQuotaClient(
            str(http.base_url), fail_mode=FailMode.CLOSED, retry=NO_RETRY, http=http,
            ledger_url=str(ledger.base_url), source="bench/soak",
        )  # fmt: skip

    @staticmethod
    def _gate() -> asyncio.Semaphore:
        return asyncio.Semaphore(CONNECTIONS)

    @staticmethod
    def account_keys(accounts: int) -> list[tuple[str, str]]:
        """The (account, key) pairs the load spreads over, besides the hot account."""
        return [(world.filler_account(i), world.filler_key(i)) for i in range(accounts)]

    def now(self) -> float:
        return self.loop.time() - self.start

    def _record(self, due: float, kind: str, status: str) -> None:
        self.records.append((due, kind, status, (self.now() - due) * 1000))

    def _account(self) -> tuple[str, str]:
        if self.rng.random() < self.hot_share:
            return world.ALLOWED_ACCOUNT, world.ALLOWED_KEY
        return self.keys[self.rng.randrange(len(self.keys))]

    def _policy(self) -> Gated:
        self.turn += 1
        return self.policies[self.turn % len(self.policies)]

    async def run(self, rate: float, duration: float) -> None:
        """Start one request every 1 / rate seconds for `duration` seconds."""
        interval = 1.0 / rate
        index = 0
        while (due := index * interval) < duration:
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            self.records.append((due, "lag", "", max(0.0, self.now() - due) * 1000))
            index += 1
            if len(self.in_flight) >= MAX_IN_FLIGHT:
                self.dropped += 1
                continue
            task = self.loop.create_task(self._one(due))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)
            self.sent += 1

    async def finish(self, timeout: float) -> int:
        """Wait for the requests still in flight; how many did not finish in time."""
        if self.in_flight:
            _, pending = await asyncio.wait(set(self.in_flight), timeout=timeout)
            for task in pending:
                task.cancel()
            return len(pending)
        return 0

    async def _one(self, due: float) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind in ("settle", "release"):
            if not self.open or self.now() - self.open[0][0] < MIN_HOLD_AGE:
                kind = "check"  # nothing old enough to end yet
            elif kind == "release":
                await self._release(due, kind, self.open.popleft()[1])
                return
            else:
                held = self.open.popleft()[1]
                amount = self.rng.randint(world.HOLD_COST // 2, world.HOLD_COST * 3 // 2)
                event_id = str(uuid.uuid4())
                settling = self.ledger[0].settle(held, amount, event_id=event_id)
                await self._publish(due, kind, event_id, settling)
                return
        account, key = self._account()
        if kind == "recharge":
            event = cloud_event("quota.account.recharged", account, {"amount": RECHARGE},
                                time=_now_rfc3339(), source="bench/soak")  # fmt: skip
            await self._publish(due, kind, event["id"], self.ledger[0].publish(event))
            return
        body = world.authorize_body(key)
        del body["request_id"]
        if kind == "hold":
            body |= {"estimated_cost": world.HOLD_COST, "request_id": f"soak-{uuid.uuid4().hex}"}
        quota, gate = self._policy()
        try:
            async with gate:
                decision = await quota.authorize(**body)
        except httpx.HTTPError as exc:  # not a transport error: the client passes it on
            self._record(due, kind, f"ERR {type(exc).__name__}")
            return
        self._record(due, kind, _decided(decision))
        if kind == "hold" and decision.reservation is not None:
            self.open.append((self.now(), decision))

    async def _release(self, due: float, kind: str, held: Decision) -> None:
        """Release a hold, recorded as 200 (released), 409 (it ended before), 404, or the
        refusal."""
        assert held.reservation is not None
        quota, gate = self._policy()
        try:
            async with gate:
                reservation = await quota.release(held.reservation.id)
        except QuotaError as exc:
            self._record(due, kind, _failed(exc))
            return
        except httpx.HTTPError as exc:
            self._record(due, kind, f"ERR {type(exc).__name__}")
            return
        ended = reservation is None or reservation.state != "released"
        self._record(due, kind, "404" if reservation is None else "409" if ended else "200")

    async def _publish(self, due: float, kind: str, event_id: str, call: Awaitable[object]) -> None:
        """One event to the ledger (`call`: the client's publish or settle); its id counts as
        produced once it is accepted (202); after an error or a timeout it is `unconfirmed` (it
        may or may not be published)."""
        status = "202"
        try:
            async with self.ledger[1]:
                await call
        except QuotaError as exc:
            status = _failed(exc)
        except httpx.HTTPError as exc:
            status = f"ERR {type(exc).__name__}"
        self._record(due, kind, status)
        (self.produced if status == "202" else self.unconfirmed).append(event_id)
