"""Check 14's counters: sliding-window rate limits per (account_id, model).

The limit is the one `Snapshot.rate_limit_for` finds (the account's limit for the model, else its
`*` limit); the counter is always per (account, request model), so a `*` limit gives every model
its own window. The service calls `hit` only for a decision that passed checks 1-13, and `hit`
checks and, when allowed, records in one step, so only allowed decisions are counted and two
concurrent requests can never both take the last slot.

A request made at `t` holds a slot while `now < t + window`. A denied call returns the whole
seconds (rounded up, at least 1) until enough slots free up for a call to pass, which is at
most one window away.

A limit may change between calls (`quota.account.rate_limit_set`): every call uses the limit it
is given. Entries older than the *current* window are dropped, so shortening a window frees
slots at once and lengthening it counts only what is still recorded (the entries a shorter
window had already dropped are not recovered). Lowering `requests` below what is recorded
denies until enough entries have aged out, and the Retry-After says when that is.

Two backends:

- `InProcessRateLimiter` (the default): a sliding log per key, a deque of `time.monotonic()`
  timestamps. `hit` never awaits, so it is atomic under asyncio (a lock makes it thread-safe
  too). Memory is bounded: a key holds at most its limit's `requests` entries while the limit
  stays (more only if the limit was lowered, until they age out), and keys whose entries have
  all left their window are swept periodically.
- `RedisRateLimiter`: a sorted set per key, updated by one Lua script timed by the Redis
  server's clock (`TIME`), so every policy replica sharing the Redis shares the windows. Keys
  expire one window after their last call. While Redis does not answer (refused, or slower
  than `REDIS_TIMEOUT_SECONDS`), each replica counts in process instead (the limits then hold
  per replica), logs and counts it (`quota_loop_failures_total{loop="redis"}`,
  `quota_loop_healthy{loop="redis"}`), and goes back to Redis at the next call that succeeds.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.store.model import RateLimit
from services.supervise import LoopHealth

DEFAULT_PREFIX: Final = "quota:rl:"
#: Seconds between two sweeps of the in-process limiter's expired keys.
DEFAULT_SWEEP_INTERVAL: Final = 60.0
#: Longest a decision waits on Redis before it counts in process instead.
REDIS_TIMEOUT_SECONDS: Final = 0.5


class RateLimiter(Protocol):
    async def hit(self, account_id: str, model: str, limit: RateLimit) -> int | None:
        """None when allowed (and counted); else Retry-After in whole seconds (>= 1)."""
        ...

    async def close(self) -> None: ...


def _window_seconds(limit: RateLimit) -> int:
    if limit.window_seconds <= 0:
        raise ValueError(f"rate limit window must be positive, got {limit.window_seconds}")
    return limit.window_seconds


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


# --------------------------------------------------------------------------------------------
# In process


class _Log:
    __slots__ = ("stamps", "window")

    def __init__(self, window: float) -> None:
        self.stamps: deque[float] = deque()
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

    async def hit(self, account_id: str, model: str, limit: RateLimit) -> int | None:
        return self.hit_now(account_id, model, limit)

    def hit_now(self, account_id: str, model: str, limit: RateLimit) -> int | None:
        """`hit`, synchronously (it never waits on anything but a short lock)."""
        window = float(_window_seconds(limit))
        key = (account_id, model)
        with self._lock:
            now = self._clock()
            if now - self._last_sweep >= self._sweep_interval:
                self._sweep(now)
            log = self._logs.get(key)
            stamps: deque[float] = log.stamps if log is not None else deque()
            cutoff = now - window
            while stamps and stamps[0] <= cutoff:
                stamps.popleft()
            count = len(stamps)
            if count < limit.requests:
                if log is None:
                    log = self._logs[key] = _Log(window)
                    stamps = log.stamps
                log.window = window
                stamps.append(now)
                return None
            if log is not None:
                if stamps:
                    log.window = window
                else:
                    del self._logs[key]
            # Allowed again once the entry at `count - requests` has left the window
            # (the oldest one, unless the limit was lowered).
            index = count - max(limit.requests, 0)
            wait = stamps[index] + window - now if index < count else window
            return _retry_after(wait)

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

#: KEYS[1]: the counter, a sorted set of unique members scored by server time in microseconds.
#: ARGV[1]: requests per window; ARGV[2]: the window in milliseconds; ARGV[3]: a unique member.
#: Returns 0 when allowed (and recorded), else the whole seconds until a retry may pass (>= 1).
HIT_SCRIPT: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window_ms = ARGV[2]
local window = tonumber(window_ms) * 1000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now - window))
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, string.format('%.0f', now), ARGV[3])
  redis.call('PEXPIRE', key, window_ms)
  return 0
end
local wait = window
local index = count - math.max(limit, 0)
if index < count then
  local entry = redis.call('ZRANGE', key, index, index, 'WITHSCORES')
  if entry[2] then
    wait = tonumber(entry[2]) + window - now
  end
end
if count > 0 then
  redis.call('PEXPIRE', key, window_ms)
end
return math.max(1, math.ceil(wait / 1000000))
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

    async def hit(self, account_id: str, model: str, limit: RateLimit) -> int | None:
        window_ms = _window_seconds(limit) * 1000
        member = f"{self._member_prefix}:{next(self._sequence)}"
        try:
            result = await self._script(
                keys=[redis_key(self._prefix, account_id, model)],
                args=[limit.requests, window_ms, member],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self.health.failed("hit", exc)
            return self._fallback.hit_now(account_id, model, limit)
        self.health.succeeded()
        wait = int(result)
        return None if wait == 0 else max(wait, 1)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def build_rate_limiter(redis_url: str, *, prefix: str = DEFAULT_PREFIX) -> RateLimiter:
    """The limiter for `QUOTA_REDIS_URL`: in process when it is empty, else Redis."""
    if not redis_url:
        return InProcessRateLimiter()
    return RedisRateLimiter.from_url(redis_url, prefix=prefix)
