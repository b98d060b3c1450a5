"""The hash chain over the event store.

Each stored event keeps `payload`, the canonical JSON of its content, `content_hash`, the
SHA-256 of that payload, and `hash`, which binds the previous hash, the position and the
content hash together. Changing any stored event, or the order, breaks every hash after it.
"""

from __future__ import annotations

import hashlib
from typing import Final

GENESIS_HASH: Final = "0" * 64


def payload_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def chain_hash(prev_hash: str, position: int, content_hash: str) -> str:
    """The hash of the event at `position`, given the hash before it."""
    return hashlib.sha256(f"{prev_hash}:{position}:{content_hash}".encode()).hexdigest()
