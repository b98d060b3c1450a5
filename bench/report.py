"""What every benchmark prints: the machine, tables, rates, percentiles, and the JSON result."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg

    from bench.infra import Infra


def proc_field(path: str, key: str) -> str | None:
    """The value after `key:` in a /proc file (e.g. /proc/meminfo), or None."""
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def proc_kib(path: str, key: str) -> int | None:
    """A /proc size in KiB (e.g. `VmRSS` of /proc/<pid>/status), or None."""
    value = proc_field(path, key)
    return int(value.split()[0]) if value else None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process and its threads (/proc/<pid>/stat), or None."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def cpu_of(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """`cpu_seconds` of each named group's processes (those that can be read)."""
    return {name: {pid: s for pid in pids if (s := cpu_seconds(pid)) is not None}
            for name, pids in groups.items()}  # fmt: skip


def cpu_shares(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], seconds: float
) -> dict[str, float | None]:
    """Each group's CPU between two `cpu_of` as a share of one core (a process new since
    `before` counts from 0); None where none of it could be read."""
    return {name: sum(s - before.get(name, {}).get(pid, 0.0) for pid, s in now.items()) / seconds
            if now else None for name, now in after.items()}  # fmt: skip


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine(postgres_version: str, postgres_kind: str, broker: str, **facts: Any) -> dict[str, Any]:
    cpu = proc_field("/proc/cpuinfo", "model name")
    return {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round((proc_kib("/proc/meminfo", "MemTotal") or 0) / 1024 / 1024, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": f"{postgres_version} ({postgres_kind})",
        "broker": broker,
        "kernel": platform.release(),
        **facts,
    }


async def header(
    bench: str, conn: asyncpg.Connection | asyncpg.Pool, infra: Infra, **facts: Any
) -> dict[str, Any]:
    """A result's first fields: the benchmark, when, and the machine (PostgreSQL's version)."""
    version = str(await conn.fetchval("SHOW server_version"))
    return {
        "benchmark": bench,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(version, infra.postgres_kind, infra.broker, **facts),
    }


def machine_row(m: dict[str, Any]) -> tuple[str, str]:
    return "machine", f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"


def machine_table(m: dict[str, Any]) -> str:
    return table([(k, str(v)) for k, v in m.items()], "machine")


def table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """Name | value rows, both left-aligned."""
    width, value_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    rule = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    lines = [rule, *(f"| {name:<{width}} | {value:<{value_width}} |" for name, value in rows), rule]
    return "\n".join([title, *lines] if title else lines)


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """Columns under a header: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=False))
        return "| " + " | ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in pairs) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [rule, line(header), rule, *(line(r) for r in rows), rule]
    return "\n".join([title, *lines] if title else lines)


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" if value < 1 else f"{value:.2f}"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }
