"""`POST /authorize` bodies: the msgspec fast path (`AuthorizeBody`) and the pydantic model
(`AuthorizeRequest`, which words the 400s and the OpenAPI schema) give the same verdict and the
same values for any body."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.policy.request import (
    AuthorizeBody,
    AuthorizeRequest,
    RequestBody,
    RequestFields,
    parse_authorize,
)

FIELDS = list(AuthorizeRequest.model_fields)
REQUEST_FIELDS = list(RequestFields.model_fields)

#: Every JSON type, and the edges of the fields' bounds.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63 - 1, 2**63, -1, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["", "a\x00b", "x" * 256, "x" * 257, "é" * 256, "\ud83d\ude00"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
request_objects = st.dictionaries(st.sampled_from([*REQUEST_FIELDS, "other"]), values, max_size=5)
bodies = st.dictionaries(
    st.sampled_from([*FIELDS, "extra"]),
    st.one_of(values, request_objects),
    max_size=len(FIELDS) + 1,
)


def fields_of(parsed: Any) -> dict[str, Any]:
    """The values a decision reads, whichever type parsed them."""
    if isinstance(parsed, AuthorizeRequest):
        values = parsed.model_dump()
    else:
        values = msgspec.to_builtins(parsed)
    request = values["request"]
    values["request"] = {name: request.get(name) for name in REQUEST_FIELDS}
    return values


def verdicts(raw: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(what parse_authorize gives, what pydantic alone gives): fields, or None for a 400."""
    try:
        fast: dict[str, Any] | None = fields_of(parse_authorize(raw))
    except ValidationError:
        fast = None
    try:
        model: dict[str, Any] | None = fields_of(AuthorizeRequest.model_validate_json(raw))
    except ValidationError:
        model = None
    return fast, model


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_any_body_gets_the_same_verdict_and_values(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    fast, model = verdicts(raw)
    assert fast == model
    try:
        decoded = msgspec.json.decode(raw, type=AuthorizeBody)
    except msgspec.MsgspecError:
        return
    assert model is not None, "msgspec accepted a body the model refuses"
    assert fields_of(decoded) == model


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"null",
        b"{",
        b'{"authorization": 1}',
        b'{"estimated_cost": 1.0}',
        b'{"estimated_cost": true}',
        b'{"estimated_cost": 0}',
        b'{"estimated_cost": 9223372036854775808}',
        b'{"request_id": ""}',
        b'{"request_id": "a\\u0000b"}',
        b'{"request_id": "\\ud800"}',
        b'{"dry_run": 1}',
        b'{"channel_id": 1.5}',
        b'{"request": {"n": 10000000000000000000000000}}',
        b'{"request": {"input": ["a", 1]}}',
        b'{"request": []}',
        b"\xff",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,  # deeper than msgspec recurses
        b"[" * 10_000 + b"]" * 10_000,
    ],
    ids=lambda raw: raw[:40].decode("latin-1"),
)
def test_edge_bodies_get_the_models_verdict(raw: bytes) -> None:
    fast, model = verdicts(raw)
    assert fast == model


def test_a_valid_body_takes_the_fast_path() -> None:
    raw = json.dumps(
        {
            "authorization": "Bearer sk-x",
            "model": "gpt-4o",
            "channel_id": 3,
            "request": {"input": ["a", "b"], "n": 2},
            "estimated_cost": 5,
            "request_id": "req-1",
            "dry_run": True,
            "unknown": {"ignored": True},
        }
    ).encode()
    parsed = parse_authorize(raw)
    assert isinstance(parsed, AuthorizeBody)
    assert parsed.request == RequestBody(input=["a", "b"], n=2)
    assert fields_of(parsed) == fields_of(AuthorizeRequest.model_validate_json(raw))
