"""`QuotaClient` (sync) and `AsyncQuotaClient` (async): the transports around `_Core`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import httpx

from services.contract.samples import structured

if TYPE_CHECKING:
    pass

from services.client.core import _Attempts, _Call, _Core
from services.client.model import (
    AsyncProduce,
    Decision,
    FailMode,
    Produce,
    Reservation,
    Retry,
    _Outcome,
)


class QuotaClient:
    """The sync client. `fail_mode` has no default: choose what a gateway does when the policy
    cannot decide. `http`: an `httpx.Client` of your own (connection reuse, tests), used as
    it is (its timeouts apply) and not closed here; else one is made with `timeout` seconds.
    `ledger_url` and `ledger_token` (the ledger's admin bearer token) publish usage through
    `POST /events`; or `produce` publishes it to Kafka (see `Produce`)."""

    def __init__(
        self,
        policy_url: str,
        *,
        fail_mode: FailMode,
        service_token: str | None = None,
        ledger_url: str | None = None,
        ledger_token: str | None = None,
        produce: Produce | None = None,
        retry: Retry = Retry(),
        timeout: float | httpx.Timeout = 2.0,
        http: httpx.Client | None = None,
        source: str = "quota-client",
    ) -> None:
        self._core = _Core(
            policy_url, fail_mode, service_token, ledger_url, ledger_token, retry, source
        )
        self._produce = produce
        self._owned = http is None
        self._http = httpx.Client(timeout=timeout) if http is None else http

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client, when this client made it."""
        if self._owned:
            self._http.close()

    def _send(self, call: _Call) -> _Outcome:
        attempts = _Attempts(self._core.retry)
        while True:
            try:
                outcome: _Outcome = self._http.request(
                    call.method, call.url, content=call.content, headers=call.headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            pause = attempts.pause(outcome)
            if pause is None:
                return outcome
            time.sleep(pause)

    def authorize(
        self,
        authorization: str | None,
        *,
        model: str | None = None,
        route: str | None = None,
        client_ip: str | None = None,
        channel_id: str | int | None = None,
        request: Mapping[str, Any] | None = None,
        estimated_cost: int | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """`POST /authorize` (docs/authorize.md): `authorization` is the client's own
        Authorization value; `request` the fields of its body that validation needs (`prompt`,
        `size`, `n`, `input`); `estimated_cost` holds that much until settled or released."""
        call, body = self._core.authorize_call(
            authorization, model, route, client_ip, channel_id, request, estimated_cost,
            request_id, dry_run,
        )  # fmt: skip
        return self._core.decision(self._send(call), body)

    def reservation(self, reservation_id: str) -> Reservation | None:
        """`GET /reservations/{id}`: the reservation, or None for an unknown id."""
        call = self._core.reservation_call(reservation_id, release=False)
        return self._core.reservation(self._send(call), f"GET reservation {reservation_id}")

    def release(self, reservation_id: str) -> Reservation | None:
        """`POST /reservations/{id}/release` (idempotent): the reservation, `released`, or as
        it ended before (`settled`, `expired`); None for an unknown id. Raises `QuotaError`
        when the policy refuses (`QuotaUnavailable` when it cannot be reached): the hold then
        ends at its TTL."""
        call = self._core.reservation_call(reservation_id, release=True)
        return self._core.reservation(self._send(call), f"release {reservation_id}")

    def publish(self, *events: dict[str, Any]) -> list[str]:
        """Publish CloudEvents (structured, as JSON objects): through `produce`, keyed by
        subject (its errors propagate as they are), else `POST /events`, retried with the same
        events (the ledger stores an id once). Their ids; `QuotaError` when the ledger refuses
        them."""
        if self._produce is not None:
            for event in events:
                self._produce(event["subject"].encode(), structured(event))
            return [event["id"] for event in events]
        return self._core.published(self._send(self._core.publish_call(events)))

    def settle(
        self,
        decision: Decision,
        amount: int,
        *,
        model: str | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """Record `amount` used by an allowed decision: a `quota.account.usage_recorded` with
        its account, token, model, request id and `reservation_id` (which settles the hold).
        The event's id; None for a degraded decision (no account to charge)."""
        event = self._core.usage(decision, amount, model, event_id)
        return None if event is None else self.publish(event)[0]


class AsyncQuotaClient:
    """The async client: `QuotaClient`'s API with coroutines, on an `httpx.AsyncClient`;
    `produce` is async (see `AsyncProduce`)."""

    def __init__(
        self,
        policy_url: str,
        *,
        fail_mode: FailMode,
        service_token: str | None = None,
        ledger_url: str | None = None,
        ledger_token: str | None = None,
        produce: AsyncProduce | None = None,
        retry: Retry = Retry(),
        timeout: float | httpx.Timeout = 2.0,
        http: httpx.AsyncClient | None = None,
        source: str = "quota-client",
    ) -> None:
        self._core = _Core(
            policy_url, fail_mode, service_token, ledger_url, ledger_token, retry, source
        )
        self._produce = produce
        self._owned = http is None
        self._http = httpx.AsyncClient(timeout=timeout) if http is None else http

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client, when this client made it."""
        if self._owned:
            await self._http.aclose()

    async def _send(self, call: _Call) -> _Outcome:
        attempts = _Attempts(self._core.retry)
        while True:
            try:
                outcome: _Outcome = await self._http.request(
                    call.method, call.url, content=call.content, headers=call.headers
                )
            except httpx.TransportError as exc:
                outcome = exc
            pause = attempts.pause(outcome)
            if pause is None:
                return outcome
            await asyncio.sleep(pause)

    async def authorize(
        self,
        authorization: str | None,
        *,
        model: str | None = None,
        route: str | None = None,
        client_ip: str | None = None,
        channel_id: str | int | None = None,
        request: Mapping[str, Any] | None = None,
        estimated_cost: int | None = None,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """See `QuotaClient.authorize`."""
        call, body = self._core.authorize_call(
            authorization, model, route, client_ip, channel_id, request, estimated_cost,
            request_id, dry_run,
        )  # fmt: skip
        return self._core.decision(await self._send(call), body)

    async def reservation(self, reservation_id: str) -> Reservation | None:
        """See `QuotaClient.reservation`."""
        call = self._core.reservation_call(reservation_id, release=False)
        return self._core.reservation(await self._send(call), f"GET reservation {reservation_id}")

    async def release(self, reservation_id: str) -> Reservation | None:
        """See `QuotaClient.release`."""
        call = self._core.reservation_call(reservation_id, release=True)
        return self._core.reservation(await self._send(call), f"release {reservation_id}")

    async def publish(self, *events: dict[str, Any]) -> list[str]:
        """See `QuotaClient.publish`."""
        if self._produce is not None:
            for event in events:
                await self._produce(event["subject"].encode(), structured(event))
            return [event["id"] for event in events]
        return self._core.published(await self._send(self._core.publish_call(events)))

    async def settle(
        self,
        decision: Decision,
        amount: int,
        *,
        model: str | None = None,
        event_id: str | None = None,
    ) -> str | None:
        """See `QuotaClient.settle`."""
        event = self._core.usage(decision, amount, model, event_id)
        return None if event is None else (await self.publish(event))[0]
