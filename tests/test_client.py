"""services.client against the real services: one ledger and one policy process (with a service
token) for the module, their own database and topic. Allowed and denied decisions, a hold
settled through POST /events and through Kafka, release, retries that keep the request id, the
two fail modes against a port where nothing listens, the sync client, and the FastAPI proxy of
examples/fastapi_proxy.py in front of a stub upstream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from examples.fastapi_proxy import create_app
from services.client import (
    AsyncQuotaClient,
    Decision,
    FailMode,
    QuotaClient,
    QuotaUnavailable,
    Reason,
    Retry,
)
from services.infra.broker import free_port
from services.policy import service
from services.policy.errors import SPECS
from services.settings import Settings
from services.store import db
from tests.builders import cloud_event, recharge, token_issued, wait_for, wait_for_position
from tests.conftest import ADMIN_TOKEN, PARTITIONS
from tests.deploy.gateways import UNAVAILABLE
from tests.processes import QuotaProcess, module_fleet

SERVICE_TOKEN = "client-test-service-token"
MODEL = "gpt-4o"
ROUTE = "/v1/chat/completions"
BALANCE = 1_000_000
#: One funded account and key per test, so the tests do not see each other's holds.
FUNDED = ("async", "sync", "kafka", "proxy", "retry")
KEYS = {name: f"sk-client-{name}-{uuid.UUID(int=i).hex}" for i, name in enumerate(FUNDED)}
POOR_KEY = "sk-client-poor-000000000000000000000000"
#: Quick retries: the fail-mode tests wait for them to be used up.
QUICK = Retry(attempts=3, total_seconds=2.0, backoff=0.01, max_retry_after=0.05)


def world() -> list[dict[str, Any]]:
    events = [
        cloud_event("quota.model.registered", "catalog", {"model": MODEL, "kind": "chat"}),
        cloud_event("quota.model.registered", "catalog", {"model": "busy", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": [MODEL], "groups": ["default"]}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 3, "models": ["busy"], "groups": ["default"]}),
        cloud_event("quota.channel.provider_rate_limited", "catalog",
                    {"channel_id": 3, "until": "2099-01-01T00:00:00Z"}),
        token_issued("acct_client_poor", "tok_poor", POOR_KEY),
    ]  # fmt: skip
    for name, key in KEYS.items():
        events += [recharge(f"acct_client_{name}", BALANCE),
                   token_issued(f"acct_client_{name}", f"tok_{name}", key)]  # fmt: skip
    return events


@dataclass(slots=True)
class Stack:
    settings: Settings
    ledger: QuotaProcess
    policy: QuotaProcess
    pool: asyncpg.Pool

    def client(self, service_token: str = SERVICE_TOKEN, **more: Any) -> AsyncQuotaClient:
        return AsyncQuotaClient(
            self.policy.url, fail_mode=FailMode.CLOSED, service_token=service_token,
            ledger_url=self.ledger.url, ledger_token=ADMIN_TOKEN, **more,
        )  # fmt: skip

    async def reservation_state(self, reservation_id: str) -> tuple[str, int | None]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT state, settled_amount FROM reservations WHERE reservation_id = $1",
                reservation_id,
            )
        assert row is not None
        return row["state"], row["settled_amount"]


@pytest.fixture(scope="module")
async def stack(
    postgres_server_url: str,
    template_database: str,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    async with module_fleet(
        postgres_server_url, template_database, kafka_bootstrap, tmp_path_factory, request,
        "client", partitions=PARTITIONS, admin_token=ADMIN_TOKEN, service_token=SERVICE_TOKEN,
    ) as (settings, fleet):  # fmt: skip
        pool = await db.create_pool(settings.database_url, max_size=2)
        try:
            ledger = fleet.start("ledger", "ledger")
            policy = fleet.start("policy", "policy")
            await fleet.wait_ready(ledger)
            events = world()
            async with httpx.AsyncClient(base_url=ledger.url, timeout=30) as client:
                published = await client.post(
                    "/events", json=events, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                assert published.status_code == 202, published.text
            await wait_for_position(pool, len(events))
            await fleet.wait_ready(policy, len(events))
            yield Stack(settings, ledger, policy, pool)
        finally:
            await pool.close()


class Flaky(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """A transport to the real service that records every request body and spoils the first
    answer: `lose` forwards it and raises a read error instead of returning the answer (the
    service acted, the gateway never heard), `stale` answers the policy's own 503
    `snapshot_stale` with Retry-After without forwarding; `pass` spoils nothing."""

    def __init__(self, first: Literal["lose", "stale", "pass"]) -> None:
        self.first = first
        self.bodies: list[dict[str, Any]] = []
        self.to_async = httpx.AsyncHTTPTransport()
        self.to_sync = httpx.HTTPTransport()

    def _spoiled(self, request: httpx.Request) -> httpx.Response | None:
        self.bodies.append(json.loads(request.content) if request.content else {})
        if len(self.bodies) == 1 and self.first == "stale":
            error = {"message": "stale", "type": "service_unavailable",
                     "code": "snapshot_stale", "reason": "snapshot_stale"}  # fmt: skip
            body = {"allowed": False, "error": error, "position": 0}
            return httpx.Response(503, json=body, headers={"Retry-After": "1"})
        return None

    def _lost(self, request: httpx.Request) -> None:
        if len(self.bodies) == 1 and self.first == "lose":
            raise httpx.ReadError("the answer was lost", request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        spoiled = self._spoiled(request)
        if spoiled is not None:
            return spoiled
        response = await self.to_async.handle_async_request(request)
        content = await response.aread()
        self._lost(request)
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self.to_async.aclose()

    def close(self) -> None:
        self.to_sync.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        spoiled = self._spoiled(request)
        if spoiled is not None:
            return spoiled
        response = self.to_sync.handle_request(request)
        content = response.read()
        self._lost(request)
        return httpx.Response(response.status_code, headers=response.headers, content=content)


# --------------------------------------------------------------------------------- no service


def test_reason_names_every_reason_the_policy_answers() -> None:
    answered = {*SPECS, service.INVALID_REQUEST, service.SERVICE_TOKEN_INVALID,
                service.SNAPSHOT_STALE, service.RESERVATION_UNAVAILABLE,
                service.REQUEST_TOO_LARGE}  # fmt: skip
    assert answered <= {reason.value for reason in Reason}
    assert Reason.of("a_reason_of_2030") is Reason.UNKNOWN


async def test_a_reason_from_a_newer_server_is_kept_and_fail_mode_is_required() -> None:
    error = {"message": "new", "type": "permission_error", "code": None, "reason": "shiny_new"}
    answer = {"allowed": False, "position": 7, "error": error}
    mock = httpx.MockTransport(lambda _: httpx.Response(403, json=answer))
    async with httpx.AsyncClient(transport=mock) as http:
        quota = AsyncQuotaClient("http://policy", fail_mode=FailMode.CLOSED, http=http)
        decision = await quota.authorize("Bearer sk-x")
    assert (decision.reason, decision.reason_code) == (Reason.UNKNOWN, "shiny_new")
    assert (decision.status, decision.position, decision.raw) == (403, 7, answer)
    with pytest.raises(TypeError):
        QuotaClient("http://policy")  # type: ignore[call-arg]


async def test_fail_open_and_fail_closed_when_nothing_listens() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with AsyncQuotaClient(nowhere, fail_mode=FailMode.OPEN, retry=QUICK,
                                ledger_url=nowhere) as quota:  # fmt: skip
        opened = await quota.authorize("Bearer sk-x", model=MODEL, estimated_cost=10)
        assert opened.allowed and opened.degraded and opened.status == 200
        assert opened.reason is Reason.QUOTA_UNAVAILABLE
        assert opened.cause is not None and "ConnectError" in opened.cause
        assert opened.reservation is None and opened.account_id is None
        assert opened.request_id is not None  # made for the hold, kept across the retries
        assert await quota.settle(opened, 5) is None  # no account to charge
        with pytest.raises(QuotaUnavailable):
            await quota.release("rsv_x")
    with QuotaClient(nowhere, fail_mode=FailMode.CLOSED, retry=QUICK) as sync_quota:
        closed = await asyncio.to_thread(sync_quota.authorize, "Bearer sk-x", model=MODEL)
    assert not closed.allowed and closed.degraded
    assert (closed.status, closed.reason, closed.retry_after) == (503, "quota_unavailable", 1)
    assert {**closed.raw} == UNAVAILABLE  # the body nginx and Caddy answer then
    assert closed.headers == {"Retry-After": "1"}
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------------- the services


async def test_allowed_and_denied_decisions(stack: Stack) -> None:
    flaky = Flaky("pass")
    async with httpx.AsyncClient(transport=flaky) as http, stack.client(http=http) as quota:
        allowed = await quota.authorize(f"Bearer {KEYS['async']}", model=MODEL, route=ROUTE,
                                        client_ip="203.0.113.7")  # fmt: skip
        assert allowed.allowed and not allowed.degraded and allowed.status == 200
        assert (allowed.account_id, allowed.token_id) == ("acct_client_async", "tok_async")
        assert (allowed.balance, allowed.available, allowed.channels) == (BALANCE, BALANCE, (1,))
        assert allowed.reservation is None and allowed.budgets == () and allowed.reason is None
        assert allowed.request_id is None  # nothing held: no request id is made
        assert allowed.position is not None and allowed.raw["account_id"] == "acct_client_async"

        poor = await quota.authorize(f"Bearer {POOR_KEY}", model=MODEL, route=ROUTE)
        assert (poor.allowed, poor.status) == (False, 403)
        assert poor.reason is Reason.INSUFFICIENT_USER_QUOTA and poor.message is not None
        unknown = await quota.authorize("Bearer sk-nobody", model=MODEL)
        assert (unknown.status, unknown.reason) == (401, Reason.TOKEN_INVALID)
        image = await quota.authorize(f"Bearer {KEYS['async']}", model=MODEL,
                                      request={"n": "two"})  # fmt: skip
        assert (image.status, image.reason) == (400, Reason.INVALID_REQUEST)
        # A 503 with Retry-After that is a decision (the provider limits every channel) is
        # answered at once, not retried.
        flaky.bodies.clear()
        busy = await quota.authorize(f"Bearer {KEYS['async']}", model="busy", route=ROUTE)
        assert (busy.status, busy.reason) == (503, Reason.PROVIDER_RATE_LIMITED)
        assert busy.retry_after is not None and busy.retry_after > 1000
        assert busy.headers["retry-after"] == str(busy.retry_after)
        assert len(flaky.bodies) == 1
    async with stack.client(service_token="wrong") as wrong:
        refused = await wrong.authorize(f"Bearer {KEYS['async']}", model=MODEL)
    assert (refused.status, refused.reason) == (401, Reason.SERVICE_TOKEN_INVALID)


async def test_a_hold_settled_through_post_events_and_a_release(stack: Stack) -> None:
    key = f"Bearer {KEYS['async']}"
    async with stack.client() as quota:
        held = await quota.authorize(key, model=MODEL, route=ROUTE, estimated_cost=100)
        assert held.allowed and held.reservation is not None, held
        assert held.reservation.state == "held" and held.reservation.amount == 100
        assert held.request_id is not None and held.request_id.startswith("qc-")
        assert held.balance is not None and held.available == held.balance - 100
        event_id = await quota.settle(held, 60)
        assert event_id is not None
        reservation_id = held.reservation.id

        async def settled() -> bool:
            shown = await quota.reservation(reservation_id)
            return shown is not None and shown.state == "settled"

        await wait_for(settled, timeout=30, what="the hold settled")
        shown = await quota.reservation(reservation_id)
        assert shown is not None
        assert (shown.settled_amount, shown.request_id) == (60, held.request_id)
        assert shown.ended_by == f"usage:{event_id}"

        other = await quota.authorize(key, model=MODEL, estimated_cost=40, request_id="r-rel")
        assert other.reservation is not None
        released = await quota.release(other.reservation.id)
        assert released is not None and released.state == "released"
        again = await quota.release(other.reservation.id)  # idempotent
        assert again is not None and again.state == "released"
        settled_one = await quota.release(reservation_id)  # 409: it ended before
        assert settled_one is not None and settled_one.state == "settled"
        assert await quota.release("rsv_unknown") is None
        assert await quota.reservation("rsv_unknown") is None
        # The same request id again: the ended hold, not a second one.
        repeat = await quota.authorize(key, model=MODEL, estimated_cost=40, request_id="r-rel")
        assert repeat.reservation is not None
        assert (repeat.reservation.id, repeat.reservation.state) == (other.reservation.id,
                                                                     "released")  # fmt: skip


async def test_settle_through_a_kafka_producer(stack: Stack) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap)
    await producer.start()
    try:

        async def produce(key: bytes, value: bytes) -> object:
            return await producer.send_and_wait(stack.settings.topic, value, key=key)

        async with stack.client(produce=produce) as quota:
            held = await quota.authorize(f"Bearer {KEYS['kafka']}", model=MODEL, estimated_cost=50)
            assert held.reservation is not None, held
            await quota.settle(held, 70)
            reservation_id = held.reservation.id

            async def settled() -> bool:
                return (await stack.reservation_state(reservation_id))[0] == "settled"

            await wait_for(settled, timeout=30, what="the hold settled from Kafka")
    finally:
        await producer.stop()
    assert await stack.reservation_state(reservation_id) == ("settled", 70)


@pytest.mark.parametrize("first", ["lose", "stale"])
async def test_a_retried_hold_keeps_its_request_id_and_holds_once(
    stack: Stack, first: Literal["lose", "stale"]
) -> None:
    flaky = Flaky(first)
    async with httpx.AsyncClient(transport=flaky) as http, stack.client(
        http=http, retry=QUICK
    ) as quota:  # fmt: skip
        held = await quota.authorize(f"Bearer {KEYS['retry']}", model=MODEL, estimated_cost=7)
    assert held.allowed and held.reservation is not None, held
    assert len(flaky.bodies) == 2
    assert flaky.bodies[0] == flaky.bodies[1]
    assert flaky.bodies[0]["request_id"] == held.request_id
    async with stack.pool.acquire() as conn:
        holds = await conn.fetchval(
            "SELECT count(*) FROM reservations WHERE request_id = $1", held.request_id
        )
    assert holds == 1


async def test_the_sync_client(stack: Stack) -> None:
    def run() -> tuple[Decision, Decision, str | None]:
        flaky = Flaky("lose")
        with httpx.Client(transport=flaky) as http, QuotaClient(
            stack.policy.url, fail_mode=FailMode.CLOSED, service_token=SERVICE_TOKEN,
            ledger_url=stack.ledger.url, ledger_token=ADMIN_TOKEN, http=http, retry=QUICK,
        ) as quota:  # fmt: skip
            key = f"Bearer {KEYS['sync']}"
            held = quota.authorize(key, model=MODEL, estimated_cost=30, request_id="sync-1")
            assert [body["request_id"] for body in flaky.bodies] == ["sync-1", "sync-1"]
            denied = quota.authorize(f"Bearer {POOR_KEY}", model=MODEL)
            assert held.reservation is not None, held
            released = quota.authorize(key, model=MODEL, estimated_cost=5)
            assert released.reservation is not None
            shown = quota.release(released.reservation.id)
            assert shown is not None and shown.state == "released"
            return held, denied, quota.settle(held, 25)

    held, denied, event_id = await asyncio.to_thread(run)
    assert held.allowed and held.available == BALANCE - 30
    assert (denied.status, denied.reason) == (403, Reason.INSUFFICIENT_USER_QUOTA)
    assert event_id is not None and held.reservation is not None
    reservation_id = held.reservation.id

    async def settled() -> bool:
        return (await stack.reservation_state(reservation_id))[0] == "settled"

    await wait_for(settled, timeout=30, what="the sync client's hold settled")
    assert await stack.reservation_state(reservation_id) == ("settled", 25)


# --------------------------------------------------------------------------------- the example


def stub_upstream(seen: list[tuple[str | None, dict[str, Any]]]) -> FastAPI:
    """An OpenAI-compatible chat upstream: 42 tokens used; `"user": "break"` fails (500)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        seen.append((request.headers.get("authorization"), body))
        if body.get("user") == "break":
            return JSONResponse({"error": {"message": "the upstream broke"}}, 500)
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 30, "completion_tokens": 12,
                          "total_tokens": 42}}  # fmt: skip

    return app


def test_docs_show_the_example_as_it_is() -> None:
    root = Path(__file__).resolve().parents[1]
    code = (root / "examples" / "fastapi_proxy.py").read_text(encoding="utf-8")
    start = code.index("def create_app")
    excerpt = code[start : code.index("    return app\n", start) + len("    return app\n")]
    assert f"```python\n{excerpt}```" in (root / "docs" / "client.md").read_text(encoding="utf-8")


async def test_the_fastapi_proxy_example(stack: Stack) -> None:
    seen: list[tuple[str | None, dict[str, Any]]] = []
    to_stub = httpx.ASGITransport(app=stub_upstream(seen))
    async with (
        httpx.AsyncClient(transport=to_stub, base_url="http://upstream",
                          headers={"Authorization": "Bearer sk-upstream"}) as upstream,
        stack.client() as quota,
    ):  # fmt: skip
        proxy = httpx.ASGITransport(app=create_app(quota, upstream))
        async with httpx.AsyncClient(transport=proxy, base_url="http://proxy") as client:
            key = {"Authorization": f"Bearer {KEYS['proxy']}"}
            chat = {"model": MODEL, "max_tokens": 500,
                    "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            answer = await client.post(ROUTE, json=chat, headers=key)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["total_tokens"] == 42
            # The upstream got the body, with the upstream's own key (not the client's).
            assert seen == [("Bearer sk-upstream", chat)]

            broken = await client.post(ROUTE, json=chat | {"user": "break"}, headers=key)
            assert broken.status_code == 502
            poor = await client.post(ROUTE, json=chat, headers={"Authorization": POOR_KEY})
            assert poor.status_code == 403
            assert poor.json()["error"]["reason"] == "insufficient_user_quota"
            assert len(seen) == 2  # a denied request never reaches the upstream

    async def ended() -> bool:
        async with stack.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT state, amount, settled_amount FROM reservations"
                " WHERE account_id = 'acct_client_proxy' ORDER BY held_position"
            )
        return [tuple(row) for row in rows] == [("settled", 500, 42), ("released", 500, None)]

    await wait_for(ended, timeout=30, what="the proxied hold settled and the failed one released")
