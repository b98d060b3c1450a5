"""Real `quota ledger` / `quota policy` processes on free loopback ports, for tests and benchmarks.

>>> fleet = QuotaProcesses(settings, Path(".work/logs"))
>>> ledger = fleet.start("ledger", "ledger")
>>> await fleet.wait_ready(ledger)              # GET /readyz answers 200
>>> fleet.close()                               # SIGTERM, then SIGKILL after 10 s

Each process is configured by `QUOTA_*` environment variables made from a `Settings` (as in
production) and logs to `<logs>/<name>.log` (appended).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from services.infra.broker import free_port
from services.settings import Settings

#: The `quota` command of the running interpreter's environment.
QUOTA = Path(sys.executable).parent / "quota"


class ProcessExited(RuntimeError):
    """A process that was not killed on purpose has exited."""


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
    """Starts `quota <command>` processes and stops them all in `close()`."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.processes: list[QuotaProcess] = []

    def start(
        self, command: str, name: str, *, program: Sequence[str] = (), **overrides: Any
    ) -> QuotaProcess:
        """`quota <command>` as `name`, with `overrides` of the settings; `program` replaces
        `quota <command>` with another command line that takes `--host` and `--port`."""
        settings = self.settings.model_copy(update=overrides)
        port = free_port()
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            [*(program or (str(QUOTA), command)), "--host", "127.0.0.1", "--port", str(port)],
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
        """Raise `ProcessExited`, with its log, if a process we did not kill has exited."""
        for item in self.processes:
            if not item.killed and not item.alive():
                raise ProcessExited(
                    f"{item.command} {item.name} exited with {item.process.returncode}:\n"
                    + item.log_text()[-20_000:]
                )

    async def wait_ready(self, item: QuotaProcess, position: int = 0, timeout: float = 60) -> None:
        """Until `/readyz` answers 200 with a position of at least `position`."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=item.url, timeout=2) as client:
            while True:
                self.check_alive()
                try:
                    response = await client.get("/readyz")
                    if response.status_code == 200 and response.json()["position"] >= position:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{item.name} not ready at position {position} after {timeout:g} s"
                    )
                await asyncio.sleep(0.02)

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
