"""Sample CloudEvents as JSON objects (structured mode), for tests, benchmarks and demos.

Each builder returns the event as a gateway or billing system would send it: a dict that
`POST /events` takes as is, or that `structured` / `binary` turn into a Kafka record.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any


def cloud_event(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
    time: str | None = "2026-11-24T12:00:00Z",
    source: str = "samples",
) -> dict[str, Any]:
    """A structured-mode CloudEvent as a JSON object (a random id unless `event_id`)."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": type_,
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }
    if time is not None:
        event["time"] = time
    return event


def recharge(account: str, amount: int, **kwargs: Any) -> dict[str, Any]:
    return cloud_event("quota.account.recharged", account, {"amount": amount}, **kwargs)


def usage(
    account: str, amount: int, data: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """A usage; `data` adds `model`, `token_id`, `reservation_id`, `request_id`."""
    payload = {"amount": amount, **(data or {})}
    return cloud_event("quota.account.usage_recorded", account, payload, **kwargs)


def budget_set(
    account: str,
    budget_id: str,
    amount: int,
    period: str = "day",
    *,
    time: str | None = "2026-11-24T12:00:00Z",
    **data: Any,
) -> dict[str, Any]:
    """An account budget (or, with `scope="token"` and `token_id`, a token budget)."""
    payload = {"budget_id": budget_id, "scope": "account", "amount": amount, "period": period,
               **data}  # fmt: skip
    return cloud_event("quota.budget.set", account, payload, time=time)


def limits_set(account: str, max_concurrent: int | None) -> dict[str, Any]:
    return cloud_event("quota.account.limits_set", account, {"max_concurrent": max_concurrent})


def token_issued(account: str, token_id: str, key: str, **data: Any) -> dict[str, Any]:
    """A token for `key` (only its SHA-256 and last six characters travel)."""
    payload = {
        "token_id": token_id,
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "key_last6": key[-6:],
        **data,
    }
    return cloud_event("quota.token.issued", account, payload)


def structured(event: dict[str, Any]) -> bytes:
    """The Kafka record value of structured mode: the whole event as JSON."""
    return json.dumps(event).encode()


def binary(event: dict[str, Any]) -> tuple[list[tuple[str, bytes]], bytes]:
    """CloudEvents Kafka binary mode: attributes in `ce_` headers, data as the value."""
    headers = [
        (f"ce_{name}", str(value).encode())
        for name, value in event.items()
        if name not in ("data", "datacontenttype")
    ]
    headers.append(("content-type", event.get("datacontenttype", "application/json").encode()))
    return headers, json.dumps(event["data"]).encode()
