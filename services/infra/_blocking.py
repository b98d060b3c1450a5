"""Run a coroutine to completion from synchronous code, whatever the calling thread is doing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `factory()` in a fresh event loop on a short-lived worker thread; return its result.

    The worker thread keeps the caller's own event-loop state untouched: `asyncio.run` refuses
    to nest inside a running loop, and on the calling thread it would also reset the current
    loop that pytest-asyncio (or an application) may have installed there.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-blocking") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()
