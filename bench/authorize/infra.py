"""The infrastructure of `bench.authorize` (shared with the other benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bench.infra import Infra, say
from bench.infra import infrastructure as _infrastructure

__all__ = ["Infra", "infrastructure", "step"]


def step(message: str) -> None:
    say("bench.authorize", message)


@contextlib.contextmanager
def infrastructure(
    workdir: Path, database_url: str | None, kafka_bootstrap: str | None
) -> Iterator[Infra]:
    with _infrastructure(workdir, database_url, kafka_bootstrap, bench="bench.authorize") as it:
        yield it
