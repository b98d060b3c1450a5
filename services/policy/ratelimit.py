"""Check 14's counters: sliding-window rate limits per (account_id, model).

The limit is the one `Snapshot.rate_limit_for` finds (the account's limit for the model, else its
`*` limit); the counter is always per (account, request model), so a `*` limit gives every model
its own window. The service calls `hit` only for a decision that passed checks 1-13, and `hit`
checks and, when allowed, records in one step, so only allowed decisions are counted and two
concurrent requests can never both take the last slot.

A limit caps two figures per window, either or both (CONTRACT section 9):

- `requests` (when > 0): allowed decisions. A call is limited when it would be one too many.
- `units` (when set): the sum of the allowed decisions' `estimated_cost`. A call is limited when
  the units already counted plus its own cost would exceed `units`; a call without an estimate
  costs 0 units. A call whose cost alone exceeds `units` is never allowed; its Retry-After is a
  whole window.

A limit that caps neither (`requests` <= 0 and no `units`; the ledger drops such limits) allows
nothing. A call is recorded (with its cost) when it is allowed and something counts it: always
under a `requests` cap, else only when its cost is > 0.

A request made at `t` holds its slot and its units while `now < t + window`. A denied call
returns the whole seconds (rounded up, at least 1) until enough entries have left the window for
it to pass (the later of the two figures when both deny it), which is at most one window away.
Finding that time for `units` walks the oldest entries; past `SCAN_LIMIT` of them the answer is
the time the window is empty instead (later, never earlier, than the exact one).

A limit may change between calls (`quota.account.rate_limit_set`): every call uses the limit it
is given. Entries older than the *current* window are dropped, so shortening a window frees
slots at once and lengthening it counts only what is still recorded (the entries a shorter
window had already dropped are not recovered). Lowering `requests` or `units` below what is
recorded denies until enough entries have aged out, and the Retry-After says when that is.
Calls that were not recorded (without a cost, under a units-only limit) do not count toward a
`requests` cap added later.

`hit` returns a `RateLimitHit`: the Retry-After (None when allowed and counted) and the figures
of the forward-auth `X-RateLimit-*` headers. It reports one figure: the one the call was denied
by, or, when allowed (or denied by both), the one closest to being used up (the smaller share
of its cap left; `requests` on a tie). `remaining` is what is left of it after this call;
`reset` is the whole seconds until every call now counted has left the window, when both figures
are back to their full cap (a full window after an allowed, recorded call). The service puts
the headers on the decision it counted (`Decision.limit_headers`).

Two backends:

- `InProcessRateLimiter` (the default): a sliding log per key, `time.monotonic()` timestamps and
  their costs, with the units of the window kept as a running sum. `hit` never awaits, so it is
  atomic under asyncio (a lock makes it thread-safe too). Memory is bounded: a key holds at most
  its limit's `requests` entries (or `units` entries of cost >= 1) while the limit stays (more
  only if the limit was lowered, until they age out), and keys whose entries have all left their
  window are swept periodically.
- `RedisRateLimiter`: a sorted set per key, updated by one Lua script timed by the Redis server's
  clock (`TIME`), so every policy replica sharing the Redis shares the windows. Each member
  carries its cost; under a units cap the window's units are kept as a running total in a second
  key beside it (recounted from the members when it is missing, e.g. when a units cap is added).
  Keys expire one window after their last call. While Redis does not answer (refused, or slower
  than `REDIS_TIMEOUT_SECONDS`), each replica counts in process instead (the limits then hold
  per replica), logs and counts it (`quota_loop_failures_total{loop="redis"}`,
  `quota_loop_healthy{loop="redis"}`), and goes back to Redis at the next call that succeeds.
  Units are summed as Lua numbers (doubles): exact up to 2**53.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.store.model import RateLimit
from services.supervise import LoopHealth

DEFAULT_PREFIX: Final = "quota:rl:"
#: Seconds between two sweeps of the in-process limiter's expired keys.
DEFAULT_SWEEP_INTERVAL: Final = 60.0
#: Longest a decision waits on Redis before it counts in process instead.
REDIS_TIMEOUT_SECONDS: Final = 0.5
#: At most this many of the oldest entries are walked to find when enough units free up.
SCAN_LIMIT: Final = 1024


@dataclass(frozen=True, slots=True)
class RateLimitHit:
    """What `hit` decided, and the figure it reports (see the module doc)."""

    #: None when allowed (and counted); else the whole seconds (>= 1) until a retry may pass.
    retry_after: int | None
    #: Which cap `limit` and `remaining` are of.
    kind: Literal["requests", "units"]
    limit: int
    remaining: int
    #: Whole seconds until every call now counted has left the window (0: none is counted).
    reset: int

    @property
    def limited(self) -> bool:
        return self.retry_after is not None

    @property
    def headers(self) -> dict[str, str]:
        """`X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class RateLimiter(Protocol):
    async def hit(
        self, account_id: str, model: str, limit: RateLimit, cost: int = 0
    ) -> RateLimitHit:
        """Check `limit` for one call costing `cost` units and, when allowed, count it."""
        ...

    async def close(self) -> None: ...


def _window_seconds(limit: RateLimit) -> int:
    if limit.window_seconds <= 0:
        raise ValueError(f"rate limit window must be positive, got {limit.window_seconds}")
    return limit.window_seconds


def _caps(limit: RateLimit) -> tuple[int | None, int | None]:
    """(requests cap, units cap), None where the limit sets none. Without a units cap the
    requests cap stands even at 0 (a limit of nothing allows nothing)."""
    units = None if limit.units is None else max(limit.units, 0)
    requests = max(limit.requests, 0) if limit.requests > 0 or units is None else None
    return requests, units


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _whole_seconds(seconds: float) -> int:
    # Rounded to microseconds first: `(now + window) - now` may come out a hair over `window`.
    return max(0, math.ceil(round(seconds, 6)))


def _result(
    requests: int | None,
    units: int | None,
    count: int,
    used: int,
    retry_after: int | None,
    over: tuple[bool, bool],
    reset: int,
) -> RateLimitHit:
    """The figure to report: the one that denied, else the one closest to being used up."""
    figures: list[tuple[Literal["requests", "units"], int, int, bool]] = []
    if requests is not None:
        figures.append(("requests", requests, max(0, requests - count), over[0]))
    if units is not None:
        figures.append(("units", units, max(0, units - used), over[1]))
    if retry_after is not None and any(figure[3] for figure in figures):
        figures = [figure for figure in figures if figure[3]]
    kind, cap, left, _ = figures[0]
    if len(figures) == 2:
        # The smaller share left: left / cap < left2 / cap2, in integers (a cap of 0 is used up).
        _, cap2, left2, _ = figures[1]
        if cap2 == 0 or (cap > 0 and left2 * cap < left * cap2):
            kind, cap, left, _ = figures[1]
    return RateLimitHit(retry_after, kind, cap, left, reset)


# --------------------------------------------------------------------------------------------
# In process


class _Log:
    __slots__ = ("costs", "stamps", "used", "window")

    def __init__(self, window: float) -> None:
        self.stamps: deque[float] = deque()
        #: Each entry's cost, beside its stamp, and their sum.
        self.costs: deque[int] = deque()
        self.used = 0
        #: The window the last call used; the sweep drops the log once it has fully elapsed.
        self.window = window


class InProcessRateLimiter:
    """Sliding logs in this process's memory: for a single policy replica, or tests."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._logs: dict[tuple[str, str], _Log] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def __len__(self) -> int:
        """The number of keys held (for tests and metrics)."""
        return len(self._logs)

    async def hit(
        self, account_id: str, model: str, limit: RateLimit, cost: int = 0
    ) -> RateLimitHit:
        return self.hit_now(account_id, model, limit, cost)

    def hit_now(self, account_id: str, model: str, limit: RateLimit, cost: int = 0) -> RateLimitHit:
        """`hit`, synchronously (it never waits on anything but a short lock)."""
        window = float(_window_seconds(limit))
        requests, units = _caps(limit)
        cost = max(cost, 0)
        key = (account_id, model)
        with self._lock:
            now = self._clock()
            if now - self._last_sweep >= self._sweep_interval:
                self._sweep(now)
            log = self._logs.get(key)
            if log is None:
                log = _Log(window)
            log.window = window
            stamps, costs = log.stamps, log.costs
            cutoff = now - window
            while stamps and stamps[0] <= cutoff:
                stamps.popleft()
                log.used -= costs.popleft()
            count = len(stamps)
            over_requests = requests is not None and count >= requests
            over_units = units is not None and log.used + cost > units
            if not over_requests and not over_units:
                retry_after = None
                if requests is not None or cost > 0:
                    stamps.append(now)
                    costs.append(cost)
                    log.used += cost
                    count += 1
            else:
                wait = 0.0
                if over_requests:
                    assert requests is not None
                    # Allowed again once the entry at `count - requests` has left the window
                    # (the oldest one, unless the limit was lowered).
                    index = count - requests
                    wait = stamps[index] + window - now if index < count else window
                if over_units:
                    assert units is not None
                    wait = max(wait, self._units_wait(log, units, cost, now))
                retry_after = _retry_after(wait)
            if stamps:
                self._logs[key] = log
            else:
                self._logs.pop(key, None)
            reset = _whole_seconds(stamps[-1] + window - now) if stamps else 0
            over = (over_requests, over_units)
            return _result(requests, units, count, log.used, retry_after, over, reset)

    @staticmethod
    def _units_wait(log: _Log, units: int, cost: int, now: float) -> float:
        """Seconds until enough of the oldest entries have left for `cost` to fit in `units`."""
        if cost > units:
            return log.window  # it never fits; a whole window
        need = log.used + cost - units
        freed = 0
        for scanned, (stamp, spent) in enumerate(zip(log.stamps, log.costs, strict=True)):
            if scanned >= SCAN_LIMIT:
                break
            freed += spent
            if freed >= need:
                return stamp + log.window - now
        return log.stamps[-1] + log.window - now if log.stamps else log.window

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        dead = [
            key
            for key, log in self._logs.items()
            if not log.stamps or log.stamps[-1] + log.window <= now
        ]
        for key in dead:
            del self._logs[key]

    async def close(self) -> None:
        with self._lock:
            self._logs.clear()


# --------------------------------------------------------------------------------------------
# Redis

#: KEYS[1]: the counter, a sorted set of unique members `<id>=<cost>` scored by server time in
#: microseconds. KEYS[2]: the units in the window, kept while the limit has a units cap.
#: ARGV[1]: the requests cap (-1: none); ARGV[2]: the window in milliseconds; ARGV[3]: a unique
#: id; ARGV[4]: the units cap (-1: none); ARGV[5]: this call's cost; ARGV[6]: SCAN_LIMIT.
#: Returns {retry_after (0: allowed and recorded), count, units used (a string), reset seconds,
#: over requests (0/1), over units (0/1)}, counts as they stand after the call.
HIT_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local key, units_key = KEYS[1], KEYS[2]
local requests = tonumber(ARGV[1])
local window_ms = ARGV[2]
local window = tonumber(window_ms) * 1000
local units = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local scan_limit = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cutoff = string.format('%.0f', now - window)

local function cost_of(member)
  return tonumber(string.match(member, '=(%d+)$') or '0')
end

local gone = {}
if units >= 0 then
  gone = redis.call('ZRANGEBYSCORE', key, '-inf', cutoff)
end
redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
local count = redis.call('ZCARD', key)
local used = 0
if units >= 0 and count > 0 then
  local stored = redis.call('GET', units_key)
  if stored then
    used = tonumber(stored)
    for _, member in ipairs(gone) do used = used - cost_of(member) end
  else
    for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do used = used + cost_of(member) end
  end
end

local over_requests = requests >= 0 and count >= requests
local over_units = units >= 0 and used + cost > units
local wait = 0
if not over_requests and not over_units then
  if requests >= 0 or cost > 0 then
    redis.call('ZADD', key, string.format('%.0f', now), ARGV[3] .. '=' .. ARGV[5])
    count = count + 1
    used = used + cost
  end
else
  if over_requests then
    wait = window
    local index = count - requests
    if index < count then
      local entry = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
      if entry[2] then wait = tonumber(entry[2]) + window - now end
    end
  end
  if over_units then
    local units_wait = window
    if cost <= units and count > 0 then
      local need = used + cost - units
      local freed, start, found = 0, 0, false
      while not found and start < count and start < scan_limit do
        local batch = redis.call('ZRANGE', key, start, start + 127, 'WITHSCORES')
        for i = 1, #batch, 2 do
          freed = freed + cost_of(batch[i])
          if freed >= need then
            units_wait = tonumber(batch[i + 1]) + window - now
            found = true
            break
          end
        end
        start = start + 128
      end
      if not found then
        local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        units_wait = tonumber(newest[2]) + window - now
      end
    end
    wait = math.max(wait, units_wait)
  end
  wait = math.max(1, math.ceil(wait / 1000000))
end

local reset = 0
if count > 0 then
  redis.call('PEXPIRE', key, window_ms)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  reset = math.max(0, math.ceil((tonumber(newest[2]) + window - now) / 1000000))
end
if units >= 0 and count > 0 then
  redis.call('SET', units_key, string.format('%.0f', used), 'PX', window_ms)
else
  redis.call('DEL', units_key)
end
return {wait, count, string.format('%.0f', used), reset,
        over_requests and 1 or 0, over_units and 1 or 0}
"""


def redis_key(prefix: str, account_id: str, model: str) -> bytes:
    """`prefix` + `<bytes in account_id>:<account_id>:<model>`: unambiguous for any strings."""
    account = account_id.encode("utf-8", "surrogatepass")
    return b"%s%d:%s:%s" % (
        prefix.encode("utf-8", "surrogatepass"),
        len(account),
        account,
        model.encode("utf-8", "surrogatepass"),
    )


def redis_units_key(prefix: str, account_id: str, model: str) -> bytes:
    """The running units total beside `redis_key`: `prefix` + `u` + the same rest (a counter's
    key has a digit there, so the two never meet)."""
    prefix_bytes = prefix.encode("utf-8", "surrogatepass")
    return prefix_bytes + b"u" + redis_key(prefix, account_id, model)[len(prefix_bytes) :]


class RedisRateLimiter:
    """Sliding windows in Redis, shared by every replica that uses the same Redis and prefix."""

    def __init__(
        self, client: Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = True
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client
        # EVALSHA, loading the script (SCRIPT LOAD) on first use and again after a Redis restart.
        self._script = client.register_script(HIT_SCRIPT)
        self._member_prefix = os.urandom(8).hex()
        self._sequence = itertools.count()
        #: Counts while Redis does not answer; `health` says since when and why.
        self._fallback = InProcessRateLimiter()
        self.health = LoopHealth("redis")

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisRateLimiter:
        """A limiter with a client of its own, for a `redis://` (or `rediss://`, `unix://`) URL."""
        client = Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )
        return cls(client, prefix=prefix, owns_client=True)

    @property
    def prefix(self) -> str:
        return self._prefix

    async def hit(
        self, account_id: str, model: str, limit: RateLimit, cost: int = 0
    ) -> RateLimitHit:
        window_ms = _window_seconds(limit) * 1000
        requests, units = _caps(limit)
        cost = max(cost, 0)
        member = f"{self._member_prefix}:{next(self._sequence)}"
        args = (
            -1 if requests is None else requests,
            window_ms,
            member,
            -1 if units is None else units,
            cost,
            SCAN_LIMIT,
        )
        try:
            reply = await self._script(
                keys=[
                    redis_key(self._prefix, account_id, model),
                    redis_units_key(self._prefix, account_id, model),
                ],
                args=list(args),
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self.health.failed("hit", exc)
            return self._fallback.hit_now(account_id, model, limit, cost)
        self.health.succeeded()
        wait, count, used, reset, over_requests, over_units = reply
        retry_after = None if int(wait) == 0 else max(int(wait), 1)
        over = (bool(int(over_requests)), bool(int(over_units)))
        return _result(requests, units, int(count), int(used), retry_after, over, int(reset))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def build_rate_limiter(redis_url: str, *, prefix: str = DEFAULT_PREFIX) -> RateLimiter:
    """The limiter for `QUOTA_REDIS_URL`: in process when it is empty, else Redis."""
    if not redis_url:
        return InProcessRateLimiter()
    return RedisRateLimiter.from_url(redis_url, prefix=prefix)
