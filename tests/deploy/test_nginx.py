"""deploy/nginx/nginx.conf in a real nginx, in front of a real `quota policy` and a stub upstream
(the world, the upstream and the requests: gateways.py and conftest.py beside this file).

nginx asks the policy with `auth_request` and answers denials itself with the policy's real
status and JSON body. nginx runs as a foreground process with its prefix, pid, logs and temp
files under the test's tmp_path, on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.infra.broker import free_port
from tests.deploy import gateways

NGINX_CONF = gateways.ROOT / "deploy" / "nginx" / "nginx.conf"
NGINX_FALLBACK = "/usr/sbin/nginx"

# --------------------------------------------------------------------------- nginx


def nginx(prefix: Path, port: int, *, upstream: str, policy: str) -> gateways.Launch:
    """nginx with the rendered config, its prefix (pid, logs, temp files) in `prefix`; checked
    with `nginx -t` first."""
    binary = gateways.debian_binary("nginx", NGINX_FALLBACK)
    for folder in ("logs", "temp"):
        (prefix / folder).mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    listen = f"127.0.0.1:{port}"
    gateways.write_config(NGINX_CONF, conf, upstream=upstream, policy=policy, LISTEN=listen)
    # As root the workers would run as `nobody`, who cannot enter tmp_path.
    globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    args = [binary, "-p", str(prefix), "-c", str(conf), "-e", "logs/error.log", "-g", globals_]
    checked = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"nginx -t rejected the config:\n{checked.stderr}"
    return gateways.Launch("nginx", args, log_file=prefix / "logs" / "error.log")


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(180)
async def test_nginx_auth_request_passes_allowed_requests_and_answers_denials_with_real_status(
    policy_world: gateways.PolicyWorld, upstream: gateways.Upstream, tmp_path: Path
) -> None:
    answers = await gateways.decisions_through(nginx, tmp_path, policy_world, upstream)
    # nginx answers a denial with the policy's X-Quota-Error-Body: the JSON body, ASCII-escaped
    # to fit a header; parsed, it is the same text.
    assert "\\u2013" in answers["token_missing"].text


async def test_an_unreachable_policy_is_a_json_503_and_nothing_reaches_the_upstream(
    upstream: gateways.Upstream, tmp_path: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    await gateways.unavailable_through(nginx, tmp_path, closed, upstream)
