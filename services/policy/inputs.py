"""What `decide` reads from a request, as pure functions: the key of an Authorization value
and its hash, a pinned channel, the client's address against a token's networks, the request's
fields against a model's limits (check 11), and whole seconds for Retry-After."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Final

from services.contract.events import INT64_MAX
from services.policy.errors import (
    N_NOT_WITHIN_RANGE,
    PROMPT_MISSING,
    PROMPT_TOO_LONG,
    SIZE_NOT_SUPPORTED,
    TEXT_TOO_LONG,
)
from services.policy.request import RequestInput
from services.policy.snapshot import Address, Network
from services.store.model import ModelSpec

_BEARER: Final = re.compile(r"bearer(?:\s+(.*))?", re.IGNORECASE | re.DOTALL)
_PIN: Final = re.compile(r"[0-9]{1,19}")


def extract_key(authorization: str | None) -> str:
    """The key of an Authorization value: `Bearer <key>` or a bare key; "" when there is none."""
    if authorization is None:
        return ""
    value = authorization.strip()
    bearer = _BEARER.fullmatch(value)
    if bearer is not None:
        return (bearer.group(1) or "").strip()
    return value


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_pin(pin: str | int) -> int | None:
    """A pinned channel id: a positive integer within int64, or None when it is not one."""
    if isinstance(pin, int):
        value = pin
    elif _PIN.fullmatch(pin):
        value = int(pin)
    else:
        return None
    return value if 0 < value <= INT64_MAX else None


def parse_address(client_ip: str | None) -> Address | None:
    if client_ip is None:
        return None
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_allowed(address: Address | None, networks: Iterable[Network]) -> bool:
    """Whether the address is in one of the networks; IPv4-mapped IPv6 matches IPv4 networks."""
    if address is None:
        return False
    candidates: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    else:
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    for network in networks:
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return True
    return False


def seconds_until(later: datetime, now: datetime) -> int:
    """Whole seconds from `now` to `later`, rounded up, at least 1."""
    delta = later - now
    seconds = delta.days * 86400 + delta.seconds + (1 if delta.microseconds else 0)
    return max(seconds, 1)


def text_length(value: str | list[str] | None) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return sum(len(item) for item in value)


def check_limits(spec: ModelSpec, fields: RequestInput) -> str | None:
    """Check 11: the first of the model's limits the request breaks, as a reason."""
    limits = spec.limits
    prompt = fields.prompt
    if spec.kind == "image" and (prompt is None or not prompt.strip()):
        return PROMPT_MISSING
    max_prompt = limits.get("max_prompt_chars")
    if max_prompt is not None and prompt is not None and len(prompt) > max_prompt:
        return PROMPT_TOO_LONG
    sizes = limits.get("sizes")
    if sizes is not None and fields.size is not None and fields.size not in sizes:
        return SIZE_NOT_SUPPORTED
    n_min, n_max = limits.get("n_min"), limits.get("n_max")
    if n_min is not None or n_max is not None:
        n = 1 if fields.n is None else fields.n
        if (n_min is not None and n < n_min) or (n_max is not None and n > n_max):
            return N_NOT_WITHIN_RANGE
    max_input = limits.get("max_input_chars")
    if max_input is not None and text_length(fields.input) > max_input:
        return TEXT_TOO_LONG
    return None
