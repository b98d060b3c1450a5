"""Machine facts, CPU accounting from /proc, the printed tables, and the JSON result."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from bench.report import cpu_model, grid, memory_gib, ms, table, usable_cores, write_json

__all__ = ["CpuSample", "cpu_sample", "cpu_usage", "grid", "machine", "ms", "table", "write_json"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine(**facts: Any) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(memory_gib() or 0.0, 1),
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
