"""The key lifecycle (CONTRACT section 8) end to end: `POST /keys`, rotate with a grace period,
revoke and `GET /accounts/{id}/keys` on a real `quota ledger` process, the keys tried at two real
`quota policy` processes, `quota key ...`, and the plaintext key found in no table, dump, log
line or metric.

One stack serves the module (a database and topic of its own, one ledger, two policies, all
as talkative as they get: DEBUG and access logs). Every key a test sees goes into `stack.keys`;
the last test looks for each of them in `pg_dump` and in every process's log.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner, Result

from services import cli as quota_cli
from services.ledger import keys_api
from services.ledger.app import create_app
from services.settings import Settings
from services.store import db
from tests.builders import cloud_event, recharge, wait_for_position
from tests.conftest import ADMIN_TOKEN, PARTITIONS
from tests.processes import QUOTA, QuotaProcess, QuotaProcesses, module_fleet, quota_env

pytestmark = pytest.mark.timeout(240)

AUTH: Final = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ACCOUNT: Final = "acct_keys"
#: Funded but never given a key.
KEYLESS: Final = "acct_keyless"
MODEL: Final = "gpt-4o"
RANDOM_PART: Final = re.compile(r"[A-Za-z0-9]{43}")


@dataclass(slots=True)
class Stack:
    settings: Settings
    database: str
    fleet: QuotaProcesses
    ledger: QuotaProcess
    policies: list[QuotaProcess]
    pool: asyncpg.Pool
    client: httpx.AsyncClient
    #: Every plaintext key the tests have seen, with its prefix.
    keys: list[tuple[str, str]] = field(default_factory=list)

    def saw(self, key: str, prefix: str) -> str:
        self.keys.append((key, prefix))
        return key


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
        "keys", partitions=PARTITIONS, admin_token=ADMIN_TOKEN, allow_anonymous_gateways=True,
        # As talkative as the processes get: every line is searched for keys at the end.
        log_level="DEBUG", access_log=True,
    ) as (settings, fleet):  # fmt: skip
        name = unquote(urlsplit(settings.database_url).path.lstrip("/"))
        pool = await db.create_pool(settings.database_url, max_size=2)
        try:
            ledger = fleet.start("ledger", "ledger")
            policies = [fleet.start("policy", f"policy-{i}") for i in range(2)]
            await fleet.wait_ready(ledger)
            setup = [
                cloud_event("quota.model.registered", "catalog", {"model": MODEL, "kind": "chat"}),
                cloud_event("quota.channel.registered", "catalog",
                            {"channel_id": 1, "models": [MODEL], "groups": ["default"]}),
                recharge(ACCOUNT, 10**9),
                recharge(KEYLESS, 10),
            ]  # fmt: skip
            async with httpx.AsyncClient(base_url=ledger.url, headers=AUTH, timeout=60) as client:
                published = await client.post("/events", json=setup)
                assert published.status_code == 202, published.text
                await wait_for_position(pool, len(setup))
                for policy in policies:
                    await fleet.wait_ready(policy, len(setup))
                yield Stack(settings, name, fleet, ledger, policies, pool, client)
        finally:
            await pool.close()


# --- helpers --------------------------------------------------------------------------------


async def issue(stack: Stack, account: str = ACCOUNT, **body: Any) -> dict[str, Any]:
    response = await stack.client.post("/keys", json={"account_id": account, **body})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    answer: dict[str, Any] = response.json()
    stack.saw(answer["key"], body.get("prefix", "sk-"))
    return answer


async def rotate(stack: Stack, token_id: str, **body: Any) -> dict[str, Any]:
    response = await stack.client.post(f"/keys/{token_id}/rotate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer: dict[str, Any] = response.json()
    stack.saw(answer["key"], body.get("prefix", "sk-"))
    return answer


async def decide(stack: Stack, key: str, position: int) -> list[httpx.Response]:
    """`/authorize` with `key` at both policies, once each has reached `position`."""
    ask = {"authorization": f"Bearer {key}", "model": MODEL, "route": "/v1/chat/completions",
           "client_ip": "203.0.113.7"}  # fmt: skip
    answers = []
    for policy in stack.policies:
        await stack.fleet.wait_ready(policy, position)
        async with httpx.AsyncClient(base_url=policy.url, timeout=30) as gateway:
            answers.append(await gateway.post("/authorize", json=ask))
    return answers


def assert_allowed(answers: list[httpx.Response], token_id: str, account: str = ACCOUNT) -> None:
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["allowed"] is True
        assert answer.json()["token_id"] == token_id
        assert answer.json()["account_id"] == account


def assert_invalid(answers: list[httpx.Response]) -> None:
    for answer in answers:
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["reason"] == "token_invalid"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert {"code", "message", "type", "details"} <= set(body["error"])


def parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# --- the tests ------------------------------------------------------------------------------


def test_keys_are_a_prefix_and_256_random_bits_of_base62() -> None:
    keys = {keys_api.new_key("sk-") for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert re.fullmatch(r"sk-[A-Za-z0-9]{43}", key)
        assert "…" in repr(key) and key[3:-6] not in repr(key)
    assert keys_api.new_key("").isalnum() and len(keys_api.new_key("")) == 43
    # Every character of the alphabet turns up: nothing is left out of the draw.
    assert set("".join(keys)) - set("sk-") >= set(keys_api.ALPHABET) - set("sk")
    assert keys_api.key_sha256("sk-abc") == hashlib.sha256(b"sk-abc").hexdigest()


async def test_a_new_key_works_at_both_policies_at_its_position(stack: Stack) -> None:
    issued = await issue(stack)
    assert set(issued) == {"token_id", "key", "key_last6", "account_id", "expires_at",
                           "position"}  # fmt: skip
    key = issued["key"]
    assert key.startswith("sk-") and RANDOM_PART.fullmatch(key[3:])
    assert issued["key_last6"] == key[-6:]
    assert issued["token_id"].startswith("tok_")
    assert issued["account_id"] == ACCOUNT
    assert issued["expires_at"] is None
    # The answer came once the token was applied.
    async with stack.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM tokens WHERE token_id = $1", issued["token_id"])
        head = await conn.fetchval("SELECT position FROM ledger_head")
    assert row is not None and head >= issued["position"]
    assert row["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["key_last6"] == key[-6:]
    assert_allowed(await decide(stack, key, issued["position"]), issued["token_id"])
    # One character off is an unknown key.
    other = key[:-1] + ("a" if key[-1] != "a" else "b")
    assert_invalid(await decide(stack, other, issued["position"]))


async def test_a_custom_prefix_expiry_and_restrictions(stack: Stack) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    issued = await issue(
        stack,
        prefix="acme_live-",
        expires_at=expires.astimezone(ZoneInfo("Europe/Berlin")).isoformat(),
        allowed_models=[MODEL],
        allowed_cidrs=["203.0.113.0/24", "2001:db8::1"],
        max_concurrent=3,
    )
    key = issued["key"]
    assert key.startswith("acme_live-") and RANDOM_PART.fullmatch(key.removeprefix("acme_live-"))
    assert parse_time(issued["expires_at"]) == expires
    assert_allowed(await decide(stack, key, issued["position"]), issued["token_id"])
    bare = await issue(stack, prefix="")
    assert RANDOM_PART.fullmatch(bare["key"])
    assert_allowed(await decide(stack, bare["key"], bare["position"]), bare["token_id"])
    listing = (await stack.client.get(f"/accounts/{ACCOUNT}/keys")).json()
    [item] = [i for i in listing if i["token_id"] == issued["token_id"]]
    assert item["allowed_models"] == [MODEL]
    assert item["allowed_cidrs"] == ["203.0.113.0/24", "2001:db8::1/128"]
    assert item["max_concurrent"] == 3
    assert parse_time(item["expires_at"]) == expires


async def test_rotation_keeps_the_previous_key_for_its_grace_then_only_the_new_one(
    stack: Stack,
) -> None:
    issued = await issue(stack)
    old = issued["key"]
    before = datetime.now(UTC)
    rotated = await rotate(stack, issued["token_id"], grace_seconds=3)
    assert set(rotated) == {"token_id", "key", "key_last6", "previous_valid_until", "position"}
    new = rotated["key"]
    assert rotated["token_id"] == issued["token_id"] and new != old
    assert new.startswith("sk-") and rotated["key_last6"] == new[-6:]
    assert rotated["position"] > issued["position"]
    until = parse_time(rotated["previous_valid_until"])
    assert before + timedelta(seconds=3) <= until <= datetime.now(UTC) + timedelta(seconds=3)
    # Within the grace both keys work, for the same token.
    assert_allowed(await decide(stack, old, rotated["position"]), issued["token_id"])
    assert_allowed(await decide(stack, new, rotated["position"]), issued["token_id"])
    await asyncio.sleep((until - datetime.now(UTC)).total_seconds() + 0.3)
    assert_invalid(await decide(stack, old, rotated["position"]))
    assert_allowed(await decide(stack, new, rotated["position"]), issued["token_id"])
    listing = (await stack.client.get(f"/accounts/{ACCOUNT}/keys")).json()
    [item] = [i for i in listing if i["token_id"] == issued["token_id"]]
    assert item["key_last6"] == new[-6:]
    assert item["previous_valid_until"] == rotated["previous_valid_until"]


async def test_rotation_without_grace_ends_the_previous_key_at_once(stack: Stack) -> None:
    issued = await issue(stack, prefix="live_")
    rotated = await rotate(stack, issued["token_id"], prefix="live_")
    assert rotated["key"].startswith("live_")
    assert_invalid(await decide(stack, issued["key"], rotated["position"]))
    assert_allowed(await decide(stack, rotated["key"], rotated["position"]), issued["token_id"])
    # No body at all: no grace, the default prefix.
    again = await stack.client.post(f"/keys/{issued['token_id']}/rotate")
    assert again.status_code == 200, again.text
    stack.saw(again.json()["key"], "sk-")
    assert again.json()["key"].startswith("sk-")
    assert_invalid(await decide(stack, rotated["key"], again.json()["position"]))


async def test_revocation(stack: Stack) -> None:
    issued = await issue(stack)
    assert_allowed(await decide(stack, issued["key"], issued["position"]), issued["token_id"])
    revoked = await stack.client.delete(f"/keys/{issued['token_id']}")
    assert revoked.status_code == 200, revoked.text
    assert set(revoked.json()) == {"token_id", "position"}
    assert revoked.json()["token_id"] == issued["token_id"]
    assert revoked.json()["position"] > issued["position"]
    assert_invalid(await decide(stack, issued["key"], revoked.json()["position"]))
    # Revoking again changes nothing and says where it happened.
    again = await stack.client.delete(f"/keys/{issued['token_id']}")
    assert again.status_code == 200 and again.json() == revoked.json()
    assert_error(
        await stack.client.post(f"/keys/{issued['token_id']}/rotate", json={}), 404, "unknown_token"
    )
    assert_error(await stack.client.delete("/keys/tok_nope"), 404, "unknown_token")
    assert_error(await stack.client.post("/keys/tok_nope/rotate"), 404, "unknown_token")


async def test_an_accounts_keys_are_listed_without_secrets(stack: Stack) -> None:
    account = f"acct_list_{uuid.uuid4().hex[:6]}"
    first = await issue(stack, account)  # an unknown account is opened by its first key
    second = await issue(stack, account, allowed_models=[MODEL])
    revoked = await stack.client.delete(f"/keys/{first['token_id']}")
    assert revoked.status_code == 200
    response = await stack.client.get(f"/accounts/{account}/keys")
    assert response.status_code == 200, response.text
    listing = response.json()
    by_id = {item["token_id"]: item for item in listing}
    assert set(by_id) == {first["token_id"], second["token_id"]}
    assert [item["token_id"] for item in listing] == sorted(by_id)
    for item in listing:
        assert set(item) == {"token_id", "key_last6", "expires_at", "revoked", "allowed_cidrs",
                             "allowed_models", "max_concurrent", "previous_valid_until",
                             "position"}  # fmt: skip
    assert by_id[first["token_id"]]["revoked"] is True
    assert by_id[second["token_id"]] == {
        "token_id": second["token_id"], "key_last6": second["key"][-6:], "expires_at": None,
        "revoked": False, "allowed_cidrs": [], "allowed_models": [MODEL],
        "max_concurrent": None, "previous_valid_until": None, "position": second["position"],
    }  # fmt: skip
    for key in (first["key"], second["key"]):
        assert key[:-6] not in response.text
        assert hashlib.sha256(key.encode()).hexdigest() not in response.text
    keyless = await stack.client.get(f"/accounts/{KEYLESS}/keys")
    assert keyless.status_code == 200 and keyless.json() == []
    assert_error(await stack.client.get("/accounts/acct_never_seen/keys"), 404, "unknown_account")


BAD_ISSUES: Final[list[tuple[Any, str]]] = [
    ({}, "account_id"),
    ({"account_id": ""}, "account_id"),
    ({"account_id": 42}, "account_id"),
    ({"account_id": "a" * 257}, "account_id"),
    ({"account_id": "catalog"}, "subject"),
    ({"account_id": "acct\u0000nul"}, "U+0000"),
    ({"account_id": ACCOUNT, "prefix": "a" * 17}, "prefix"),
    ({"account_id": ACCOUNT, "prefix": "sk!"}, "prefix"),
    ({"account_id": ACCOUNT, "prefix": "sk-\n"}, "prefix"),
    ({"account_id": ACCOUNT, "prefix": None}, "prefix"),
    ({"account_id": ACCOUNT, "expires_at": "2020-01-01T00:00:00Z"}, "future"),
    ({"account_id": ACCOUNT, "expires_at": "tomorrow"}, "expires_at"),
    ({"account_id": ACCOUNT, "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ({"account_id": ACCOUNT, "expires_at": 4102444800}, "expires_at"),
    ({"account_id": ACCOUNT, "expires_at": "9999-12-31T23:59:59-01:00"}, "range"),
    ({"account_id": ACCOUNT, "allowed_cidrs": ["10.0.0.0/33"]}, "allowed_cidrs"),
    ({"account_id": ACCOUNT, "allowed_cidrs": "10.0.0.0/8"}, "allowed_cidrs"),
    ({"account_id": ACCOUNT, "allowed_models": [""]}, "allowed_models"),
    ({"account_id": ACCOUNT, "max_concurrent": 0}, "max_concurrent"),
    ({"account_id": ACCOUNT, "max_concurrent": 2**31}, "max_concurrent"),
    ({"account_id": ACCOUNT, "max_concurrent": "2"}, "max_concurrent"),
    ({"account_id": ACCOUNT, "key": "sk-mine"}, "key"),
    ([{"account_id": ACCOUNT}], "body"),
    ("not an object", "body"),
]


async def test_bad_input_gets_a_4xx_in_the_one_error_shape(stack: Stack) -> None:
    before = (await stack.client.get(f"/accounts/{ACCOUNT}/keys")).json()
    for body, mentions in BAD_ISSUES:
        response = await stack.client.post("/keys", json=body)
        assert_error(response, 422, "invalid_request")
        assert mentions in response.text, (body, response.text)
    raw = {**AUTH, "Content-Type": "application/json"}
    for content in (b"", b"{oops", b'{"account_id": NaN}', b"[" * 10_000 + b"]" * 10_000,
                    b"[" * 100_000 + b"]" * 100_000):  # fmt: skip
        response = await stack.client.post("/keys", content=content, headers=raw)
        assert response.status_code in (413, 422), (content[:20], response.text)
        assert "error" in response.json()
    too_many = await stack.client.post(
        "/keys", json={"account_id": ACCOUNT, "allowed_models": ["m" * 256] * 257}
    )
    assert_error(too_many, 422, "invalid_request")
    assert "allowed_models" in too_many.text
    too_large = await stack.client.post(
        "/keys",
        content=b'{"account_id": "%s", "x": "%s"}' % (ACCOUNT.encode(), b"x" * 2**20),
        headers=raw,
    )
    assert_error(too_large, 413, "request_too_large")
    issued = await issue(stack)
    for body in ({"grace_seconds": -1}, {"grace_seconds": 604801}, {"grace_seconds": "3"},
                 {"grace_seconds": 1.5}, {"grace": 3}, {"prefix": "x" * 17}, [3]):  # fmt: skip
        response = await stack.client.post(f"/keys/{issued['token_id']}/rotate", json=body)
        assert_error(response, 422, "invalid_request")
    # Nothing of the above issued or rotated a key.
    after = (await stack.client.get(f"/accounts/{ACCOUNT}/keys")).json()
    assert len(after) == len(before) + 1
    [item] = [i for i in after if i["token_id"] == issued["token_id"]]
    assert item["key_last6"] == issued["key_last6"] and item["previous_valid_until"] is None
    # The admin token guards every key route.
    async with httpx.AsyncClient(base_url=stack.ledger.url) as anonymous:
        for method, path in (("POST", "/keys"), ("POST", f"/keys/{issued['token_id']}/rotate"),
                             ("DELETE", f"/keys/{issued['token_id']}"),
                             ("GET", f"/accounts/{ACCOUNT}/keys")):  # fmt: skip
            missing = await anonymous.request(method, path, json={"account_id": ACCOUNT})
            wrong = await anonymous.request(
                method, path, json={"account_id": ACCOUNT}, headers={"Authorization": "Bearer x"}
            )
            assert_error(missing, 401, "admin_token_missing")
            assert_error(wrong, 403, "admin_token_invalid")


def cli_env(stack: Stack, ledger_url: str | None = None) -> dict[str, str]:
    env = quota_env(stack.settings)
    env["QUOTA_LEDGER_URL"] = ledger_url or stack.ledger.url
    return env


def run_quota(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `quota key ...` command."""
    return subprocess.run(
        [str(QUOTA), "key", *args], env=cli_env(stack), capture_output=True, text=True, timeout=60
    )


def run_in_process(stack: Stack, *args: str, ledger_url: str | None = None) -> Result:
    """`quota key ...` in this process (no interpreter start-up), against the stack's ledger."""
    env = {k: v for k, v in cli_env(stack, ledger_url).items() if k.startswith("QUOTA_")}
    return CliRunner().invoke(quota_cli.app, ["key", *args], env=env)


async def test_the_cli_issues_rotates_and_revokes(stack: Stack) -> None:
    issued = await asyncio.to_thread(
        run_quota, stack, "issue", ACCOUNT, "--prefix", "cli_", "--max-concurrent", "2"
    )
    assert issued.returncode == 0, issued.stderr
    answer = json.loads(issued.stdout)
    key = stack.saw(answer["key"], "cli_")
    assert key.startswith("cli_") and issued.stdout.count(key) == 1
    assert "shown once" in issued.stderr
    assert_allowed(await decide(stack, key, answer["position"]), answer["token_id"])
    rotated = await asyncio.to_thread(
        run_in_process, stack, "rotate", answer["token_id"], "--grace", "0"
    )
    assert rotated.exit_code == 0, rotated.stderr
    new = json.loads(rotated.stdout)
    stack.saw(new["key"], "sk-")
    assert_invalid(await decide(stack, key, new["position"]))
    assert_allowed(await decide(stack, new["key"], new["position"]), answer["token_id"])
    listed = await asyncio.to_thread(run_in_process, stack, "list", ACCOUNT)
    assert listed.exit_code == 0, listed.stderr
    [item] = [i for i in json.loads(listed.stdout) if i["token_id"] == answer["token_id"]]
    assert item["max_concurrent"] == 2 and new["key"] not in listed.stdout
    revoked = await asyncio.to_thread(run_in_process, stack, "revoke", answer["token_id"])
    assert revoked.exit_code == 0, revoked.stderr
    assert_invalid(await decide(stack, new["key"], json.loads(revoked.stdout)["position"]))
    # A refusal is exit 1 with the ledger's error; no ledger, exit 2.
    unknown = await asyncio.to_thread(run_in_process, stack, "revoke", "tok_nope")
    assert unknown.exit_code == 1 and "unknown_token" in unknown.stderr
    bad = await asyncio.to_thread(run_in_process, stack, "issue", ACCOUNT, "--prefix", "no way")
    assert bad.exit_code == 1 and "422" in bad.stderr
    unreachable = await asyncio.to_thread(
        run_in_process, stack, "list", ACCOUNT, ledger_url="http://127.0.0.1:1"
    )
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.stderr


async def test_a_refused_event_is_409_and_an_unapplied_one_503(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second ledger (in-process, no consumer of its own) on the stack's database: the
    stack's ledger folds what it publishes, and its answers come from the shared tables."""
    taken = await issue(stack)
    monkeypatch.setattr(keys_api, "new_token_id", lambda: taken["token_id"])
    async with running_ledger_without_consumer(stack.settings) as client:
        clash = await client.post("/keys", json={"account_id": ACCOUNT}, headers=AUTH)
    assert_error(clash, 409, "event_rejected")
    assert "already issued" in clash.json()["error"]["message"]
    monkeypatch.undo()
    # Nobody consumes this topic: the event is published but never applied.
    lonely = stack.settings.model_copy(
        update={"topic": f"{stack.settings.topic}-unread", "key_apply_timeout_seconds": 0.5}
    )
    async with running_ledger_without_consumer(lonely) as client:
        started = asyncio.get_running_loop().time()
        timeout = await client.post("/keys", json={"account_id": ACCOUNT}, headers=AUTH)
        waited = asyncio.get_running_loop().time() - started
    assert_error(timeout, 503, "apply_timeout")
    assert timeout.headers["retry-after"] == "1"
    assert 0.5 <= waited < 5
    [detail] = timeout.json()["error"]["details"]
    assert detail["token_id"].startswith("tok_") and "key" not in detail
    listing = (await stack.client.get(f"/accounts/{ACCOUNT}/keys")).json()
    assert detail["token_id"] not in {item["token_id"] for item in listing}


@asynccontextmanager
async def running_ledger_without_consumer(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process ledger that folds nothing itself (another ledger does, or none)."""
    app = create_app(settings, run_consumer=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
            yield client


def pg_dump_binary() -> str | None:
    """The newest /usr/lib/postgresql/*/bin/pg_dump, else one on PATH."""

    def version(path: str) -> int:
        major = Path(path).parts[-3]
        return int(major) if major.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"), key=version)
    return found[-1] if found else shutil.which("pg_dump")


async def test_no_plaintext_key_in_the_database_the_logs_or_the_metrics(stack: Stack) -> None:
    """Last: every key the module has seen (and one of its own) against `pg_dump` of the
    database, every log line of the three processes, and both services' metrics."""
    issued = await issue(stack, prefix="leak_")
    rotated = await rotate(stack, issued["token_id"], grace_seconds=60, prefix="leak_")
    for key in (issued["key"], rotated["key"]):  # through both policies' logs too
        assert_allowed(await decide(stack, key, rotated["position"]), issued["token_id"])
    secrets = list(stack.keys)
    assert len(secrets) >= 2  # its own two; with the whole module, every test's
    texts: dict[str, str] = {}
    for process in (stack.ledger, *stack.policies):
        async with httpx.AsyncClient(base_url=process.url) as client:
            texts[f"/metrics of {process.name}"] = (await client.get("/metrics")).text
    binary = pg_dump_binary()
    if binary is not None:
        dump = await asyncio.to_thread(
            subprocess.run,
            [binary, "--no-owner", "--dbname", stack.settings.database_url],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip
        assert dump.returncode == 0, dump.stderr
        texts["pg_dump"] = dump.stdout
        # The dump is real: it holds the tokens' hashes.
        for key, _ in secrets:
            assert hashlib.sha256(key.encode()).hexdigest() in dump.stdout
    for process in (stack.ledger, *stack.policies):
        texts[f"the log of {process.name}"] = process.log_text()
    assert "POST /keys" in texts["the log of ledger"]  # the access log is on
    assert "/authorize" in texts["the log of policy-0"]
    for key, prefix in secrets:
        secret = key.removeprefix(prefix)[:-6]  # the last six are stored on purpose
        assert len(secret) == 37
        for where, text in texts.items():
            assert secret not in text, f"a plaintext key appears in {where}"
    if binary is None:
        pytest.skip("pg_dump is not installed: the database dump was not checked")
