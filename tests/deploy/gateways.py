"""What the gateway tests share (test_nginx.py, test_caddy.py): the world of accounts and keys
behind a real `quota policy`, a stub upstream, starting a gateway process, and the requests
every gateway in front of the policy must answer the same way.

Events go through the real ledger (HTTP -> Kafka -> PostgreSQL); the policy process decides
from its pushed snapshot. Gateways run as foreground processes with their files under the
test's tmp_path, on free loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from services.infra.broker import free_port
from tests.builders import cloud_event, recharge, token_issued, wait_for
from tests.conftest import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parents[2]
SERVICE_TOKEN = "test-service-token"

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = {
    "user": "sk-gateway-user-00000000000001",
    "admin": "sk-gateway-admin-0000000000002",
    "susp": "sk-gateway-susp-00000000000003",
    "rl": "sk-gateway-rl-0000000000000004",
    "ip": "sk-gateway-ip-0000000000000005",
}
CHAT = "/v1/chat/completions"
BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'

#: What a gateway answers when the policy could not decide (down, timed out, or not the policy).
UNAVAILABLE = {
    "allowed": False,
    "error": {
        "message": "The quota service could not decide; try again later.",
        "type": "service_unavailable",
        "code": None,
        "reason": "quota_unavailable",
    },
}


# --------------------------------------------------------------------------- gateway processes


def debian_binary(package: str, fallback: str) -> str:
    """The binary of Debian's `package` (named alike): on PATH, else at `fallback` (Debian puts
    nginx in /usr/sbin, which is not on every user's PATH)."""
    found = shutil.which(package) or fallback
    if not Path(found).exists():
        pytest.fail(
            f"{package} is not installed (looked on PATH and at {fallback}). "
            f"`python3 bootstrap.py test` installs Debian's `{package}` package when run as "
            f"root; otherwise install it: apt-get install --no-install-recommends {package}"
        )
    return found


def render(template: Path, **values: str) -> str:
    """A deployed file with its `{{NAME}}` placeholders filled in, as its README tells
    operators to."""
    text = template.read_text(encoding="utf-8")
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    assert "{{" not in text, f"{template.name} has a placeholder the test does not fill in"
    return text


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def write_config(template: Path, path: Path, *, upstream: str, policy: str, **listen: str) -> str:
    """`template` rendered into `path`, for a gateway listening as `listen` says, in front of
    `upstream` and `policy` (host:port each) and sending SERVICE_TOKEN to the policy."""
    text = render(template, UPSTREAM=upstream, POLICY=policy, SERVICE_TOKEN=SERVICE_TOKEN, **listen)
    path.write_text(text, encoding="utf-8")
    return text


@dataclass(slots=True)
class Launch:
    """How to run a configured gateway in the foreground: its command, environment (None:
    this one's) and the log to show when a test fails."""

    name: str
    args: list[str]
    log_file: Path
    env: dict[str, str] | None = None


class Configure(Protocol):
    """Writes a gateway's config and files into `folder` (made already) for a gateway on
    `port` in front of `upstream` and `policy` (host:port each): the `nginx` of test_nginx.py,
    the `caddy` of test_caddy.py."""

    def __call__(self, folder: Path, port: int, /, *, upstream: str, policy: str) -> Launch: ...


@dataclass(slots=True)
class Gateway:
    """A gateway process listening at `url`."""

    url: str
    process: subprocess.Popen[bytes]
    launch: Launch

    def log(self) -> str:
        """The end of its log, for a failure."""
        path = self.launch.log_file
        return path.read_text(errors="replace")[-10_000:] if path.exists() else f"(no {path})"


@asynccontextmanager
async def running_gateway(
    configure: Configure, tmp_path: Path, *, upstream: str, policy: str
) -> AsyncIterator[Gateway]:
    """The gateway `configure` describes, on a free port with its files under tmp_path, from
    when it listens until the block ends (its stdout and stderr in output.log)."""
    folder = tmp_path / "gateway"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    launch = configure(folder, port, upstream=upstream, policy=policy)
    with (folder / "output.log").open("wb") as sink:
        process = subprocess.Popen(
            launch.args,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=launch.env,
        )
        gateway = Gateway(f"http://127.0.0.1:{port}", process, launch)
        try:

            async def up() -> bool:
                assert process.poll() is None, f"{launch.name} exited early:\n{gateway.log()}"
                return await _accepts(port)

            await wait_for(up, timeout=20, what=f"{launch.name} listening")
            yield gateway
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@asynccontextmanager
async def client_of(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway; the gateway's log is printed when an assertion in the block
    fails."""
    async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=10) as client:
        try:
            yield client
        except AssertionError:
            print(gateway.log())
            raise


# --------------------------------------------------------------------------- upstream


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Upstream:
    address: str
    seen: list[Seen] = field(default_factory=list)


@contextmanager
def running_upstream(status: int = 200) -> Iterator[Upstream]:
    """A stand-in for the LLM API: `status` with a JSON echo of what reached it."""
    seen: list[Seen] = []

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            seen.append(Seen(self.command, self.path, headers, body))
            answer = json.dumps(
                {"x_quota_account": headers.get("x-quota-account"), "path": self.path}
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="upstream", daemon=True)
    thread.start()
    try:
        yield Upstream(f"127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the world


def catalog(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return cloud_event(type_, "catalog", data)


def world() -> list[dict[str, Any]]:
    events = [
        catalog("quota.model.registered", {"model": "gpt-4o", "kind": "chat"}),
        catalog("quota.model.registered", {"model": "busy", "kind": "chat"}),
        catalog("quota.channel.registered",
                {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        catalog("quota.channel.registered",
                {"channel_id": 2, "models": ["busy"], "groups": ["default"]}),
        catalog("quota.channel.provider_rate_limited",
                {"channel_id": 2, "until": "2099-01-01T00:00:00Z"}),
        catalog("quota.route.policy_set", {"route": "/v1/admin/*", "min_role": "admin"}),
        cloud_event("quota.account.opened", "acct_admin", {"role": "admin"}),
        cloud_event("quota.account.suspended", "acct_susp", {"reason": "fraud"}),
        cloud_event("quota.account.rate_limit_set", "acct_rl",
                    {"model": "gpt-4o", "requests": 1, "window_seconds": 3600}),
    ]  # fmt: skip
    for name in KEYS:
        events.append(recharge(f"acct_{name}", 1000))
    for name, key in KEYS.items():
        extra: dict[str, Any] = {"allowed_cidrs": ["10.0.0.0/8"]} if name == "ip" else {}
        events.append(token_issued(f"acct_{name}", f"tok_{name}", key, **extra))
    return events


@dataclass(slots=True)
class PolicyWorld:
    """A `quota policy` (asking it needs SERVICE_TOKEN) that has seen `world()`, up to
    `position` (the `policy_world` fixture of conftest.py)."""

    address: str
    position: int


# --------------------------------------------------------------------------- requests


def headers(key: str | None, model: str | None = "gpt-4o", **more: str) -> dict[str, str]:
    sent = {"Content-Type": "application/json", **more}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if model is not None:
        sent["X-Quota-Model"] = model
    return sent


def denial(reason: str, message: str, type_: str, position: int) -> dict[str, Any]:
    return {
        "allowed": False,
        "error": {"message": message, "type": type_, "code": None, "reason": reason},
        "position": position,
    }


def assert_denied(response: httpx.Response, status: int, expected: dict[str, Any]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected
    assert response.headers["x-quota-reason"] == expected["error"]["reason"]


async def check_decisions(
    client: httpx.AsyncClient, upstream: Upstream, position: int
) -> dict[str, httpx.Response]:
    """What every gateway in front of the policy must do: pass allowed requests to the upstream
    with the policy's X-Quota-* headers, and answer each denial with the policy's real status,
    JSON body and Retry-After. The answers, by name, for checks of one gateway's own."""
    answers: dict[str, httpx.Response] = {}

    # Allowed: the request, body included, reaches the upstream with the policy's headers, not
    # the ones the client sends; the service token stays between the gateway and the policy.
    spoofed = {
        "X-Quota-Account": "acct_evil",
        "X-Quota-Reservation": "res_evil",
        "X-Quota-Service-Token": "from-the-client",
    }
    allowed = answers["allowed"] = await client.post(
        CHAT, content=BODY, headers=headers(KEYS["user"], **spoofed)
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() == {"x_quota_account": "acct_user", "path": CHAT}
    reached = upstream.seen[-1]
    assert reached.body == BODY
    assert reached.headers["x-quota-token"] == "tok_user"
    assert reached.headers["x-quota-position"] == str(position)
    assert "x-quota-reservation" not in reached.headers
    assert "x-quota-service-token" not in reached.headers

    # The model from an Azure-style path when the client sends no X-Quota-Model.
    azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
    by_path = await client.post(azure, content=BODY, headers=headers(KEYS["admin"], model=None))
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["x_quota_account"] == "acct_admin"
    reached_before_denials = len(upstream.seen)

    # No key: 401 with the table's message exactly, en dash included.
    missing = answers["token_missing"] = await client.post(
        CHAT, content=BODY, headers=headers(None)
    )
    expected = denial(
        "token_missing",
        "Unauthorized – no access token supplied; please log in and include a valid token.",
        "authentication_error",
        position,
    )
    assert_denied(missing, 401, expected)
    assert "retry-after" not in missing.headers

    suspended = await client.post(CHAT, content=BODY, headers=headers(KEYS["susp"]))
    assert_denied(
        suspended,
        403,
        denial("account_suspended", "Account suspended.", "permission_error", position),
    )

    unknown_model = await client.post(CHAT, content=BODY, headers=headers(KEYS["user"], "nope"))
    assert_denied(
        unknown_model,
        503,
        denial(
            "model_unavailable",
            "Incorrect model ID. Please request to view the model page or you do not have "
            "permission to use this model",
            "service_unavailable",
            position,
        ),
    )

    provider_limited = await client.post(CHAT, content=BODY, headers=headers(KEYS["user"], "busy"))
    assert provider_limited.status_code == 503, provider_limited.text
    assert provider_limited.json()["error"]["reason"] == "provider_rate_limited"
    assert int(provider_limited.headers["retry-after"]) >= 1

    bad_pin = await client.post(
        CHAT, content=BODY, headers=headers(KEYS["admin"], **{"X-Quota-Channel": "abc"})
    )
    assert_denied(
        bad_pin,
        400,
        denial(
            "invalid_channel_id",
            "Bad Request – invalid channel ID.",
            "invalid_request_error",
            position,
        ),
    )

    # One request per hour: the first passes, the second is 429 with Retry-After.
    first = await client.post(CHAT, content=BODY, headers=headers(KEYS["rl"]))
    assert first.status_code == 200, first.text
    reached_before_denials += 1
    limited = answers["rate_limited"] = await client.post(
        CHAT, content=BODY, headers=headers(KEYS["rl"])
    )
    assert_denied(
        limited,
        429,
        denial(
            "rate_limited",
            "The gpt-4o model Too many requests; please try again later.",
            "rate_limit_error",
            position,
        ),
    )
    assert 1 <= int(limited.headers["retry-after"]) <= 3600

    # The client cannot choose the address or the route the policy sees.
    spoofed_ip = await client.post(
        CHAT, content=BODY, headers=headers(KEYS["ip"], **{"X-Forwarded-For": "10.1.2.3"})
    )
    assert spoofed_ip.status_code == 403, spoofed_ip.text
    assert spoofed_ip.json()["error"]["reason"] == "ip_not_allowed"
    spoofed_route = await client.post(
        "/v1/admin/users",
        content=BODY,
        headers=headers(KEYS["user"], **{"X-Forwarded-Uri": CHAT, "X-Original-URI": CHAT}),
    )
    assert spoofed_route.status_code == 403, spoofed_route.text
    assert spoofed_route.json()["error"]["reason"] == "insufficient_permissions"

    # No denial reached the upstream.
    assert len(upstream.seen) == reached_before_denials

    # Last, as a hold moves the ledger on: an estimated cost holds a reservation, named
    # upstream; a retry with the same request id gets the same one back.
    for _ in range(2):
        held = await client.post(
            CHAT,
            content=BODY,
            headers=headers(
                KEYS["user"], **{"X-Quota-Estimated-Cost": "5", "X-Request-Id": "req-gateway-1"}
            ),
        )
        assert held.status_code == 200, held.text
    assert len(upstream.seen) == reached_before_denials + 2
    first_hold, retry = (seen.headers.get("x-quota-reservation") for seen in upstream.seen[-2:])
    assert first_hold and retry == first_hold
    return answers


async def decisions_through(
    configure: Configure, tmp_path: Path, policy_world: PolicyWorld, upstream: Upstream
) -> dict[str, httpx.Response]:
    """`check_decisions` through the gateway `configure` describes, in front of the world's
    policy."""
    address = policy_world.address
    async with (
        running_gateway(configure, tmp_path, upstream=upstream.address, policy=address) as gate,
        client_of(gate) as client,
    ):
        return await check_decisions(client, upstream, policy_world.position)


async def unavailable_through(
    configure: Configure, tmp_path: Path, policy: str, upstream: Upstream
) -> None:
    """`check_unavailable` through the gateway `configure` describes, in front of `policy`, a
    host:port where no policy answers."""
    async with (
        running_gateway(configure, tmp_path, upstream=upstream.address, policy=policy) as gate,
        client_of(gate) as client,
    ):
        await check_unavailable(client, upstream)


async def check_unavailable(client: httpx.AsyncClient, upstream: Upstream) -> None:
    """The policy could not decide: a JSON 503 with Retry-After: 1, and nothing reaches the
    upstream (fail closed)."""
    response = await client.post(CHAT, content=BODY, headers=headers(KEYS["user"]))
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json() == UNAVAILABLE
    assert upstream.seen == []
