"""deploy/caddy/Caddyfile in a real Caddy (Debian bookworm's 2.6.2), in front of a real
`quota policy` and a stub upstream (the world, the upstream and the requests: gateways.py and
conftest.py beside this file).

Caddy asks the policy with `forward_auth`, which copies the X-Quota-* headers of a 2xx answer
onto the request and sends any other answer to the client as it is. Caddy runs in the
foreground with its config, its log and the files it keeps (HOME, XDG_CONFIG_HOME,
XDG_DATA_HOME) under the test's tmp_path, on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from services.infra.broker import free_port
from tests.deploy import gateways

CADDYFILE = gateways.ROOT / "deploy" / "caddy" / "Caddyfile"
CADDY_FALLBACK = "/usr/bin/caddy"


def caddy(home: Path, port: int, *, upstream: str, policy: str) -> gateways.Launch:
    """`caddy run` with the rendered Caddyfile, keeping its files (autosave.json, storage it
    does not use here) under `home`; the file must be as `caddy fmt` writes it, or Caddy warns
    at every start that it is not."""
    binary = gateways.debian_binary("caddy", CADDY_FALLBACK)
    config = home / "Caddyfile"
    listen = {"BIND": "127.0.0.1", "PORT": str(port)}
    rendered = gateways.write_config(CADDYFILE, config, upstream=upstream, policy=policy, **listen)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"),
    }
    fmt = subprocess.run([binary, "fmt", str(config)], capture_output=True, text=True, env=env)
    assert (fmt.returncode, fmt.stdout) == (0, rendered), f"caddy fmt changes it:\n{fmt.stderr}"
    args = [binary, "run", "--config", str(config), "--adapter", "caddyfile"]
    return gateways.Launch("caddy", args, log_file=home / "output.log", env=env)


@pytest.mark.timeout(180)
async def test_caddy_forward_auth_passes_allowed_requests_and_the_policys_denials_as_they_are(
    policy_world: gateways.PolicyWorld, upstream: gateways.Upstream, tmp_path: Path
) -> None:
    answers = await gateways.decisions_through(caddy, tmp_path, policy_world, upstream)
    # A denial is the policy's own answer: its JSON body as the policy wrote it and its
    # X-Quota-* headers, but not X-Quota-Error-Body (the body again, for nginx).
    missing = answers["token_missing"]
    assert "Unauthorized – no access token" in missing.text
    assert "x-quota-error-body" not in missing.headers
    limited = answers["rate_limited"].headers
    assert (limited["x-quota-status"], limited["x-ratelimit-limit"]) == ("429", "1")
    # The upstream too gets the peer's address alone in X-Forwarded-For.
    assert {seen.headers["x-forwarded-for"] for seen in upstream.seen} == {"127.0.0.1"}


@pytest.mark.parametrize(
    "policy_status",
    [None, 404, 200],
    ids=["policy-unreachable", "404-not-from-the-policy", "200-not-from-the-policy"],
)
async def test_a_policy_that_does_not_decide_is_a_json_503_and_nothing_reaches_the_upstream(
    policy_status: int | None, upstream: gateways.Upstream, tmp_path: Path
) -> None:
    """Nothing listening at the policy's address, or a web server that is not the policy (its
    answers carry no X-Quota-Status): Caddy fails closed."""
    with ExitStack() as stack:
        if policy_status is None:
            policy = f"127.0.0.1:{free_port()}"
        else:
            policy = stack.enter_context(gateways.running_upstream(policy_status)).address
        await gateways.unavailable_through(caddy, tmp_path, policy, upstream)
