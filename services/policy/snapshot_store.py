"""The policy's in-memory snapshot of the projections, kept fresh by push from the ledger.

The ledger sends `NOTIFY quota_changes` in every batch's transaction (so it arrives at commit)
naming what changed and the new position, and a heartbeat with its position when idle. This
store listens on a dedicated connection, reloads only the rows a notification names, and
reloads everything after (re)connecting, since notifications sent while disconnected are lost.

Freshness counts only what proves a live ledger: a batch it committed (`ledger`) or its
heartbeat, minus the heartbeat's `cycle_age` (how long ago its consumer loop last made
progress). Holds and expiries that policies write do not count. The listening connection is
supervised: lost or refused, it is retried with capped backoff (`health` says why meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from services.policy.snapshot import Snapshot
from services.store import budget_store, db, event_store, projections
from services.store.model import Account, Budget, RateLimit, State, Token
from services.store.notify import Notification
from services.supervise import DATABASE_ERRORS, LoopHealth

log = structlog.get_logger("quota.policy.snapshot")

#: Budget spend older than this is never a current period's (a month is the longest).
SPEND_KEPT = timedelta(days=40)


def _spend_since() -> datetime:
    return datetime.now(UTC) - SPEND_KEPT


@dataclass(slots=True)
class _Pending:
    """Notifications received but not yet reloaded, merged."""

    all: bool = False
    #: Accounts to read back.
    accounts: set[str] = field(default_factory=set)
    #: Accounts whose newest row came in a notification (`account_rows`).
    account_rows: dict[str, Account] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    rate_limit_accounts: set[str] = field(default_factory=set)
    budget_accounts: set[str] = field(default_factory=set)
    #: budget_id -> (account_id, held): budgets whose `held` a hold changed.
    budget_held: dict[str, tuple[str, int]] = field(default_factory=dict)
    catalog: bool = False
    position: int = 0

    def merge(self, message: Notification) -> None:
        """Notifications arrive in commit order: a later one's rows replace earlier rows and
        reads of the same account, and a later read replaces earlier rows."""
        self.position = max(self.position, message.position)
        if message.all:
            self.all = True
        for account_id in message.accounts:
            self.accounts.add(account_id)
            self.account_rows.pop(account_id, None)
        for account in message.account_rows:
            self.account_rows[account.account_id] = account
            self.accounts.discard(account.account_id)
        self.tokens.update(message.tokens)
        self.rate_limit_accounts.update(key[0] for key in message.rate_limits)
        for account_id, budget_id, held in message.budget_held:
            self.budget_held[budget_id] = (account_id, held)
        self.budget_accounts.update(message.budgets)
        self.catalog = self.catalog or message.catalog

    def needs_reading(self) -> bool:
        return bool(
            self.accounts
            or self.tokens
            or self.rate_limit_accounts
            or self.budget_accounts
            or self.catalog
        )

    def empty(self) -> bool:
        return not (
            self.all
            or self.accounts
            or self.account_rows
            or self.tokens
            or self.rate_limit_accounts
            or self.budget_accounts
            or self.budget_held
            or self.catalog
        )


@dataclass(slots=True)
class _Loaded:
    """Rows read back for a notification (None: that part was not read)."""

    accounts: list[Account] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    rate_limits: list[RateLimit] | None = None
    budgets: list[Budget] | None = None
    budget_spend: dict[tuple[str, datetime], int] = field(default_factory=dict)
    catalog: State | None = None


class SnapshotStore:
    """Holds the current `Snapshot`; `run()` keeps it fresh until cancelled."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.snapshot: Snapshot | None = None
        self.loaded = asyncio.Event()
        self._state = State()
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._last_heard = time.monotonic()
        self._heard_position = 0
        self._changed = asyncio.Condition()
        #: The listening connection's state: `reason` says why it is not listening.
        self.health = LoopHealth("snapshot")

    @property
    def state(self) -> State:
        """The projections the snapshot indexes (no reservations: decisions need none)."""
        return self._state

    @property
    def position(self) -> int:
        return self.snapshot.position if self.snapshot is not None else 0

    def _heard(self, cycle_age: float | None) -> None:
        """The ledger spoke; a heartbeat vouches only for its loop's last cycle."""
        age = max(0.0, cycle_age or 0.0)
        self._last_heard = max(self._last_heard, time.monotonic() - age)

    def seconds_since_heard(self) -> float:
        """Seconds since the ledger was last heard from (a change or a heartbeat)."""
        return time.monotonic() - self._last_heard

    async def run(self) -> None:
        """Listen and keep the snapshot fresh until cancelled; reconnect with backoff."""
        while True:
            try:
                await self._listen_once()
                delay = self.health.failed("listen", ConnectionError("connection closed"))
            except DATABASE_ERRORS as exc:
                delay = self.health.failed("listen", exc)
            await asyncio.sleep(delay)

    async def wait_for_position(self, position: int) -> None:
        """Until the snapshot has seen `position` (tests and readiness use this)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.position >= position)

    async def _listen_once(self) -> None:
        conn = await db.connect(self.dsn)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            self._pending = _Pending()
            await conn.add_listener(db.CHANGES_CHANNEL, self._on_notify)
            # Listen first, then load: nothing committed after the load can be missed.
            await self._reload_all(conn)
            self.health.succeeded()
            while not lost.is_set():
                waiter = asyncio.ensure_future(self._wake.wait())
                lost_waiter = asyncio.ensure_future(lost.wait())
                await asyncio.wait({waiter, lost_waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                lost_waiter.cancel()
                self._wake.clear()
                if lost.is_set():
                    break
                await self._apply_pending(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = Notification.decode(payload)
        except ValueError as exc:
            log.warning("ignoring a malformed notification", payload=payload[:200], error=str(exc))
            return
        if message.from_live_ledger:
            self._heard(message.cycle_age)
        self._pending.merge(message)
        self._wake.set()

    async def _reload_all(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            head = await event_store.read_head(conn)
            state = await projections.load_all(conn, reservations=False, spend_since=_spend_since())
        self._state = state
        await self._publish(head.position)
        log.info("snapshot loaded", position=head.position, accounts=len(state.accounts))

    async def _apply_pending(self, conn: asyncpg.Connection) -> None:
        pending, self._pending = self._pending, _Pending()
        if pending.all:
            await self._reload_all(conn)
            return
        state = self._state
        loaded = await self._read(conn, pending) if pending.needs_reading() else _Loaded()
        # From here on nothing awaits: the snapshot moves to the new position at once, between
        # two decisions (the accounts mapping is a live view of `state.accounts`).
        state.accounts.update(pending.account_rows)
        for account in loaded.accounts:
            state.accounts[account.account_id] = account
        for token in loaded.tokens:
            state.put_token(token)
        # A hold's new `held` first; budgets read back are newer still (read after it).
        for budget_id, (_account_id, held) in pending.budget_held.items():
            budget = state.budgets.get(budget_id)
            if budget is not None:
                state.put_budget(replace(budget, held=held))
        if loaded.budgets is not None:
            accounts = pending.budget_accounts
            for budget_id in [b.budget_id for a in accounts for b in state.account_budgets(a)]:
                state.drop_budget(budget_id)
            for budget in loaded.budgets:
                state.put_budget(budget)
            loaded_ids = {b.budget_id for b in loaded.budgets}
            for spend_key in [k for k in state.budget_spend if k[0] in loaded_ids]:
                del state.budget_spend[spend_key]
            state.budget_spend.update(loaded.budget_spend)
        if loaded.rate_limits is not None:
            accounts = pending.rate_limit_accounts
            for key in [k for k in state.rate_limits if k[0] in accounts]:
                del state.rate_limits[key]
            for limit in loaded.rate_limits:
                state.rate_limits[(limit.account_id, limit.model)] = limit
        if loaded.catalog is not None:
            state.channels, state.models = loaded.catalog.channels, loaded.catalog.models
            state.routes = loaded.catalog.routes
        # Notifications arrive in commit order, so every change up to the newest notified
        # position has been reloaded (rows may even be newer, which is only fresher). Only the
        # indexes of what changed are rebuilt; a heartbeat rebuilds nothing.
        position = max(pending.position, self.position)
        if self.snapshot is None:
            await self._publish(position)
            return
        self.snapshot = self.snapshot.updated(
            state,
            position,
            accounts=bool(pending.accounts or pending.account_rows),
            tokens=bool(pending.tokens),
            catalog=pending.catalog,
            rate_limits=bool(pending.rate_limit_accounts),
            budgets=bool(pending.budget_accounts or pending.budget_held),
        )
        await self._announce()

    @staticmethod
    async def _read(conn: asyncpg.Connection, pending: _Pending) -> _Loaded:
        """The rows `pending` names, read in one snapshot (one statement needs no transaction)."""
        reads = (
            bool(pending.accounts) + bool(pending.tokens) + bool(pending.rate_limit_accounts)
            + bool(pending.budget_accounts) + pending.catalog
        )  # fmt: skip
        transaction = (
            conn.transaction(isolation="repeatable_read", readonly=True)
            if reads > 1
            else contextlib.nullcontext()
        )
        loaded = _Loaded()
        async with transaction:
            if pending.accounts:
                loaded.accounts = await projections.load_accounts(conn, sorted(pending.accounts))
            if pending.tokens:
                loaded.tokens = await projections.load_tokens(conn, sorted(pending.tokens))
            if pending.rate_limit_accounts:
                loaded.rate_limits = await projections.load_rate_limits(
                    conn, sorted(pending.rate_limit_accounts)
                )
            if pending.budget_accounts:
                loaded.budgets, loaded.budget_spend = await budget_store.load_account_budgets(
                    conn, sorted(pending.budget_accounts), _spend_since()
                )
            if pending.catalog:
                loaded.catalog = await projections.load_catalog(conn)
        return loaded

    async def _publish(self, position: int) -> None:
        self.snapshot = Snapshot.from_state(self._state, max(position, self.position))
        await self._announce()

    async def _announce(self) -> None:
        self.loaded.set()
        async with self._changed:
            self._changed.notify_all()
