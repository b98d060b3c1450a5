"""deploy/nginx/nginx.conf in a real nginx, in front of a real `quota policy` and a stub upstream.

Events go through the real ledger (HTTP -> Kafka -> PostgreSQL); the policy process decides
from its pushed snapshot; nginx asks it with `auth_request` and answers denials itself with the
policy's real status and JSON body. nginx runs as a foreground process with its prefix, pid,
logs and temp files under the test's tmp_path, on free loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.infra.broker import free_port
from services.settings import Settings
from tests.builders import cloud_event, recharge, token_issued, wait_for, wait_for_position
from tests.conftest import ADMIN_TOKEN
from tests.ledger.ledger_app import running_ledger
from tests.processes import QuotaProcesses

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
NGINX_FALLBACK = "/usr/sbin/nginx"
SERVICE_TOKEN = "test-service-token"

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEYS = {
    "user": "sk-nginx-user-0000000000000001",
    "admin": "sk-nginx-admin-000000000000002",
    "susp": "sk-nginx-susp-0000000000000003",
    "rl": "sk-nginx-rl-000000000000000004",
    "ip": "sk-nginx-ip-000000000000000005",
}


# --------------------------------------------------------------------------- nginx


def nginx_binary() -> str:
    """Debian puts nginx in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which("nginx") or NGINX_FALLBACK
    if not Path(found).exists():
        pytest.fail(
            "nginx is not installed (looked on PATH and at /usr/sbin/nginx). "
            "`python3 bootstrap.py test` installs Debian's `nginx` package when run as root; "
            "otherwise install it: apt-get install --no-install-recommends nginx"
        )
    return found


def render_config(*, listen: str, upstream: str, policy: str, service_token: str) -> str:
    """The deployed file with its placeholders filled in, as README.md tells operators to."""
    text = NGINX_CONF.read_text(encoding="utf-8")
    for name, value in {
        "LISTEN": listen,
        "UPSTREAM": upstream,
        "POLICY": policy,
        "SERVICE_TOKEN": service_token,
    }.items():
        text = text.replace("{{" + name + "}}", value)
    assert "{{" not in text, "nginx.conf has a placeholder the test does not fill in"
    return text


@dataclass(slots=True)
class Nginx:
    url: str
    prefix: Path
    process: subprocess.Popen[bytes]

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace")[-10_000:] if path.exists() else "(no error.log)"


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@asynccontextmanager
async def running_nginx(tmp_path: Path, *, upstream: str, policy: str) -> AsyncIterator[Nginx]:
    """nginx in the foreground with the rendered config, until the block ends."""
    binary = nginx_binary()
    prefix = tmp_path / "nginx"
    for folder in ("logs", "temp"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        render_config(
            listen=f"127.0.0.1:{port}",
            upstream=upstream,
            policy=policy,
            service_token=SERVICE_TOKEN,
        ),
        encoding="utf-8",
    )
    # As root the workers would run as `nobody`, who cannot enter tmp_path.
    globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    args = [binary, "-p", str(prefix), "-c", str(conf), "-e", "logs/error.log", "-g", globals_]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"nginx -t rejected the config:\n{checked.stderr}"
    log = (prefix / "logs" / "stderr.log").open("wb")
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    nginx = Nginx(f"http://127.0.0.1:{port}", prefix, process)
    try:

        async def up() -> bool:
            assert process.poll() is None, f"nginx exited early:\n{nginx.error_log()}"
            return await _accepts(port)

        await wait_for(up, timeout=20, what="nginx listening")
        yield nginx
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


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
def running_upstream() -> Iterator[Upstream]:
    """A stand-in for the LLM API: 200 with a JSON echo of what reached it."""
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
            self.send_response(200)
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


CHAT = "/v1/chat/completions"
BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


def assert_denied(response: httpx.Response, status: int, expected: dict[str, Any]) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected
    assert response.headers["x-quota-reason"] == expected["error"]["reason"]


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(180)
async def test_nginx_auth_request_passes_allowed_requests_and_answers_denials_with_real_status(
    settings: Settings,
    pool: asyncpg.Pool,
    quota_processes: QuotaProcesses,
    tmp_path: Path,
) -> None:
    events = world()
    position = len(events)
    policy = quota_processes.start("policy", "policy", service_token=SERVICE_TOKEN)
    with running_upstream() as upstream:
        async with running_ledger(settings) as (_, ledger):
            response = await ledger.post("/events", json=events, headers=ADMIN)
            assert response.status_code == 202, response.text
            await wait_for_position(pool, position)
            await quota_processes.wait_ready(policy, position)
            async with (
                running_nginx(
                    tmp_path, upstream=upstream.address, policy=f"127.0.0.1:{policy.port}"
                ) as nginx,
                httpx.AsyncClient(base_url=nginx.url, trust_env=False, timeout=10) as client,
            ):
                try:
                    await _check_through(client, upstream, position)
                except AssertionError:
                    print(nginx.error_log())
                    raise


async def _check_through(client: httpx.AsyncClient, upstream: Upstream, position: int) -> None:
    # Allowed: the request, body included, reaches the upstream with the policy's account,
    # not the one the client claims.
    allowed = await client.post(
        CHAT, content=BODY, headers=headers(KEYS["user"], **{"X-Quota-Account": "acct_evil"})
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() == {"x_quota_account": "acct_user", "path": CHAT}
    reached = upstream.seen[-1]
    assert reached.body == BODY
    assert reached.headers["x-quota-token"] == "tok_user"
    assert reached.headers["x-quota-position"] == str(position)
    assert "x-quota-service-token" not in reached.headers

    # The model from an Azure-style path when the client sends no X-Quota-Model.
    azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
    by_path = await client.post(azure, content=BODY, headers=headers(KEYS["admin"], model=None))
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["x_quota_account"] == "acct_admin"
    reached_before_denials = len(upstream.seen)

    # No key: 401 with the table's message exactly, en dash included. The body travelled in a
    # header as ASCII-escaped JSON; parsed, it is the same text.
    missing = await client.post(CHAT, content=BODY, headers=headers(None))
    expected = denial(
        "token_missing",
        "Unauthorized – no access token supplied; please log in and include a valid token.",
        "authentication_error",
        position,
    )
    assert_denied(missing, 401, expected)
    assert "\\u2013" in missing.text
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
    limited = await client.post(CHAT, content=BODY, headers=headers(KEYS["rl"]))
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


async def test_an_unreachable_policy_is_a_json_503_and_nothing_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    with running_upstream() as upstream:
        async with (
            running_nginx(tmp_path, upstream=upstream.address, policy=closed) as nginx,
            httpx.AsyncClient(base_url=nginx.url, trust_env=False, timeout=10) as client,
        ):
            response = await client.post(CHAT, content=BODY, headers=headers(KEYS["user"]))
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["reason"] == "quota_unavailable"
    assert upstream.seen == []
