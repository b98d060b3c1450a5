"""Per-batch phase timing of the ledger path, by wrapping module attributes at runtime.

Only batch-level functions are wrapped (a few per batch), so the overhead is microseconds
per batch and the headline numbers stay honest. Nothing in `services/` is edited: the
wrappers are installed on the imported modules and removed again by `restore()`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(slots=True)
class Phase:
    calls: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class PhaseTimer:
    phases: dict[str, Phase] = field(default_factory=dict)
    last_start: dict[str, float] = field(default_factory=dict)
    last_end: dict[str, float] = field(default_factory=dict)
    enabled: bool = True
    #: Time spent before this instant (the group join) is left out of the totals.
    window_start: float | None = None
    _restore: list[Callable[[], None]] = field(default_factory=list)

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        if not self.enabled:
            return
        phase = self.phases.setdefault(name, Phase())
        phase.calls += calls
        phase.seconds += seconds

    def _mark(self, name: str, started: float, ended: float) -> None:
        self.last_start[name] = started
        self.last_end[name] = ended
        self.add(name, ended - started)

    def wrap_sync(self, module: ModuleType, attr: str, name: str | None = None) -> None:
        original: Callable[..., Any] = getattr(module, attr)
        label = name or attr

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._mark(label, started, time.perf_counter())

        self._install(module, attr, original, timed)

    def wrap_async(self, module: ModuleType, attr: str, name: str | None = None) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(module, attr)
        label = name or attr

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self._mark(label, started, time.perf_counter())

        self._install(module, attr, original, timed)

    def _install(
        self, module: ModuleType, attr: str, original: object, replacement: object
    ) -> None:
        setattr(module, attr, replacement)
        self._restore.append(lambda: setattr(module, attr, original))

    def restore(self) -> None:
        while self._restore:
            self._restore.pop()()

    def add_span(self, name: str, started: float, ended: float) -> None:
        """Add the part of [started, ended] after `window_start` (nothing before it is set)."""
        if self.window_start is None:
            return
        started = max(started, self.window_start)
        if ended > started:
            self.add(name, ended - started)


def instrument_ledger(timer: PhaseTimer) -> None:
    """Wrap the batch-level steps of `ingest.decode_all` and `ingest.apply_batch`."""
    from services.ledger import ingest
    from services.ledger import repository as repo

    # `services/` is worked on while this benchmark exists: a step that is gone is skipped.
    if callable(getattr(ingest, "decode_all", None)):
        timer.wrap_sync(ingest, "decode_all")
    if callable(getattr(ingest, "apply_batch", None)):
        timer.wrap_async(ingest, "apply_batch")
    # Inside apply_batch: SQL round trips (module attributes of `repo`) and the pure fold.
    for attr in (
        "lock_head",
        "stored_content_hashes",
        "load_state",
        "append_events",
        "write_changes",
        "quarantine",
        "write_head",
        "commit_offsets",
        "notify_changes",
    ):
        if callable(getattr(repo, attr, None)):
            timer.wrap_async(repo, attr, f"sql.{attr}")
    if callable(getattr(ingest, "fold", None)):
        timer.wrap_sync(ingest, "fold", "fold")
