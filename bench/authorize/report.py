"""Machine facts, CPU accounting from /proc, the printed tables, and the JSON result."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine(**facts: Any) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(memory_gib(), 1),
        "kernel": platform.release(),
        "driver_python": f"{platform.python_implementation()} {platform.python_version()}",
        **facts,
    }


# --- CPU accounting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Process CPU seconds (user+system) of one pid, and the machine's busy/total jiffies."""

    process_seconds: float
    busy: int
    total: int


def cpu_sample(pid: int) -> CpuSample:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        process = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    except (OSError, IndexError, ValueError):
        process = float("nan")
    try:
        with open("/proc/stat", encoding="utf-8") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values[:8])
    except (OSError, ValueError, IndexError):
        idle, total = 0, 0
    return CpuSample(process, total - idle, total)


def cpu_usage(before: CpuSample, after: CpuSample, seconds: float) -> dict[str, float]:
    """The process's CPU in cores (1.0 = one core busy) and the machine's busy share."""
    total = after.total - before.total
    return {
        "server_cores": round((after.process_seconds - before.process_seconds) / seconds, 3),
        "server_cpu_seconds": round(after.process_seconds - before.process_seconds, 3),
        "machine_busy": round((after.busy - before.busy) / total, 3) if total else 0.0,
    }


# --- printing ----------------------------------------------------------------------------------


def table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    lines = [title] if title else []
    lines.append(rule)
    lines += [f"| {name:<{width}} | {value:<{value_width}} |" for name, value in rows]
    lines.append(rule)
    return "\n".join(lines)


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [
            f"{cell:<{widths[i]}}" if i == 0 else f"{cell:>{widths[i]}}"
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(out) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [title] if title else []
    lines += [rule, line(header), rule, *(line(r) for r in rows), rule]
    return "\n".join(lines)


def ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
