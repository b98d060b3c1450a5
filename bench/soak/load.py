"""The soak's load: an open-loop mix of decisions, holds, settling usage, releases, recharges.
Request i starts at start + i / rate, whatever the answers before it; its latency counts from
then, so a late start (the driver lagging) counts against it.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from bench.authorize import world
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


def _reason(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return f" {error['reason']}" if isinstance(error, dict) else ""
    except (ValueError, KeyError, TypeError):
        return ""


class Load:
    """The mix at `rate` requests/s over the policies (alternately) and the ledger."""

    def __init__(
        self,
        policies: Sequence[httpx.AsyncClient],
        ledger: httpx.AsyncClient,
        accounts: int,
        hot_share: float,
    ) -> None:
        self.policies = policies
        self.ledger = ledger
        self.rng = random.Random(9)
        self.keys = self.account_keys(accounts)
        self.hot_share = hot_share
        self.kinds = list(MIX)
        self.weights = list(MIX.values())
        self.open: deque[tuple[float, str, str]] = deque(maxlen=100_000)
        self.records: list[Record] = []
        self.produced: list[str] = []
        self.unconfirmed: list[str] = []
        self.dropped = 0
        self.in_flight: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.turn = 0
        self.gates = {client: asyncio.Semaphore(CONNECTIONS) for client in (*policies, ledger)}
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()

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

    def _policy(self) -> httpx.AsyncClient:
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
                path = f"/reservations/{self.open.popleft()[1]}/release"
                await self._post(due, kind, self._policy(), path, None)
                return
            else:
                _, reservation_id, account = self.open.popleft()
                amount = self.rng.randint(world.HOLD_COST // 2, world.HOLD_COST * 3 // 2)
                data = {"amount": amount, "model": world.MODEL, "reservation_id": reservation_id}
                await self._publish(due, kind, "quota.account.usage_recorded", account, data)
                return
        account, key = self._account()
        if kind == "recharge":
            await self._publish(due, kind, "quota.account.recharged", account, {"amount": RECHARGE})
            return
        body = world.authorize_body(key)
        del body["request_id"]
        if kind == "hold":
            body |= {"estimated_cost": world.HOLD_COST, "request_id": f"soak-{uuid.uuid4().hex}"}
        response = await self._post(due, kind, self._policy(), "/authorize", body)
        if kind == "hold" and response is not None and response.status_code == 200:
            reservation = response.json().get("reservation")
            if reservation:
                self.open.append((self.now(), reservation["id"], account))

    async def _post(
        self, due: float, kind: str, client: httpx.AsyncClient, path: str, body: Any
    ) -> httpx.Response | None:
        """One request, recorded as its status (and error reason), or `ERR <exception>`."""
        try:
            content = None if body is None else json.dumps(body)
            async with self.gates[client]:
                response = await client.post(path, content=content)
        except httpx.HTTPError as exc:
            self._record(due, kind, f"ERR {type(exc).__name__}")
            return None
        code = response.status_code
        self._record(due, kind, str(code) if code in (200, 202) else f"{code}{_reason(response)}")
        return response

    async def _publish(
        self, due: float, kind: str, type_: str, subject: str, data: dict[str, Any]
    ) -> None:
        """POST one event to the ledger; its id counts as produced once it is accepted (202);
        after an error or a timeout it is `unconfirmed` (it may or may not be published)."""
        event = cloud_event(type_, subject, data, time=_now_rfc3339(), source="bench/soak")
        response = await self._post(due, kind, self.ledger, "/events", event)
        accepted = response is not None and response.status_code == 202
        (self.produced if accepted else self.unconfirmed).append(event["id"])
