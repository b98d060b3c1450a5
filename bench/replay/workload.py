"""A realistic history of typed `Event`s, folded and chained by ingest's append path and stored
exactly as ingest stores it, but with COPY instead of through Kafka.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from services.contract.cloudevent import canonical_json, event_content
from services.contract.events import EVENT_TYPES, Event
from services.store import event_store, projections
from services.store.append import Unique, fold_and_chain
from services.store.chain import payload_hash
from services.store.model import State

PARTITIONS: Final = 4
TOPIC: Final = "quota.events"
MODELS: Final = ("gpt-4o", "gpt-4o-mini", "claude", "dall-e", "whisper", "embed-3")
ROLES: Final = ("guest", "user", "admin")
GROUPS: Final = ("default", "vip", "svip")


def random_events(count: int, accounts: int, seed: int = 7) -> Iterator[Event]:
    """`count` events: catalog first, then mostly usage/recharge over `accounts` accounts,
    with status, role, group, rate-limit, token and channel events mixed in."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    produced = 0
    tokens: dict[str, list[str]] = {}

    def emit(type_: str, subject: str, data: dict[str, Any]) -> Event:
        """An event as ingest decodes it: the typed data and the raw JSON object."""
        nonlocal produced
        produced += 1
        return Event(id=f"evt-{seed}-{produced}", source="bench", type=type_, subject=subject,
                     time=start + timedelta(milliseconds=produced),
                     data=EVENT_TYPES[type_].model_validate(data), raw_data=data)  # fmt: skip

    catalog: list[tuple[str, dict[str, Any]]] = []
    for model in MODELS:
        catalog.append(("quota.model.registered", {"model": model, "kind": "chat",
                                                   "limits": {"max_tokens": 4096}}))  # fmt: skip
    for channel in range(1, 9):
        models = list(MODELS[: 1 + channel % 5])
        data = {"channel_id": channel, "models": models, "groups": list(GROUPS)}
        catalog.append(("quota.channel.registered", data))
    catalog.append(("quota.route.policy_set", {"route": "/v1/admin", "min_role": "admin"}))
    for type_, data in catalog[:count]:
        yield emit(type_, "catalog", data)
    while produced < count:
        account = f"acct_{rng.randrange(accounts):06d}"
        roll = rng.random()
        if roll < 0.55:
            yield emit("quota.account.usage_recorded", account, {"amount": rng.randint(1, 5000)})
        elif roll < 0.85:
            yield emit("quota.account.recharged", account, {"amount": rng.randint(1, 100_000)})
        elif roll < 0.88:
            yield emit("quota.account.refunded", account, {"amount": rng.randint(1, 1000)})
        elif roll < 0.90:
            delta = rng.choice([-1, 1]) * rng.randint(1, 1000)
            yield emit("quota.account.adjusted", account, {"delta": delta, "reason": "fix"})
        elif roll < 0.91:
            yield emit("quota.account.opened", account,
                       {"role": rng.choice(ROLES), "group": rng.choice(GROUPS)})  # fmt: skip
        elif roll < 0.92:
            kind = rng.choice(["suspended", "blacklisted", "reinstated", "reinstated"])
            yield emit(f"quota.account.{kind}", account, {"reason": "bench"})
        elif roll < 0.93:
            yield emit("quota.account.role_changed", account, {"role": rng.choice(ROLES)})
        elif roll < 0.94:
            yield emit("quota.account.group_changed", account, {"group": rng.choice(GROUPS)})
        elif roll < 0.95:
            yield emit("quota.account.rate_limit_set", account, {"model": rng.choice(MODELS),
                       "requests": rng.choice([0, 10, 60]), "window_seconds": 60})  # fmt: skip
        elif roll < 0.97:
            token_id = f"tok_{produced}"
            key = hashlib.sha256(token_id.encode()).hexdigest()
            tokens.setdefault(account, []).append(token_id)
            yield emit("quota.token.issued", account, {"token_id": token_id, "key_sha256": key,
                       "key_last6": key[-6:], "allowed_models": [rng.choice(MODELS)]})  # fmt: skip
        elif roll < 0.98 and tokens.get(account):
            token_id = rng.choice(tokens[account])
            yield emit("quota.token.updated", account,
                       {"token_id": token_id, "allowed_cidrs": ["10.0.0.0/8"]})  # fmt: skip
        elif roll < 0.99 and tokens.get(account):
            yield emit("quota.token.revoked", account, {"token_id": rng.choice(tokens[account])})
        else:
            type_ = rng.choice(["quota.channel.disabled", "quota.channel.enabled"])
            yield emit(type_, "catalog", {"channel_id": rng.randint(1, 8)})


async def store_events(
    conn: asyncpg.Connection, events: Iterator[Event], chunk: int = 20_000
) -> tuple[State, int]:
    """Fold, chain and COPY `events` (in the caller's transaction, into a new database) with
    the append path ingest uses (`fold_and_chain`), write the projections and the head; return
    the folded state and the number stored."""
    head = await event_store.lock_head(conn)
    state = State()
    offsets = [0] * PARTITIONS
    recorded_at = datetime.now(UTC)
    stored = 0
    while batch := [event for _, event in zip(range(chunk), events, strict=False)]:
        unique = []
        for event in batch:
            payload = canonical_json(event_content(event))
            partition = zlib.crc32(event.subject.encode()) % PARTITIONS
            source = (TOPIC, partition, offsets[partition])
            offsets[partition] += 1
            unique.append(Unique(event, payload, payload_hash(payload), source))
        appended = fold_and_chain(head, unique, state, recorded_at, derive=True)
        await event_store.append_events(conn, appended.records)
        state, stored = appended.state, stored + appended.count
        head = event_store.Head(appended.position, appended.hash, head.duplicates)
    await projections.copy_projections(conn, state)  # a new database: the tables are empty
    await event_store.write_head(conn, head)
    return state, stored
