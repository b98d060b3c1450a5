"""Check 14's limiters: the same behaviour from the in-process and the Redis backend, for
requests and units (CONTRACT section 9)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.contract.cloudevent import decode_http_object
from services.policy.ratelimit import (
    DEFAULT_PREFIX,
    InProcessRateLimiter,
    RateLimiter,
    RateLimitHit,
    RedisRateLimiter,
    build_rate_limiter,
    redis_key,
    redis_units_key,
)
from services.policy.snapshot import Snapshot
from services.store.fold import fold
from services.store.model import RateLimit, State
from tests.builders import cloud_event

REDIS_URL_ENV = "QUOTA_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Factory = Callable[[], RateLimiter]


def limit(
    requests: int, window_seconds: int, model: str = "*", *, units: int | None = None
) -> RateLimit:
    return RateLimit("acct", model, requests, window_seconds, position=1, units=units)


async def retry(
    limiter: RateLimiter, account_id: str, model: str, rule: RateLimit, cost: int = 0
) -> int | None:
    """The Retry-After of one hit: None when it was allowed (and counted)."""
    return (await limiter.hit(account_id, model, rule, cost)).retry_after


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
        assert await retry(limiter, acct, "gpt-4o", rule) is None
    for _ in range(3):
        wait = await retry(limiter, acct, "gpt-4o", rule)
        assert isinstance(wait, int)
        assert 0 < wait <= 60


async def test_denied_calls_do_not_count(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    for _ in range(2):
        assert await retry(limiter, acct, "m", limit(2, 60)) is None
    for _ in range(10):
        assert await retry(limiter, acct, "m", limit(2, 60)) is not None
    # Raising the limit shows what was recorded: the two allowed calls, none of the ten denied.
    results = [await retry(limiter, acct, "m", limit(4, 60)) for _ in range(4)]
    assert results[:2] == [None, None]
    assert all(r is not None for r in results[2:])


async def test_denied_calls_do_not_hold_the_window_open(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(1, 1)
    assert await retry(limiter, acct, "m", rule) is None
    # The poll is a stream of denied calls; had they counted, the window would never free up.
    await eventually_allowed(lambda: retry(limiter, acct, "m", rule))


async def test_keys_are_independent_per_account_and_model(make_limiter: Factory) -> None:
    limiter, a, b, rule = make_limiter(), account(), account(), limit(1, 60)
    assert await retry(limiter, a, "m1", rule) is None
    assert await retry(limiter, a, "m1", rule) is not None
    assert await retry(limiter, a, "m2", rule) is None
    assert await retry(limiter, b, "m1", rule) is None
    assert await retry(limiter, b, "m2", rule) is None
    assert await retry(limiter, b, "m2", rule) is not None


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
        assert await retry(limiter, acct, model, rule) is None, (acct, model)
    for acct, model in pairs:
        assert await retry(limiter, acct, model, rule) is not None, (acct, model)


async def test_allowed_again_after_the_window_slides(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(2, 1)
    assert await retry(limiter, acct, "m", rule) is None
    assert await retry(limiter, acct, "m", rule) is None
    assert await retry(limiter, acct, "m", rule) == 1
    elapsed = await eventually_allowed(lambda: retry(limiter, acct, "m", rule))
    assert elapsed < 2.5


async def test_concurrent_hits_allow_exactly_the_limit(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(10, 60)
    results = await asyncio.gather(*(retry(limiter, acct, "m", rule) for _ in range(50)))
    assert results.count(None) == 10
    assert all(r is not None and 1 <= r <= 60 for r in results if r is not None)
    assert len(results) == 50


async def test_shortening_the_window_frees_old_entries(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    assert await retry(limiter, acct, "m", limit(1, 60)) is None
    wait = await retry(limiter, acct, "m", limit(1, 1))
    assert wait == 1  # measured against the current, one-second window
    await eventually_allowed(lambda: retry(limiter, acct, "m", limit(1, 1)))


async def test_lowering_the_limit_denies_until_entries_age_out(make_limiter: Factory) -> None:
    limiter, acct = make_limiter(), account()
    for _ in range(3):
        assert await retry(limiter, acct, "m", limit(3, 60)) is None
    wait = await retry(limiter, acct, "m", limit(1, 60))
    assert wait is not None and 0 < wait <= 60
    # A limit of zero (never set by the ledger, which drops such limits) denies everything.
    wait = await retry(limiter, account(), "m", limit(0, 30))
    assert wait == 30


async def test_two_redis_replicas_share_one_window(redis_url: str) -> None:
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"
    a = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    b = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    n, acct, rule = 7, account(), limit(7, 60)
    try:
        results = [await retry((a if i % 2 else b), acct, "m", rule) for i in range(3 * n)]
        assert results.count(None) == n
        assert results[:n] == [None] * n
        # And concurrently, from both at once, on a fresh key.
        other = account()
        both = await asyncio.gather(
            *(retry((a if i % 2 else b), other, "m", rule) for i in range(3 * n))
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
        assert await retry(limiter, acct, "m", limit(2, 30)) is None
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
        assert await retry(limiter, f"acct-{i}", "m", limit(3, 5)) is None
    assert len(limiter) == 100
    now[0] += 11.0
    assert await retry(limiter, "fresh", "m", limit(3, 5)) is None
    assert len(limiter) == 1
    # A denied call on an empty counter holds nothing.
    assert await retry(limiter, "zero", "m", limit(0, 5)) == 5
    assert len(limiter) == 1


async def test_in_process_uses_the_clock() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    rule = limit(2, 10)
    assert await retry(limiter, "a", "m", rule) is None
    now[0] = 4.2
    assert await retry(limiter, "a", "m", rule) is None
    assert await retry(limiter, "a", "m", rule) == 6  # 5.8 s until the first call leaves
    now[0] = 9.999
    assert await retry(limiter, "a", "m", rule) == 1
    now[0] = 10.0  # the first call's slot is free exactly one window later
    assert await retry(limiter, "a", "m", rule) is None
    assert await retry(limiter, "a", "m", rule) == 5  # 14.2 - 10.0, rounded up


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
        assert await retry(limiter, acct, "m", rule) is None
        assert limiter.health.ok
        await forwarder.stop()
        # Redis is away: each call is still answered, counted in this process.
        during = [await retry(limiter, acct, "m", rule) for _ in range(5)]
        assert during[:3] == [None, None, None]
        assert all(wait is not None and wait >= 1 for wait in during[3:])
        assert not limiter.health.ok and limiter.health.failures >= 5
        await forwarder.start()  # back on the same port
        fresh = account()
        assert await retry(limiter, fresh, "m", rule) is None
        assert limiter.health.ok
    finally:
        await limiter.close()
        if forwarder.server is not None and forwarder.server.is_serving():
            await forwarder.stop()


# ------------------------------------------------------------------------------ units (§9)


async def hits(
    limiter: RateLimiter, account_id: str, rule: RateLimit, costs: list[int]
) -> list[RateLimitHit]:
    return [await limiter.hit(account_id, "m", rule, cost) for cost in costs]


async def test_a_units_limit_of_100_allows_three_holds_of_30(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 60, units=100)
    first, second, third, fourth = await hits(limiter, acct, rule, [30, 30, 30, 30])
    assert [h.retry_after for h in (first, second, third)] == [None, None, None]
    assert [(h.kind, h.limit, h.remaining, h.reset) for h in (first, second, third)] == [
        ("units", 100, 70, 60), ("units", 100, 40, 60), ("units", 100, 10, 60)
    ]  # fmt: skip
    assert fourth.limited and fourth.retry_after is not None and 1 <= fourth.retry_after <= 60
    assert (fourth.kind, fourth.limit, fourth.remaining) == ("units", 100, 10)
    assert 59 <= fourth.reset <= 60
    # What is left still fits exactly; one unit more does not.
    assert await retry(limiter, acct, "m", rule, 10) is None
    assert await retry(limiter, acct, "m", rule, 1) is not None
    # Without an estimate a call costs nothing: a units-only limit lets it through uncounted.
    free = await limiter.hit(acct, "m", rule)
    assert free.retry_after is None and free.remaining == 0


async def test_denied_units_are_not_counted(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 60, units=100)
    assert await retry(limiter, acct, "m", rule, 60) is None
    for _ in range(5):
        assert await retry(limiter, acct, "m", rule, 50) is not None
    assert await retry(limiter, acct, "m", rule, 40) is None  # 60 + 40: exactly the cap
    assert await retry(limiter, acct, "m", rule, 1) is not None


async def test_a_cost_above_the_whole_cap_never_passes(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 45, units=100)
    denied = await limiter.hit(acct, "m", rule, 101)
    assert denied.retry_after == 45
    assert (denied.remaining, denied.reset) == (100, 0)  # nothing counted, nothing to reset
    assert await retry(limiter, acct, "m", rule, 100) is None


async def test_requests_and_units_together(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(3, 60, units=100)
    a, b = await hits(limiter, acct, rule, [40, 10])
    # 60 of 100 units left is a smaller share than 2 of 3 requests: units are reported...
    assert (a.kind, a.limit, a.remaining) == ("units", 100, 60)
    # ...until 1 of 3 requests left is a smaller share than 50 of 100 units.
    assert (b.kind, b.limit, b.remaining) == ("requests", 3, 1)
    over_units = await limiter.hit(acct, "m", rule, 60)  # 50 + 60 > 100: the units deny it
    assert over_units.limited
    assert (over_units.kind, over_units.limit, over_units.remaining) == ("units", 100, 50)
    third = await limiter.hit(acct, "m", rule)  # no estimate: counts as a request, 0 units
    assert third.retry_after is None
    assert (third.kind, third.remaining) == ("requests", 0)
    over_requests = await limiter.hit(acct, "m", rule, 1)
    assert over_requests.limited
    assert (over_requests.kind, over_requests.limit, over_requests.remaining) == (
        "requests", 3, 0
    )  # fmt: skip


async def test_concurrent_costly_hits_never_pass_the_units(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 60, units=100)
    results = await asyncio.gather(*(retry(limiter, acct, "m", rule, 30) for _ in range(40)))
    assert results.count(None) == 3
    assert all(r is not None and 1 <= r <= 60 for r in results if r is not None)


async def test_units_free_up_as_the_window_slides(make_limiter: Factory) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 1, units=10)
    assert await retry(limiter, acct, "m", rule, 10) is None
    assert await retry(limiter, acct, "m", rule, 1) == 1
    # Denied calls, polled, neither count nor hold the window open.
    elapsed = await eventually_allowed(lambda: retry(limiter, acct, "m", rule, 10))
    assert elapsed < 2.5


async def test_adding_a_units_cap_counts_the_costs_already_recorded(
    make_limiter: Factory,
) -> None:
    limiter, acct = make_limiter(), account()
    for _ in range(3):
        assert await retry(limiter, acct, "m", limit(10, 60), 30) is None
    both = limit(10, 60, units=100)
    assert await retry(limiter, acct, "m", both, 30) is not None  # 90 already recorded
    assert await retry(limiter, acct, "m", both, 10) is None
    # Dropping the units cap again leaves only the request count.
    assert await retry(limiter, acct, "m", limit(10, 60), 1000) is None


async def test_in_process_units_retry_after_waits_for_enough_units() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    rule = limit(0, 10, units=100)
    assert (await limiter.hit("a", "m", rule, 50)).retry_after is None
    now[0] = 4.0
    assert (await limiter.hit("a", "m", rule, 50)).retry_after is None
    now[0] = 5.0
    assert (await limiter.hit("a", "m", rule, 40)).retry_after == 5  # the first 50 leave at 10
    assert (await limiter.hit("a", "m", rule, 60)).retry_after == 9  # both must leave (at 14)
    denied = await limiter.hit("a", "m", rule, 1)
    assert (denied.remaining, denied.reset) == (0, 9)
    now[0] = 10.0
    assert (await limiter.hit("a", "m", rule, 40)).retry_after is None
    assert (await limiter.hit("a", "m", rule, 20)).retry_after == 4  # until the 50 at 4 leaves
    # A units-only limit records only calls that cost something.
    assert (await limiter.hit("b", "m", rule)).retry_after is None
    assert len(limiter) == 1


async def test_redis_units_total_expires_with_the_window(redis_url: str) -> None:
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        acct = account()
        assert await retry(limiter, acct, "m", limit(0, 30, units=100), 30) is None
        assert await admin.get(redis_units_key(prefix, acct, "m")) == b"30"
        ttl = await admin.pttl(redis_units_key(prefix, acct, "m"))
        assert 0 < ttl <= 30_000
        # Without a units cap the total is not kept (it is recounted when one comes back).
        assert await retry(limiter, acct, "m", limit(5, 30), 30) is None
        assert await admin.exists(redis_units_key(prefix, acct, "m")) == 0
        again = await limiter.hit(acct, "m", limit(5, 30, units=100), 30)
        assert (again.retry_after, again.kind, again.remaining) == (None, "units", 10)
    finally:
        await limiter.close()
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


def test_units_keys_never_meet_counter_keys() -> None:
    assert redis_units_key(DEFAULT_PREFIX, "a:b", "c") == b"quota:rl:u3:a:b:c"
    counters = {redis_key(DEFAULT_PREFIX, a, m) for a in ("u3", "a", "u") for m in ("x", "3:a")}
    totals = {redis_units_key(DEFAULT_PREFIX, a, m) for a in ("u3", "a", "u") for m in ("x", "3:a")}
    assert not counters & totals


async def test_redis_going_away_keeps_counting_units_in_process(redis_url: str) -> None:
    forwarder = _Forwarder(redis_url)
    await forwarder.start()
    limiter = RedisRateLimiter.from_url(
        f"redis://127.0.0.1:{forwarder.port}/0", prefix=f"quota:test:rl:{uuid.uuid4().hex}:"
    )
    acct, rule = account(), limit(0, 60, units=100)
    try:
        await forwarder.stop()
        during = [await retry(limiter, acct, "m", rule, 30) for _ in range(4)]
        assert during[:3] == [None, None, None] and during[3] is not None
        assert not limiter.health.ok
    finally:
        await limiter.close()
        if forwarder.server is not None and forwarder.server.is_serving():
            await forwarder.stop()


async def test_units_retry_after_counts_from_the_entries_that_must_leave(
    make_limiter: Factory,
) -> None:
    limiter, acct, rule = make_limiter(), account(), limit(0, 60, units=100)
    assert await retry(limiter, acct, "m", rule, 50) is None
    await asyncio.sleep(1.2)
    assert await retry(limiter, acct, "m", rule, 50) is None
    # 40 more fit once the first 50 leave (about 58.8 s on); 60 more need the second gone too.
    after_first = await retry(limiter, acct, "m", rule, 40)
    after_both = await retry(limiter, acct, "m", rule, 60)
    assert after_first is not None and 55 <= after_first <= 59
    assert after_both == 60


async def test_a_long_units_walk_answers_when_the_window_empties(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    rule = limit(0, 10, units=100)
    for second in range(10):
        now[0] = float(second)
        assert (await limiter.hit("a", "m", rule, 10)).retry_after is None
    now[0] = 9.5
    assert (await limiter.hit("a", "m", rule, 30)).retry_after == 3  # the third leaves at 12
    monkeypatch.setattr("services.policy.ratelimit.SCAN_LIMIT", 2)
    assert (await limiter.hit("a", "m", rule, 30)).retry_after == 10  # the last leaves at 19


async def test_redis_units_walk_across_batches_and_past_its_limit(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"quota:test:rl:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter.from_url(redis_url, prefix=prefix)
    acct, rule = account(), limit(0, 60, units=300)
    try:
        for _ in range(300):
            assert await retry(limiter, acct, "m", rule, 1) is None
        walked = await limiter.hit(acct, "m", rule, 200)  # the 200th entry, in the 2nd batch
        assert walked.retry_after is not None and 1 <= walked.retry_after <= 60
        assert (walked.remaining, walked.limit) == (0, 300)
        monkeypatch.setattr("services.policy.ratelimit.SCAN_LIMIT", 0)
        assert await retry(limiter, acct, "m", rule, 200) == 60  # the newest leaves last
    finally:
        await limiter.close()
        admin = Redis.from_url(redis_url)
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


def test_the_snapshot_applies_a_units_only_limit() -> None:
    events = [
        cloud_event("quota.account.rate_limit_set", "a",
                    {"model": "m", "requests": 0, "units": 100, "window_seconds": 60}),
        cloud_event("quota.account.rate_limit_set", "a",
                    {"model": "*", "requests": 5, "window_seconds": 60}),
        cloud_event("quota.account.rate_limit_set", "b",
                    {"model": "*", "requests": 5, "units": 0, "window_seconds": 60}),
    ]  # fmt: skip
    state = fold(State(), [decode_http_object(e) for e in events], 1).state
    snapshot = Snapshot.from_state(state, len(events))
    own = snapshot.rate_limit_for("a", "m")
    assert own is not None and (own.requests, own.units) == (0, 100)
    star = snapshot.rate_limit_for("a", "other")
    assert star is not None and (star.requests, star.units) == (5, None)
    b = snapshot.rate_limit_for("b", "m")
    assert b is not None and (b.requests, b.units) == (5, None)  # units 0: no units cap
    assert snapshot.rate_limit_for("c", "m") is None
    # Requests 0 without units removes the limit: the `*` one applies again.
    removed = cloud_event("quota.account.rate_limit_set", "a",
                          {"model": "m", "requests": 0, "window_seconds": 60})  # fmt: skip
    state = fold(state, [decode_http_object(removed)], len(events) + 1).state
    again = Snapshot.from_state(state, len(events) + 1).rate_limit_for("a", "m")
    assert again is not None and again.requests == 5
