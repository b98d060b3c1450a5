"""wrk: finding (or installing) it, a Lua script per scenario, running it, parsing `--latency`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RATE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON_2XX: Final = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKET: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_DONE: Final = re.compile(r"^BENCH_JSON (.*)$", re.M)

#: Prints wrk's own numbers (µs) as one JSON line after the run; its absence means the script
#: did not load (wrk then sends plain GETs, which must never be reported as the scenario).
DONE_HOOK: Final = r"""
function done(summary, latency, requests)
  io.write(string.format('BENCH_JSON {"requests": %d, "duration_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, latency:percentile(99.9)))
end
"""
#: Round-robin over pre-formatted requests (one Lua state per wrk thread, each thread starting
#: at a random body).
ROUND_ROBIN: Final = r"""
local requests = {}
local next_index = 0
function init(args)
  for i, body in ipairs(bodies) do requests[i] = wrk.format(nil, nil, nil, body) end
  next_index = math.random(#requests) - 1
end
function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
"""


class WrkMissing(RuntimeError):
    pass


def find_wrk() -> str:
    """The wrk binary; tries `apt-get install -y wrk` (after `apt-get update`) when missing."""
    apt = shutil.which("apt-get")
    if shutil.which("wrk") is None and apt is not None:
        for step in (["update"], ["install", "-y", "wrk"]):
            print(f"[bench.authorize] apt-get {' '.join(step)}", flush=True)
            subprocess.run([apt, *step], capture_output=True, check=False, timeout=600)
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing("wrk is not installed: apt-get update && apt-get install -y wrk")
    return found


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False, timeout=10)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk (version unknown)"


def _lua(text: str) -> str:
    return "[==[" + text + "]==]"


def write_script(path: Path, bodies: Sequence[bytes], headers: dict[str, str]) -> Path:
    """A wrk Lua script POSTing `bodies` round-robin (one: always that one), and the `done`
    hook. No `response` hook (wrk would parse every response in Lua): statuses are checked
    with wrk's non-2xx count and the server's counters."""
    lines = ["wrk.method = 'POST'", f"wrk.body = {_lua(bodies[0].decode())}"]
    # (The spaces matter: `[[` would open a Lua long string.)
    lines += [f"wrk.headers[ {_lua(name)} ] = {_lua(value)}" for name, value in headers.items()]
    if len(bodies) > 1:
        items = ",\n  ".join(_lua(b.decode()) for b in bodies)
        lines += [f"bodies = {{\n  {items}\n}}", ROUND_ROBIN]
    lines.append(DONE_HOOK)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(slots=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    #: From `--latency`'s distribution (p50, p75, p90, p99) and the done hook (p99.9), in ms.
    latency_ms: dict[str, float]
    non_2xx_3xx: int
    socket_errors: dict[str, int]


def parse(output: str) -> WrkResult:
    """Parse wrk's `--latency` report and the `done` hook's JSON line."""
    rate, done = _RATE.search(output), _DONE.search(output)
    latency = {f"p{m[1]}": float(m[2]) * _UNIT_MS[m[3]] for m in _PERCENTILE.finditer(output)}
    if rate is None or done is None or "p99" not in latency:
        raise ValueError(f"cannot parse wrk output (did the script run?):\n{output}")
    extra = json.loads(done.group(1))
    latency["p99.9"] = extra["p999_us"] / 1000
    non_2xx, socket = _NON_2XX.search(output), _SOCKET.search(output)
    counts = map(int, socket.groups()) if socket else (0,) * 4
    errors = dict(zip(("connect", "read", "write", "timeout"), counts, strict=True))
    return WrkResult(
        requests=extra["requests"],
        seconds=extra["duration_us"] / 1e6,
        requests_per_second=float(rate.group(1)),
        latency_ms=latency,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors,
    )


async def run(
    binary: str, url: str, script: Path, *, seconds: int, connections: int, threads: int
) -> WrkResult:
    """Run wrk as a child process without blocking this event loop (the in-process ledger's
    heartbeat keeps the policy fresh meanwhile)."""
    command = [binary, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout=5s",
               "--latency", "-s", str(script), url]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    text = stdout.decode(errors="replace")
    if process.returncode != 0 or stderr.strip():
        raise RuntimeError(f"wrk exited {process.returncode}: {stderr.decode(errors='replace')}")
    return parse(text)
