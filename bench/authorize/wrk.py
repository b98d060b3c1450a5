"""wrk: finding (or installing) it, a Lua script per scenario, running it, parsing `--latency`."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

INSTALL_HINT: Final = "apt-get update && apt-get install -y wrk"

_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION: Final = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")
_PERCENTILE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", re.M)
_REQUESTS: Final = re.compile(r"^\s*(\d+) requests in ([\d.]+(?:us|ms|s|m|h)),", re.M)
_RATE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON_2XX: Final = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKET: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_DONE: Final = re.compile(r"^BENCH_JSON (.*)$", re.M)


#: Prints wrk's own numbers (µs) as one JSON line; cheap: it runs once, after the run.
DONE_HOOK: Final = r"""
function done(summary, latency, requests)
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors_status": %d, ' ..
    '"errors_timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, ' ..
    '"max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


class WrkMissing(RuntimeError):
    pass


def _install() -> str | None:
    """Try `apt-get install -y wrk` (we may be root); the error text when it fails."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available"
    error = "apt-get failed"
    # First with the package lists as they are, then after `apt-get update`.
    for steps in ([["install", "-y", "wrk"]], [["update"], ["install", "-y", "wrk"]]):
        for step in steps:
            print(f"[bench.authorize] apt-get {' '.join(step)}", flush=True)
            done = subprocess.run(
                [apt, *step], capture_output=True, text=True, check=False, timeout=600
            )
            if done.returncode != 0:
                error = (done.stderr or done.stdout).strip()[-600:] or error
                break
        if shutil.which("wrk"):
            return None
    return error


def find_wrk(install: bool = True) -> str:
    """The wrk binary; installs the Debian package when missing (and allowed)."""
    found = shutil.which("wrk")
    if found:
        return found
    if install:
        error = _install()
        found = shutil.which("wrk")
        if found:
            return found
        raise WrkMissing(
            f"wrk is not installed and `apt-get install -y wrk` failed: {error}\n"
            f"Install it by hand ({INSTALL_HINT}) and run the benchmark again."
        )
    raise WrkMissing(f"wrk is not installed: {INSTALL_HINT}")


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False, timeout=10)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk (version unknown)"


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


#: Round-robin over pre-formatted requests (one Lua state per wrk thread, so each thread
#: keeps its own counter, each starting at a different body).
ROUND_ROBIN: Final = r"""
local requests = {}
local next_index = 0
function init(args)
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format(nil, nil, nil, body)
  end
  next_index = math.random(#requests) - 1
end
function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end
"""


def write_script(
    path: Path,
    method: str,
    body: bytes | None,
    headers: dict[str, str],
    bodies: Sequence[bytes] = (),
) -> Path:
    """A wrk Lua script sending one fixed request (or, given `bodies`, one of them per request,
    round-robin), and a `done` hook that prints JSON.

    There is no `response` hook (it would make wrk parse every response in Lua and slow
    the client down); statuses are checked with wrk's Non-2xx count and the server's counters.
    """
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {_lua_string(body.decode())}")
    for name, value in headers.items():
        # (The spaces matter: `[[` would open a Lua long string.)
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    if bodies:
        items = ",\n  ".join(_lua_string(b.decode()) for b in bodies)
        lines.append(f"bodies = {{\n  {items}\n}}")
        lines.append(ROUND_ROBIN)
    lines.append(DONE_HOOK)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def to_ms(text: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


@dataclass(slots=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    #: From `--latency`'s "Latency Distribution" (50, 75, 90, 99), in milliseconds.
    latency_ms: dict[str, float]
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    #: From the script's `done` hook (wrk's histogram, µs precision): p99.9, max, mean.
    extra: dict[str, Any] = field(default_factory=dict)
    output: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("output")
        return data


def parse(output: str) -> WrkResult:
    """Parse wrk's `--latency` report (and the `done` hook's JSON line)."""
    requests = _REQUESTS.search(output)
    rate = _RATE.search(output)
    if requests is None or rate is None:
        raise ValueError(f"cannot parse wrk output:\n{output}")
    latency = {f"p{m.group(1)}": to_ms(m.group(2)) for m in _PERCENTILE.finditer(output)}
    if "p50" not in latency or "p99" not in latency:
        raise ValueError(f"no latency distribution in wrk output (--latency?):\n{output}")
    non_2xx = _NON_2XX.search(output)
    socket = _SOCKET.search(output)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if socket is not None:
        errors = dict(zip(errors, (int(g) for g in socket.groups()), strict=True))
    done = _DONE.search(output)
    if done is None:
        # wrk runs a plain GET when its script fails to load; never report that as the run.
        raise ValueError(f"no BENCH_JSON line: the wrk script did not run:\n{output}")
    extra: dict[str, Any] = json.loads(done.group(1))
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=to_ms(requests.group(2)) / 1000,
        requests_per_second=float(rate.group(1)),
        latency_ms=latency,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors,
        extra=extra,
        output=output,
    )


async def run(
    binary: str,
    url: str,
    script: Path,
    *,
    seconds: int,
    connections: int,
    threads: int,
    timeout_seconds: float = 5.0,
) -> WrkResult:
    """Run wrk as a child process without blocking this event loop (the in-process ledger's
    heartbeat keeps the policy fresh meanwhile)."""
    command = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",  # wrk takes whole seconds only
        f"--timeout={timeout_seconds:g}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    text = stdout.decode(errors="replace")
    if process.returncode != 0 or stderr.strip():
        raise RuntimeError(
            f"wrk exited {process.returncode}: {stderr.decode(errors='replace')}\n{text}"
        )
    return parse(text)
