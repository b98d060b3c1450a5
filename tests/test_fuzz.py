"""Fuzzing both services through their own OpenAPI schemas (CONTRACT §7: no input gets a 5xx).

Schemathesis generates requests from each service's schema (its examples, coverage and fuzzing
phases: valid and invalid values, boundaries, wrong types and media types) and sends them to
real `quota ledger` and `quota policy` processes, seeded with funded accounts, keys, models,
channels, quarantined records and reservations. The test's copy of each schema steers some
inputs towards the seeded ids, so generated requests get past "unknown" into the code behind
it. Every answer must:

- not be a 5xx, except the policy's decision 503s (`model_unavailable`, `provider_rate_limited`):
  PostgreSQL and the broker are up all along, so no other 503 is excused;
- conform to the schema: a documented status code and content type, the documented required
  headers, and a body that matches the documented response schema;
- be a 4xx for a request that violates the schema.

The schemas are built in-process (the same code the processes serve, which the world fixture
checks) so that pytest can collect one test per operation with `@schema.parametrize()`
(`schemathesis.pytest.from_fixture`, which would load them from the running processes, fails
on pytest 9: it sets `Function._nodeid`, which pytest 9 no longer has). The seed is fixed and
the examples per operation bounded: a run is repeatable and takes about a minute. `/readyz` is
left out: its answer depends on the moment, not on the input.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import httpx
import pytest
import schemathesis
from schemathesis import BaseSchema, Case

from services.ledger.app import create_app as create_ledger
from services.policy.app import create_app as create_policy
from services.settings import Settings
from services.store import db, event_store
from tests.builders import (
    cloud_event,
    produce_raw,
    recharge,
    token_issued,
    wait_for_position,
    wait_for_rejected,
)
from tests.conftest import ADMIN_TOKEN, PARTITIONS
from tests.processes import QuotaProcess, QuotaProcesses, module_fleet

ADMIN: Final = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SERVICE_TOKEN: Final = "fuzz-gateway-token"
GATEWAY: Final = {"X-Quota-Service-Token": SERVICE_TOKEN}

SEED: Final = 20261124
#: Per operation and phase; with the coverage phase's own cases, about a minute for both.
MAX_EXAMPLES: Final = 25

ACCOUNT: Final = "acct_fuzz"
ADMIN_ACCOUNT: Final = "acct_fuzz_admin"
KEY: Final = "sk-fuzz-user-key-00000000000000001"
ADMIN_KEY: Final = "sk-fuzz-admin-key-0000000000000002"
#: An account id no HTTP header can carry as it is (beyond Latin-1, and a line break).
ODD_ACCOUNT: Final = "acct_€\nodd"
ODD_KEY: Final = "sk-fuzz-odd-key-00000000000000003"
KEYS: Final = [f"Bearer {KEY}", KEY, f"Bearer {ADMIN_KEY}", f"Bearer {ADMIN_KEY}-1", "Bearer "]
MODELS: Final = ["gpt-4o", "dall-e-3", "tts-1", "busy", "ghost"]
#: Stand-ins in the schema for the seeded reservations, whose ids are only known at run time.
HELD: Final = "the-held-reservation"
RELEASED: Final = "the-released-reservation"

#: The only 5xx answers while PostgreSQL and the broker are up: decisions (CONTRACT §3).
DECISION_503S: Final = frozenset({"model_unavailable", "provider_rate_limited"})

DEEP: Final = 100_000


def seed_events() -> list[dict[str, Any]]:
    def catalog(type_: str, data: dict[str, Any]) -> dict[str, Any]:
        return cloud_event(type_, "catalog", data)

    return [
        catalog("quota.model.registered", {"model": "gpt-4o", "kind": "chat"}),
        catalog("quota.model.registered", {"model": "dall-e-3", "kind": "image", "limits": {
            "max_prompt_chars": 100, "sizes": ["1024x1024"], "n_min": 1, "n_max": 2}}),
        catalog("quota.model.registered", {"model": "tts-1", "kind": "audio",
                                           "limits": {"max_input_chars": 50}}),
        catalog("quota.model.registered", {"model": "busy", "kind": "chat"}),
        catalog("quota.channel.registered", {"channel_id": 1, "models": ["gpt-4o", "dall-e-3",
                                             "tts-1"], "groups": ["default"]}),
        catalog("quota.channel.registered", {"channel_id": 2, "models": ["gpt-4o"],
                                             "groups": ["default"]}),
        catalog("quota.channel.disabled", {"channel_id": 2}),
        catalog("quota.channel.registered", {"channel_id": 3, "models": ["busy"],
                                             "groups": ["default"]}),
        catalog("quota.channel.provider_rate_limited", {"channel_id": 3,
                                                        "until": "2099-01-01T00:00:00Z"}),
        catalog("quota.route.policy_set", {"route": "/v1/admin/*", "min_role": "admin"}),
        cloud_event("quota.account.opened", ADMIN_ACCOUNT, {"role": "admin"}),
        cloud_event("quota.account.rate_limit_set", ACCOUNT, {
            "model": "*", "requests": 1_000_000, "window_seconds": 60}),
        recharge(ACCOUNT, 10**12),
        recharge(ADMIN_ACCOUNT, 10**12),
        token_issued(ACCOUNT, "tok_fuzz", KEY),
        token_issued(ADMIN_ACCOUNT, "tok_fuzz_admin", ADMIN_KEY,
                     allowed_cidrs=["10.0.0.0/8", "2001:db8::/32"]),
        recharge(ODD_ACCOUNT, 10),
        token_issued(ODD_ACCOUNT, "tok_€", ODD_KEY),
    ]  # fmt: skip


# --- the schemas, with some inputs steered towards the seeded world -------------------------


def steer(schema: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """`schema`, or one of `values` (seeded ids reach further than random text)."""
    return {"anyOf": [{"enum": values}, schema]}


def steer_parameters(raw: dict[str, Any], name: str, values: list[Any]) -> None:
    for operations in raw["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == name:
                    parameter["schema"] = steer(parameter["schema"], values)


def ledger_openapi() -> dict[str, Any]:
    raw: dict[str, Any] = create_ledger(Settings(admin_token=ADMIN_TOKEN)).openapi()
    return raw


def policy_openapi() -> dict[str, Any]:
    raw: dict[str, Any] = create_policy(Settings(service_token=SERVICE_TOKEN)).openapi()
    return raw


def steered_ledger() -> dict[str, Any]:
    raw = ledger_openapi()
    steer_parameters(raw, "account_id", [ACCOUNT, ADMIN_ACCOUNT, "catalog"])
    steer_parameters(raw, "prefix", ["acct_", ""])
    steer_parameters(raw, "name", ["app.js", "ui.css"])
    body = raw["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]
    one, many = body["schema"]["oneOf"]
    for event in one["oneOf"] + many["items"]["oneOf"]:
        _numbers_are_times(event["properties"]["data"])
    return raw


def _numbers_are_times(schema: Any) -> None:
    """Known looseness, not a crash: the event models' times (pydantic's lax `AwareDatetime`)
    take a number as Unix time too, where the contract says RFC 3339; tell the fuzzer so that
    it does not report each such event as "schema-violating data accepted"."""
    children = schema.items() if isinstance(schema, dict) else enumerate(schema)
    for key, value in list(children):
        if isinstance(value, dict) and value.get("format") == "date-time":
            schema[key] = {"anyOf": [value, {"type": "number"}]}
        elif isinstance(value, dict | list):
            _numbers_are_times(value)


def steered_policy() -> dict[str, Any]:
    raw = policy_openapi()
    steer_parameters(raw, "reservation_id", [HELD, RELEASED])
    steer_parameters(raw, "Authorization", KEYS)
    steer_parameters(raw, "X-Quota-Model", MODELS)
    steer_parameters(raw, "X-Quota-Channel", ["1", "2", "3", "x"])
    steer_parameters(raw, "X-Forwarded-For", ["10.1.2.3", "203.0.113.7, 10.0.0.1"])
    steer_parameters(raw, "X-Forwarded-Uri", ["/v1/chat/completions", "/v1/admin/users"])
    body = raw["paths"]["/authorize"]["post"]["requestBody"]["content"]["application/json"]
    fields = body["schema"]["properties"]
    for name, values in (
        ("authorization", KEYS),
        ("model", MODELS),
        ("route", ["/v1/chat/completions", "/v1/admin/users"]),
        ("client_ip", ["10.1.2.3", "2001:db8::1", "203.0.113.7"]),
        ("channel_id", ["1", 2, "3"]),
        ("request_id", ["fuzz-held", "fuzz-released"]),
    ):
        fields[name] = steer(fields[name], values)
    # The examples phase sends each of these as it is; the other phases vary them.
    chat = {"authorization": f"Bearer {KEY}", "model": "gpt-4o", "client_ip": "203.0.113.7",
            "route": "/v1/chat/completions"}  # fmt: skip
    body["examples"] = {
        name: {"value": value}
        for name, value in (
            ("allowed", chat),
            ("held", {**chat, "estimated_cost": 7, "request_id": "fuzz-example"}),
            ("held again", {**chat, "estimated_cost": 7, "request_id": "fuzz-held"}),
            ("too much", {**chat, "estimated_cost": 10**15}),
            ("image", {**chat, "model": "dall-e-3", "request": {"prompt": "a cat", "n": 3}}),
            ("audio", {**chat, "model": "tts-1", "request": {"input": ["a" * 30] * 2}}),
            ("admin pin", {**chat, "authorization": f"Bearer {ADMIN_KEY}-1",
                           "client_ip": "10.1.2.3", "channel_id": "1"}),
            ("provider limited", {**chat, "model": "busy"}),
        )
    }  # fmt: skip
    for parameter, example in (
        ("Authorization", f"Bearer {KEY}"),
        ("X-Quota-Model", "gpt-4o"),
        ("X-Forwarded-Uri", "/v1/chat/completions"),
        ("X-Quota-Estimated-Cost", "3"),
    ):
        for operation in raw["paths"]["/authorize/forward"].values():
            for declared in operation["parameters"]:
                if declared["name"] == parameter:
                    declared["example"] = example
    return raw


def fuzzing_schema(raw: dict[str, Any], headers: dict[str, str]) -> BaseSchema:
    """`raw` to fuzz with a fixed seed, sending `headers` (the credentials) with every case."""
    checks = {
        name: {"enabled": True}
        for name in (
            "status_code_conformance",
            "content_type_conformance",
            "response_schema_conformance",
            "response_headers_conformance",
            "negative_data_rejection",
        )
    }
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": headers,
            "request-timeout": 30,
            "suppress-health-check": ["all"],
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            # Only these: 5xx are judged by `exercise`, which knows the decision 503s.
            "checks": {"enabled": False, **checks},
        }
    )
    return schemathesis.openapi.from_dict(raw, config=config).exclude(path="/readyz")


LEDGER_SCHEMA: Final = fuzzing_schema(steered_ledger(), ADMIN)
POLICY_SCHEMA: Final = fuzzing_schema(steered_policy(), GATEWAY)


# --- the world: one ledger and one policy process for the module ----------------------------


@dataclass(slots=True)
class World:
    fleet: QuotaProcesses
    ledger: QuotaProcess
    policy: QuotaProcess
    reservations: dict[str, str]


@pytest.fixture(scope="module")
async def world(
    postgres_server_url: str,
    template_database: str,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> AsyncIterator[World]:
    """A ledger that has applied the seed and quarantined two bad records, and a policy with a
    service token that has seen it, a held and a released reservation; their own database and
    topic. Both must still run at the end."""
    async with module_fleet(
        postgres_server_url, template_database, kafka_bootstrap, tmp_path_factory, request,
        "fuzz", partitions=PARTITIONS, admin_token=ADMIN_TOKEN,
    ) as (settings, fleet):  # fmt: skip
        pool = await db.create_pool(settings.database_url, max_size=2)
        try:
            ledger, policy, reservations = await _start(fleet, pool, settings)
        finally:
            await pool.close()
        yield World(fleet, ledger, policy, reservations)


async def _start(
    fleet: QuotaProcesses, pool: asyncpg.Pool, settings: Settings
) -> tuple[QuotaProcess, QuotaProcess, dict[str, str]]:
    ledger = fleet.start("ledger", "ledger")
    await fleet.wait_ready(ledger)
    events = seed_events()
    async with httpx.AsyncClient(base_url=ledger.url, headers=ADMIN, timeout=30) as client:
        published = await client.post("/events", json=events)
        assert published.status_code == 202, published.text
        assert (await client.get("/openapi.json")).json() == ledger_openapi()
    poison: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (ACCOUNT.encode(), b"{not json", []),
        (ACCOUNT.encode(), b"\xff\xfe\x00", []),
    ]
    await produce_raw(settings.kafka_bootstrap, settings.topic, poison)
    await wait_for_position(pool, len(events))
    await wait_for_rejected(pool, len(poison))
    async with pool.acquire() as conn:
        position = (await event_store.read_head(conn)).position
    policy = fleet.start("policy", "policy", service_token=SERVICE_TOKEN)
    await fleet.wait_ready(policy, position)
    ask = {"authorization": f"Bearer {KEY}", "model": "gpt-4o", "estimated_cost": 5,
           "route": "/v1/chat/completions"}  # fmt: skip
    async with httpx.AsyncClient(base_url=policy.url, headers=GATEWAY, timeout=30) as client:
        assert (await client.get("/openapi.json")).json() == policy_openapi()
        held = await client.post("/authorize", json={**ask, "request_id": "fuzz-held"})
        ended = await client.post("/authorize", json={**ask, "request_id": "fuzz-released"})
        assert held.status_code == ended.status_code == 200, (held.text, ended.text)
        reservations = {
            HELD: held.json()["reservation"]["id"],
            RELEASED: ended.json()["reservation"]["id"],
        }
        released = await client.post(f"/reservations/{reservations[RELEASED]}/release")
        assert released.status_code == 200, released.text
    return ledger, policy, reservations


# --- the checks -----------------------------------------------------------------------------


def exercise(case: Case[Any], process: QuotaProcess, excused: frozenset[str]) -> None:
    """Send the case; no 5xx but the `excused` decision reasons; then the schema's checks."""
    response = case.call(base_url=process.url, timeout=30)
    if response.status_code >= 500:
        reason = _reason(response.content)
        assert response.status_code == 503 and reason in excused, (
            f"{case.method} {case.formatted_path} answered {response.status_code}: "
            f"{response.content[:1000]!r}\n{case.as_curl_command()}"
        )
    case.validate_response(response)


def _reason(content: bytes) -> str | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("reason") if isinstance(error, dict) else None


# The policy first: the ledger's fuzzing publishes events that change the catalog.
@pytest.mark.timeout(180)
@POLICY_SCHEMA.parametrize()
def test_the_policy_answers_every_input_as_its_schema_says(case: Case[Any], world: World) -> None:
    world.fleet.check_alive()
    reservation = (case.path_parameters or {}).get("reservation_id")
    if isinstance(reservation, str) and reservation in world.reservations:
        case.path_parameters["reservation_id"] = world.reservations[reservation]
    exercise(case, world.policy, DECISION_503S)


@pytest.mark.timeout(180)
@LEDGER_SCHEMA.parametrize()
def test_the_ledger_answers_every_input_as_its_schema_says(case: Case[Any], world: World) -> None:
    world.fleet.check_alive()
    exercise(case, world.ledger, frozenset())


# --- nesting far beyond any parser's recursion limit ----------------------------------------


def nested(kind: str, depth: int = DEEP) -> bytes:
    opening, closing = ("[", "]") if kind == "array" else ('{"a":', "}")
    return (opening * depth + "1" + closing * depth).encode()


@pytest.mark.parametrize("kind", ["array", "object"])
async def test_a_100000_deep_body_is_a_4xx_everywhere(world: World, kind: str) -> None:
    json_type = {"Content-Type": "application/json"}
    answers: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(timeout=60) as client:
        answers["events"] = await client.post(
            f"{world.ledger.url}/events", content=nested(kind), headers={**ADMIN, **json_type}
        )
        for path in ("/authorize", "/authorize/forward"):
            answers[path] = await client.post(
                f"{world.policy.url}{path}",
                content=nested(kind),
                headers={**GATEWAY, **json_type},
            )
        # Within the policy's 64 KiB body limit: parsed, not refused for its size.
        answers["authorize, 10000 deep"] = await client.post(
            f"{world.policy.url}/authorize",
            content=nested(kind, 10_000),
            headers={**GATEWAY, **json_type},
        )
    for name, answer in answers.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:500])
        assert answer.headers["content-type"].startswith("application/json"), name
    assert answers["events"].json()["error"]["code"] == "invalid_json"
    assert answers["/authorize"].json()["error"]["reason"] == "request_too_large"
    assert answers["authorize, 10000 deep"].json()["error"]["reason"] == "invalid_request"
    world.fleet.check_alive()


# --- what the fuzzer found, and inputs it is unlikely to generate --------------------------

EVENT: Final = {"specversion": "1.0", "id": "e-1", "source": "tests", "subject": ACCOUNT,
                "type": "quota.account.recharged", "data": {"amount": 5}}  # fmt: skip


def deep_data(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (json.dumps({**EVENT, "subject": "acct_\ud800"}).encode(), "bad_data"),
        (json.dumps({**EVENT, "data": {"amount": 5, "note": "\udfff"}}).encode(), "bad_data"),
        (json.dumps({**EVENT, "id": "\ud800", "specversion": "0.3"}).encode(), "not_cloudevent"),
        (json.dumps({**EVENT, "data": {"amount": 5, "x": deep_data(900)}}).encode(), "bad_data"),
        (json.dumps({**EVENT, "time": "9999-12-31T23:59:59-23:59"}).encode(), "not_cloudevent"),
        (json.dumps({**EVENT, "data": {"amount": 5, "x": "y" * 1_100_000}}).encode(),
         "event_too_large"),
        (b'{"specversion": "1.0", "amount": NaN}', "invalid_json"),
        (b'{"amount": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
    ],
    ids=["surrogate subject", "surrogate in data", "surrogate id", "deep data", "time overflow",
         "too large for the broker", "NaN", "5000 digits", "not UTF-8"],
)  # fmt: skip
async def test_bad_events_are_a_400_naming_the_problem(
    world: World, body: bytes, code: str
) -> None:
    async with httpx.AsyncClient(base_url=world.ledger.url, headers=ADMIN, timeout=30) as client:
        answer = await client.post("/events", content=body)
    assert answer.status_code == 400, answer.text[:500]
    assert answer.json()["error"]["details"][0]["code"] == code, answer.text[:500]


@pytest.mark.parametrize(
    "path",
    [
        f"/accounts/{ACCOUNT}/balance?as_of=9999-12-31T23:59:59-23:59",
        f"/accounts/{ACCOUNT}/balance?as_of=0001-01-01T00:00:00%2B23:59",
        f"/accounts/{ACCOUNT}/statement?since=9999-12-31T23:59:59-01:00",
        f"/accounts/{ACCOUNT}/statement?until=0001-01-01T00:00:00%2B00:01",
        "/audit/rejected?after=9223372036854775808",
        "/audit/rejected?after=99999999999999999999999999",
    ],
)
async def test_reads_beyond_what_postgresql_holds_are_a_4xx(world: World, path: str) -> None:
    async with httpx.AsyncClient(base_url=world.ledger.url, headers=ADMIN, timeout=30) as client:
        answer = await client.get(path)
    assert answer.status_code in (400, 422), answer.text[:500]
    assert answer.json()["error"]["message"]


async def test_forward_auth_headers_survive_any_id_and_any_number(world: World) -> None:
    ask = {**GATEWAY, "X-Forwarded-Uri": "/v1/chat/completions", "X-Quota-Model": "gpt-4o"}
    async with httpx.AsyncClient(base_url=world.policy.url, timeout=30) as client:
        odd = await client.get("/authorize/forward", headers={**ask, "Authorization": ODD_KEY})
        digits = await client.get(
            "/authorize/forward",
            headers={**ask, "Authorization": KEY, "X-Quota-Estimated-Cost": "9" * 5000},
        )
        beyond = await client.get(
            "/authorize/forward",
            headers={**ask, "Authorization": KEY, "X-Quota-Estimated-Cost": str(2**63)},
        )
        body = await client.post(
            "/authorize", headers=GATEWAY, json={"authorization": KEY, "estimated_cost": 2**64}
        )
    assert odd.status_code == 200, odd.text
    assert odd.json()["account_id"] == ODD_ACCOUNT
    assert odd.headers["x-quota-account"] == "acct_%E2%82%AC%0Aodd"
    assert odd.headers["x-quota-token"] == "tok_%E2%82%AC"
    for answer in (digits, beyond, body):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["reason"] == "invalid_request"
    assert "X-Quota-Estimated-Cost" in digits.json()["error"]["message"]
