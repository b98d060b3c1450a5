"""Real `quota ledger` / `quota policy` processes for tests, on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from services.infra.broker import free_port
from services.settings import Settings
from tests.builders import wait_for

QUOTA = Path(sys.executable).parent / "quota"


def quota_env(settings: Settings) -> dict[str, str]:
    """The environment that configures a `quota` process like `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    for name, value in settings.model_dump().items():
        env[f"QUOTA_{name.upper()}"] = str(value)
    return env


@dataclass(slots=True)
class QuotaProcess:
    name: str
    command: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    killed: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def sigkill(self) -> None:
        self.killed = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class QuotaProcesses:
    """Starts `quota <command>` processes for one test and stops them after it."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.processes: list[QuotaProcess] = []

    def start(self, command: str, name: str, **overrides: Any) -> QuotaProcess:
        settings = self.settings.model_copy(update=overrides)
        port = free_port()
        log_path = self.tmp_path / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            [str(QUOTA), command, "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=quota_env(settings),
            start_new_session=True,
        )
        started = QuotaProcess(name, command, port, log_path, process, log)
        self.processes.append(started)
        return started

    def check_alive(self) -> None:
        """Fail at once, with its log, if a process we did not kill has exited."""
        for item in self.processes:
            if not item.killed and not item.alive():
                raise AssertionError(
                    f"{item.command} {item.name} exited with {item.process.returncode}:\n"
                    + item.log_text()[-20_000:]
                )

    async def wait_ready(self, item: QuotaProcess, position: int = 0) -> None:
        """Until `/readyz` answers 200 with a position of at least `position`."""

        async def ready() -> bool:
            self.check_alive()
            try:
                async with httpx.AsyncClient(base_url=item.url, timeout=2) as client:
                    response = await client.get("/readyz")
            except httpx.TransportError:
                return False
            return response.status_code == 200 and response.json()["position"] >= position

        await wait_for(ready, timeout=60, what=f"{item.name} ready at position {position}")

    def close(self) -> None:
        for item in self.processes:
            if item.alive():
                item.process.terminate()
        for item in self.processes:
            try:
                item.process.wait(10)
            except subprocess.TimeoutExpired:
                item.process.kill()
                item.process.wait(10)
            item.log.close()

    def print_logs(self) -> None:
        for item in self.processes:
            print(f"===== {item.command} {item.name} (exit {item.process.returncode}) =====")
            print(item.log_text()[-50_000:])


@pytest.fixture
def quota_processes(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[QuotaProcesses]:
    failed_before = request.session.testsfailed
    fleet = QuotaProcesses(settings, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()
        if request.session.testsfailed > failed_before:
            fleet.print_logs()
