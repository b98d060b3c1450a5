"""Run a coroutine to completion from synchronous code, whatever the calling thread is doing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `factory()` in a fresh event loop and return its result.

    When the calling thread already runs a loop (a sync helper called from async code,
    e.g. from inside a pytest-asyncio test), the coroutine runs in a short-lived worker
    thread instead, since `asyncio.run` refuses to nest.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-blocking") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
