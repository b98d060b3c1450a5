"""The hash chain over the event store.

Each stored event keeps `payload`, the canonical JSON of its content, `content_hash`, the
SHA-256 of that payload, and `hash`, which binds the previous hash, the position and the
content hash together. Changing any stored event, or the order, breaks every hash after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

GENESIS_HASH: Final = "0" * 64


def payload_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def chain_hash(prev_hash: str, position: int, content_hash: str) -> str:
    """The hash of the event at `position`, given the hash before it."""
    return hashlib.sha256(f"{prev_hash}:{position}:{content_hash}".encode()).hexdigest()


@dataclass(slots=True)
class ChainWalk:
    """Stored events checked in position order, one at a time: the one walk over the chain
    that verify, replay and the benchmarks share (replay's bulk check does the same in SQL,
    held to this by tests/store/test_parity.py)."""

    last_position: int = 0
    last_hash: str = GENESIS_HASH
    checked: int = 0

    def step(
        self, position: int, payload: str, content_hash: str, prev_hash: str, hash_: str
    ) -> list[tuple[str, Any, Any]]:
        """The broken links of this row, as (column, expected, found); then move past it."""
        broken: list[tuple[str, Any, Any]] = []
        if position != self.last_position + 1:
            broken.append(("position", self.last_position + 1, position))
        if prev_hash != self.last_hash:
            broken.append(("prev_hash", self.last_hash, prev_hash))
        digest = payload_hash(payload.encode())
        if content_hash != digest:
            broken.append(("content_hash", digest, content_hash))
        expected = chain_hash(self.last_hash, position, digest)
        if hash_ != expected:
            broken.append(("hash", expected, hash_))
        self.last_position = position
        self.last_hash = hash_
        self.checked += 1
        return broken
