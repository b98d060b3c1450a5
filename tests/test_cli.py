"""The `quota` command: dev stack, secret checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.dev import DEMO_KEY
from services.infra.broker import free_port
from services.settings import Settings
from tests.builders import wait_for
from tests.processes import QuotaProcesses, quota_env

QUOTA = str(Path(sys.executable).parent / "quota")


def test_ledger_refuses_to_start_without_an_admin_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    result = subprocess.run(
        [QUOTA, "ledger"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "QUOTA_ADMIN_TOKEN" in result.stderr + result.stdout


def test_policy_refuses_to_start_without_a_service_token(db_settings: Settings) -> None:
    """Admin token set, no service token, no opt-out: a non-zero exit naming the variable."""
    strict = db_settings.model_copy(update={"allow_anonymous_gateways": False, "service_token": ""})
    result = subprocess.run(
        [QUOTA, "policy", "--port", str(free_port())],
        env=quota_env(strict),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    output = result.stderr + result.stdout
    assert "QUOTA_SERVICE_TOKEN" in output
    assert "QUOTA_ALLOW_ANONYMOUS_GATEWAYS" in output
    assert "QUOTA_ADMIN_TOKEN" not in output  # that one is set: only the problem is named


def test_a_policy_without_any_secret_names_only_the_service_token() -> None:
    """The policy never uses the ledger's admin token, so it does not ask for one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    result = subprocess.run(
        [QUOTA, "policy"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "QUOTA_SERVICE_TOKEN" in result.stderr
    assert "QUOTA_ADMIN_TOKEN" not in result.stderr


@pytest.mark.timeout(120)
async def test_policy_starts_without_a_service_token_when_the_operator_opts_out(
    db_settings: Settings, quota_processes: QuotaProcesses
) -> None:
    anonymous = quota_processes.start(
        "policy", "policy", service_token="", allow_anonymous_gateways=True
    )
    await quota_processes.wait_ready(anonymous)
    async with httpx.AsyncClient(base_url=anonymous.url) as client:
        answer = await client.post("/authorize", json={"model": "gpt-4o"})
    assert answer.status_code == 401
    assert answer.json()["error"]["reason"] == "token_missing"  # the client's key, not ours


@pytest.mark.timeout(120)
async def test_dev_migrates_seeds_and_serves(settings: Settings, tmp_path: Path) -> None:
    port, policy_port = free_port(), free_port()
    env = {
        **os.environ,
        "QUOTA_DATABASE_URL": settings.database_url,
        "QUOTA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "QUOTA_TOPIC": settings.topic,
        "QUOTA_DEV_DIR": str(tmp_path),
    }
    env.pop("QUOTA_ADMIN_TOKEN", None)
    log = tmp_path / "dev.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [QUOTA, "dev", "--ledger-port", str(port), "--policy-port", str(policy_port)],
            env=env,
            stdout=output,
            stderr=output,
        )
    try:
        await wait_for(
            lambda: _printed(log, "quota dev is running"), timeout=90, what="quota dev banner"
        )
        text = log.read_text()
        assert "sk-quota-demo" in text
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            account = await client.get(
                "/accounts/acct_demo", headers={"Authorization": "Bearer dev-admin-token"}
            )
            assert account.status_code == 200
            assert account.json()["balance"] == 1_000_000
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{policy_port}") as client:

            async def policy_caught_up() -> bool:
                ready = await client.get("/readyz")
                return ready.status_code == 200 and ready.json()["position"] >= 5

            await wait_for(policy_caught_up, timeout=30, what="policy snapshot")
            decision = await client.post(
                "/authorize",
                json={"authorization": f"Bearer {DEMO_KEY}", "model": "gpt-4o-mini",
                      "route": "/v1/chat/completions", "client_ip": "127.0.0.1"},
            )  # fmt: skip
        assert decision.status_code == 200, decision.text
        assert decision.json()["account_id"] == "acct_demo"
        assert "sk-quota-demo" not in text.split("quota dev is running")[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


async def _printed(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")
