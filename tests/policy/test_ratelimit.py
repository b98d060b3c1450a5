"""Check 14's limiters: the same behaviour from the in-process and the Redis backend."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.policy.ratelimit import (
    DEFAULT_PREFIX,
    InProcessRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    build_rate_limiter,
    redis_key,
)
from services.store.model import RateLimit

REDIS_URL_ENV = "QUOTA_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Factory = Callable[[], RateLimiter]


def limit(requests: int, window_seconds: int, model: str = "*") -> RateLimit:
    return RateLimit("acct", model, requests, window_seconds, position=1)


def account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


async def _redis_url() -> str:
    """The test Redis; skip the Redis cases when the default one is not running."""
    url = os.environ.get(REDIS_URL_ENV, "")
    client = Redis.from_url(url or DEFAULT_REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        if url:
            raise
        pytest.skip(f"no Redis at {DEFAULT_REDIS_URL} ({exc}); set {REDIS_URL_ENV}")
    finally:
        await client.aclose()
    return url or DEFAULT_REDIS_URL


@pytest.fixture
async def redis_url() -> str:
    return await _redis_url()


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Makes limiters that share one store: one process's memory, or one Redis key prefix."""
    made: list[RateLimiter] = []
    if request.param == "memory":
        shared = InProcessRateLimiter()
        made.append(shared)
        yield lambda: shared
        await shared.close()
        return

    url = await _redis_url()
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"

    def factory() -> RateLimiter:
        limiter = RedisRateLimiter.from_url(url, prefix=prefix)
        made.append(limiter)
        return limiter

    try:
        yield factory
    finally:
        for limiter in made:
            await limiter.close()
        admin = Redis.from_url(url)
        try:
            keys = [key async for key in admin.scan_iter(match=prefix + "*")]
            if keys:
                await admin.delete(*keys)
        finally:
            await admin.aclose()


async def eventually_allowed(
    hit: Callable[[], Awaitable[int | None]], timeout: float = 5.0
) -> float:
    """Poll `hit` until it is allowed; the seconds it took."""
    start = time.monotonic()
    while await hit() is not None:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"still limited after {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_exactly_n_allowed_then_retry_after(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(5, 60)
    for _ in range(5):
        assert await limiter.hit(acct, "gpt-4o", rule) is None
    for _ in range(3):
        wait = await limiter.hit(acct, "gpt-4o", rule)
        assert isinstance(wait, int)
        assert 0 < wait <= 60


async def test_denied_calls_do_not_count(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    for _ in range(2):
        assert await limiter.hit(acct, "m", limit(2, 60)) is None
    for _ in range(10):
        assert await limiter.hit(acct, "m", limit(2, 60)) is not None
    # Raising the limit shows what was recorded: the two allowed calls, none of the ten denied.
    results = [await limiter.hit(acct, "m", limit(4, 60)) for _ in range(4)]
    assert results[:2] == [None, None]
    assert all(r is not None for r in results[2:])


async def test_denied_calls_do_not_hold_the_window_open(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(1, 1)
    assert await limiter.hit(acct, "m", rule) is None
    # The poll is a stream of denied calls; had they counted, the window would never free up.
    await eventually_allowed(lambda: limiter.hit(acct, "m", rule))


async def test_keys_are_independent_per_account_and_model(make_limiter: Factory) -> None:
    limiter, a, b, rule = make_limiter(), account(), account(), limit(1, 60)
    assert await limiter.hit(a, "m1", rule) is None
    assert await limiter.hit(a, "m1", rule) is not None
    assert await limiter.hit(a, "m2", rule) is None
    assert await limiter.hit(b, "m1", rule) is None
    assert await limiter.hit(b, "m2", rule) is None
    assert await limiter.hit(b, "m2", rule) is not None


async def test_keys_are_unambiguous_for_arbitrary_strings(make_limiter: Factory) -> None:
    limiter, base, rule = make_limiter(), account(), limit(1, 60)
    pairs = [
        (f"{base}:x", "y"),
        (base, "x:y"),
        (f"{base}:x:y", ""),
        (f"{base}*", "m"),
        (f"{base}", "*m"),
        (f"{base}{{tag}}", "模型 ✓"),
        (f"{base} ", "m\n\x00"),
    ]
    for acct, model in pairs:
        assert await limiter.hit(acct, model, rule) is None, (acct, model)
    for acct, model in pairs:
        assert await limiter.hit(acct, model, rule) is not None, (acct, model)


async def test_allowed_again_after_the_window_slides(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(2, 1)
    assert await limiter.hit(acct, "m", rule) is None
    assert await limiter.hit(acct, "m", rule) is None
    assert await limiter.hit(acct, "m", rule) == 1
    elapsed = await eventually_allowed(lambda: limiter.hit(acct, "m", rule))
    assert elapsed < 2.5


async def test_concurrent_hits_allow_exactly_the_limit(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(10, 60)
    results = await asyncio.gather(*(limiter.hit(acct, "m", rule) for _ in range(50)))
    assert results.count(None) == 10
    assert all(r is not None and 1 <= r <= 60 for r in results if r is not None)
    assert len(results) == 50


async def test_shortening_the_window_frees_old_entries(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    assert await limiter.hit(acct, "m", limit(1, 60)) is None
    wait = await limiter.hit(acct, "m", limit(1, 1))
    assert wait == 1  # measured against the current, one-second window
    await eventually_allowed(lambda: limiter.hit(acct, "m", limit(1, 1)))


async def test_lowering_the_limit_denies_until_entries_age_out(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    for _ in range(3):
        assert await limiter.hit(acct, "m", limit(3, 60)) is None
    wait = await limiter.hit(acct, "m", limit(1, 60))
    assert wait is not None and 0 < wait <= 60
    # A limit of zero (never set by the ledger, which drops such limits) denies everything.
    wait = await limiter.hit(account(), "m", limit(0, 30))
    assert wait == 30


async def test_two_redis_replicas_share_one_window(redis_url: str) -> None:
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"
    a = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    b = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    n, acct, rule = 7, account(), limit(7, 60)
    try:
        results = [await (a if i % 2 else b).hit(acct, "m", rule) for i in range(3 * n)]
        assert results.count(None) == n
        assert results[:n] == [None] * n
        # And concurrently, from both at once, on a fresh key.
        other = account()
        both = await asyncio.gather(
            *((a if i % 2 else b).hit(other, "m", rule) for i in range(3 * n))
        )
        assert both.count(None) == n
    finally:
        await a.close()
        await b.close()
        admin = Redis.from_url(redis_url)
        try:
            keys = [key async for key in admin.scan_iter(match=prefix + "*")]
            if keys:
                await admin.delete(*keys)
        finally:
            await admin.aclose()


async def test_redis_keys_expire_with_the_window(redis_url: str) -> None:
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        acct = account()
        assert await limiter.hit(acct, "m", limit(2, 30)) is None
        ttl = await admin.pttl(redis_key(prefix, acct, "m"))
        assert 0 < ttl <= 30_000
    finally:
        await limiter.close()
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


def test_redis_keys_are_namespaced_and_length_prefixed() -> None:
    assert redis_key(DEFAULT_PREFIX, "a:b", "c") == b"quota:rl:3:a:b:c"
    assert redis_key(DEFAULT_PREFIX, "a", "b:c") == b"quota:rl:1:a:b:c"
    assert redis_key("p:", "é", "m") == "p:2:é:m".encode()


async def test_in_process_prunes_expired_keys() -> None:
    now = [1000.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0], sweep_interval=10.0)
    for i in range(100):
        assert await limiter.hit(f"acct-{i}", "m", limit(3, 5)) is None
    assert len(limiter) == 100
    now[0] += 11.0
    assert await limiter.hit("fresh", "m", limit(3, 5)) is None
    assert len(limiter) == 1
    # A denied call on an empty counter holds nothing.
    assert await limiter.hit("zero", "m", limit(0, 5)) == 5
    assert len(limiter) == 1


async def test_in_process_uses_the_clock() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    rule = limit(2, 10)
    assert await limiter.hit("a", "m", rule) is None
    now[0] = 4.2
    assert await limiter.hit("a", "m", rule) is None
    assert await limiter.hit("a", "m", rule) == 6  # 5.8 s until the first call leaves
    now[0] = 9.999
    assert await limiter.hit("a", "m", rule) == 1
    now[0] = 10.0  # the first call's slot is free exactly one window later
    assert await limiter.hit("a", "m", rule) is None
    assert await limiter.hit("a", "m", rule) == 5  # 14.2 - 10.0, rounded up


async def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        await InProcessRateLimiter().hit("a", "m", limit(1, 0))


async def test_build_rate_limiter() -> None:
    memory = build_rate_limiter("")
    assert isinstance(memory, InProcessRateLimiter)
    await memory.close()
    remote = build_rate_limiter(DEFAULT_REDIS_URL)  # connects lazily
    assert isinstance(remote, RedisRateLimiter)
    assert remote.prefix == DEFAULT_PREFIX
    await remote.close()
    with pytest.raises(ValueError):
        build_rate_limiter("http://127.0.0.1:6379")


class _Forwarder:
    """A TCP forwarder to Redis that can be taken down and brought back on the same port, so
    the limiter meets refused and reset connections for real."""

    def __init__(self, target: str) -> None:
        parts = target.split("//", 1)[-1].split("/", 1)[0]
        host, _, port = parts.rpartition(":")
        self.target = (host or "127.0.0.1", int(port or 6379))
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_redis_going_away_falls_back_to_counting_in_process(redis_url: str) -> None:
    forwarder = _Forwarder(redis_url)
    await forwarder.start()
    limiter = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{forwarder.port}/0", prefix=f"quota:test:rl:{uuid.uuid4().hex}:"
    )
    acct, rule = account(), limit(3, 60)
    try:
        assert await limiter.hit(acct, "m", rule) is None
        assert limiter.health.ok
        await forwarder.stop()
        # Redis is away: each call is still answered, counted in this process.
        during = [await limiter.hit(acct, "m", rule) for _ in range(5)]
        assert during[:3] == [None, None, None]
        assert all(wait is not None and wait >= 1 for wait in during[3:])
        assert not limiter.health.ok and limiter.health.failures >= 5
        await forwarder.start()  # back on the same port
        fresh = account()
        assert await limiter.hit(fresh, "m", rule) is None
        assert limiter.health.ok
    finally:
        await limiter.close()
        if forwarder.server is not None and forwarder.server.is_serving():
            await forwarder.stop()
