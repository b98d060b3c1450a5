"""What every benchmark prints: the machine, tables, rates, percentiles, and the JSON result."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine(postgres_version: str, postgres_kind: str, broker: str, **facts: Any) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(memory_gib() or 0.0, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": f"{postgres_version} ({postgres_kind})",
        "broker": broker,
        "kernel": platform.release(),
        **facts,
    }


def table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    lines = [title] if title else []
    lines.append(rule)
    for name, value in rows:
        lines.append(f"| {name:<{width}} | {value:<{value_width}} |")
    lines.append(rule)
    return "\n".join(lines)


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(f"{cell:<{widths[i]}}" if i == 0 else f"{cell:>{widths[i]}}")
        return "| " + " | ".join(out) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [title] if title else []
    lines += [rule, line(header), rule, *(line(r) for r in rows), rule]
    return "\n".join(lines)


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


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
