"""Decoding CloudEvents from Kafka records: both modes, and each kind of bad input."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from services.contract.cloudevent import Rejection, decode_http_object, decode_kafka
from services.contract.events import AccountRecharged
from tests.builders import binary, cloud_event, recharge, structured


def test_structured_and_binary_mode_decode_to_the_same_event() -> None:
    event = recharge("acct_1", 500, event_id="e1")
    from_structured = decode_kafka([], structured(event))
    headers, value = binary(event)
    from_binary = decode_kafka(headers, value)
    assert from_structured == from_binary
    assert from_structured.data == AccountRecharged(amount=500)
    assert from_structured.time == datetime(2026, 11, 24, 12, tzinfo=UTC)
    assert from_structured.subject == "acct_1"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"{nope", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (json.dumps([1, 2]).encode(), "not_cloudevent"),
        (json.dumps({"id": "x", "type": "quota.account.recharged"}).encode(), "not_cloudevent"),
        (structured(cloud_event("quota.account.exploded", "a", {})), "unknown_type"),
        (structured(recharge("a", -1)), "bad_data"),
        (structured(recharge("a", 0)), "bad_data"),
        (structured(cloud_event("quota.account.recharged", "a", {"amount": 1.5})), "bad_data"),
        (structured(cloud_event("quota.account.recharged", "a", {"amount": "5"})), "bad_data"),
        (structured(cloud_event("quota.account.adjusted", "a", {"delta": 0, "reason": "x"})),
         "bad_data"),
        (structured(cloud_event("quota.channel.enabled", "acct", {"channel_id": 1})), "bad_data"),
        (structured(cloud_event("quota.account.suspended", "catalog", {})), "bad_data"),
        (structured(cloud_event("quota.token.issued", "a", {"token_id": "t"})), "bad_data"),
        (structured(cloud_event("quota.account.rate_limit_set", "a",
                                {"model": "*", "requests": 1, "window_seconds": 0})), "bad_data"),
        (structured({**recharge("a", 1), "time": "yesterday"}), "not_cloudevent"),
        (structured({**recharge("a", 1), "data": "text"}), "bad_data"),
    ],
)  # fmt: skip
def test_bad_records_are_rejected_with_their_reason(value: bytes, code: str) -> None:
    with pytest.raises(Rejection) as caught:
        decode_kafka([], value)
    assert caught.value.code == code
    assert caught.value.reason.startswith(code + ": ")


def test_binary_mode_with_broken_json_data_is_invalid_json() -> None:
    headers, _ = binary(recharge("a", 1))
    with pytest.raises(Rejection) as caught:
        decode_kafka(headers, b"{broken")
    assert caught.value.code == "invalid_json"


def test_empty_record_is_not_a_cloudevent() -> None:
    with pytest.raises(Rejection) as caught:
        decode_kafka([], None)
    assert caught.value.code == "not_cloudevent"


def test_bad_cidr_is_bad_data() -> None:
    event = cloud_event(
        "quota.token.issued",
        "a",
        {"token_id": "t", "key_sha256": "ab" * 32, "key_last6": "123456",
         "allowed_cidrs": ["10.0.0.0/33"]},
    )  # fmt: skip
    with pytest.raises(Rejection) as caught:
        decode_http_object(event)
    assert caught.value.code == "bad_data"
    assert "allowed_cidrs" in caught.value.detail


@pytest.mark.parametrize("missing", ["id", "source", "type", "specversion"])
def test_an_event_without_a_required_attribute_is_not_a_cloudevent(missing: str) -> None:
    # The SDK would make up an id; a made-up id would apply a redelivered event twice.
    event = recharge("a", 1)
    del event[missing]
    with pytest.raises(Rejection) as structured_mode:
        decode_kafka([], structured(event))
    assert structured_mode.value.code == "not_cloudevent"
    assert missing in structured_mode.value.detail
    headers, value = binary(recharge("a", 1))
    headers = [(name, raw) for name, raw in headers if name != f"ce_{missing}"]
    with pytest.raises(Rejection) as binary_mode:
        decode_kafka(headers, value)
    assert binary_mode.value.code == "not_cloudevent"


def test_an_event_without_time_decodes_the_same_every_time() -> None:
    event = recharge("a", 1, time=None)
    first = decode_kafka([], structured(event))
    again = decode_kafka([], structured(event))
    headers, value = binary(event)
    assert first.time is None
    assert first == again == decode_kafka(headers, value) == decode_http_object(event)
