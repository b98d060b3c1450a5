"""The hot path's decoder (`fast_decode.decode_record`) held to the SDK path (`decode_kafka`).

For any record both give the same verdict: a `Rejection` with the same code, or the same `Event`
(attributes, `time` with its `tzinfo`, the raw data as it is hashed, the typed data with the
fields it was given). The records are CloudEvents of every type built from the models in
`events.py` (so a new field is generated too), then spoilt: wrong types, floats and bools for
integers, numbers out of range, missing and extra fields, nulls, U+0000, lone surrogates, deep
nesting, bad times and attributes, in structured and binary mode; and the poison kinds as they
arrive (not JSON, not an object, not UTF-8). Hypothesis runs derandomized: the same examples on
every run.
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Final, Literal, Union, cast, get_args, get_origin

import annotated_types
import pytest
from dateutil.parser import isoparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic.functional_validators import AfterValidator

from services.contract import events
from services.contract.cloudevent import Rejection, _unstorable, canonical_json, decode_kafka
from services.contract.data_structs import PLANS, DataPlan, _construct, fast_data, plan_for
from services.contract.events import CATALOG_EVENTS, EVENT_TYPES, Event, EventData
from services.contract.fast_decode import _JSON, _header_time, decode_record
from tests.builders import binary, cloud_event, recharge, structured, token_issued, usage

Headers = list[tuple[str, bytes]]
Record = tuple[Headers, bytes | None]


def examples(count: int) -> settings:
    """Derandomized: the same examples on every run."""
    return settings(
        max_examples=count,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------------------------- the comparison


def verdict(decode: Callable[[Headers, bytes | None], Event], record: Record) -> Event | str:
    try:
        return decode(*record)
    except Rejection as rejection:
        assert rejection.reason.startswith(rejection.code + ": ")
        return rejection.code


def same_json(left: Any, right: Any) -> bool:
    """Equal JSON values of the same types (1 is not 1.0 nor True), NaN equal to NaN."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        return repr(left) == repr(right)
    if isinstance(left, dict):
        return list(left) == list(right) and all(same_json(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same_json, left, right))
    return bool(left == right)


def same_model(left: BaseModel, right: BaseModel) -> None:
    assert type(left) is type(right)
    assert left == right
    assert repr(left) == repr(right)
    assert left.model_fields_set == right.model_fields_set
    assert left.__pydantic_extra__ == right.__pydantic_extra__
    assert left.__pydantic_private__ == right.__pydantic_private__
    for name, value in left.__dict__.items():
        if isinstance(value, BaseModel):
            same_model(value, right.__dict__[name])


def assert_same_verdict(record: Record) -> Event | str:
    old = verdict(decode_kafka, record)
    new = verdict(decode_record, record)
    if isinstance(old, str) or isinstance(new, str):
        assert new == old, f"decode_record: {new!r}, decode_kafka: {old!r}"
        return old
    for attribute in ("id", "source", "type", "subject"):
        assert getattr(new, attribute) == getattr(old, attribute)
    assert repr(new.time) == repr(old.time)  # the value, the offset and the tzinfo's class
    assert same_json(new.raw_data, old.raw_data)
    assert canonical_json(new.raw_data) == canonical_json(old.raw_data)
    same_model(new.data, old.data)
    return old


# ------------------------------------------------------------------------ data from the models

#: Values that are wrong for most fields somewhere: types, bounds, lengths, unstorable text.
ODD_VALUES: Final = st.sampled_from(
    [None, True, False, 0, -1, 1, 1.0, 1.5, -0.0, math.nan, "", "5", "x", " ", "a\n", [], {},
     [1], {"a": 1}, ["a"], 2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30, -(10**30), "\x00",
     "a\ud800", "\udc00", "x" * 257, "2026-11-24T12:00:00Z", "UTC", "10.0.0.1", "user"]
)  # fmt: skip
JSON_VALUES: Final = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
EXTRA_KEYS: Final = st.sampled_from(["note", "extra", "", "k\x00", "k\ud800", "amount2"])


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


#: Nested values that put data at and just past `MAX_DATA_DEPTH` (32) levels.
DEEP_VALUES: Final = st.sampled_from([nested(30), nested(31), nested(32), nested(40)])

CIDRS: Final = ["10.0.0.0/8", "10.0.0.1", " 10.1.2.3/16 ", "2001:db8::1", "::/0", "10.0.0.0/33",
                "nope", "", "10.0.0.256"]  # fmt: skip
ZONES: Final = ["UTC", "Europe/Berlin", "America/New_York", "Etc/GMT+5", "Nope/Zone", "../etc",
                "/UTC", "", "utc", "Europe//Berlin"]  # fmt: skip
AWARE_TIMES: Final = ["2026-11-24T12:00:00Z", "2026-11-24T12:00:00+05:30", "2026-11-24T12:00:00",
                      "2026-11-24", "2026-11-24T12:00:00.123456789Z", 1_700_000_000, 1.5,
                      "1700000000", "soon", True]  # fmt: skip
AFTER_VALUES: Final[dict[Callable[..., Any], list[Any]]] = {
    events._check_cidr: CIDRS,
    events._check_timezone: ZONES,
}


def _metadata(items: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in items:
        flat.extend(_metadata(item.metadata) if isinstance(item, FieldInfo) else [item])
    return flat


def values_for(annotation: Any, metadata: Sequence[Any] = ()) -> st.SearchStrategy[Any]:
    """Valid values (mostly) for a field of this type, from its pydantic annotation."""
    if get_origin(annotation) is Annotated:
        base, *more = get_args(annotation)
        return values_for(base, [*more, *metadata])
    items = _metadata(metadata)
    for item in items:
        if isinstance(item, AfterValidator):
            return st.sampled_from(AFTER_VALUES[item.func])
    bounds = {type(item).__name__: item for item in items}
    origin = get_origin(annotation)
    if annotation is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of([values_for(arg) for arg in get_args(annotation)])
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    if origin is list:
        return st.lists(values_for(get_args(annotation)[0]), max_size=3)
    if annotation is AwareDatetime:
        return st.sampled_from(AWARE_TIMES)
    if isinstance(annotation, type) and issubclass(annotation, EventData):
        return model_data(annotation)
    if annotation is int:
        low = bounds["Ge"].ge if "Ge" in bounds else bounds["Gt"].gt + 1 if "Gt" in bounds else None
        high = bounds["Le"].le if "Le" in bounds else None
        ints = st.integers(min_value=low, max_value=high)
        edges = [edge for edge in (low, high) if edge is not None]
        return ints | st.sampled_from(edges) if edges else ints
    if annotation is str:
        for item in items:
            pattern = getattr(item, "pattern", None)
            if isinstance(pattern, str):  # and what Python's `$` would let by, pydantic's not
                matching = st.from_regex(pattern, fullmatch=True)
                return matching | matching.map(lambda text: text + "\n")
        least = bounds["MinLen"].min_length if "MinLen" in bounds else 0
        most = bounds["MaxLen"].max_length if "MaxLen" in bounds else None
        texts = st.text(min_size=least, max_size=min(most or 8, 8))
        return texts | st.just("é" * most) if most else texts
    raise NotImplementedError(f"no test values for {annotation!r}: teach values_for")


def model_data(model: type[EventData]) -> st.SearchStrategy[dict[str, Any]]:
    """Data of a model as JSON gives it: its required fields and any of the optional ones."""
    fields = model.model_fields
    return st.fixed_dictionaries(
        {name: values_for(info.annotation, info.metadata)
         for name, info in fields.items() if info.is_required()},
        optional={name: values_for(info.annotation, info.metadata)
                  for name, info in fields.items() if not info.is_required()},
    )  # fmt: skip


@st.composite
def spoilt_data(draw: st.DrawFn, model: type[EventData]) -> dict[str, Any]:
    """Data of a model, mostly valid, else with a field set wrong, removed or added."""
    data = dict(draw(model_data(model)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        action = draw(st.sampled_from(["set", "set", "delete", "extra", "deep"]))
        if action == "set":
            data[draw(st.sampled_from(list(model.model_fields)))] = draw(ODD_VALUES)
        elif action == "delete" and data:
            del data[draw(st.sampled_from(sorted(data)))]
        elif action == "extra":
            data[draw(EXTRA_KEYS)] = draw(JSON_VALUES | ODD_VALUES)
        elif action == "deep":
            data["deep"] = draw(DEEP_VALUES)
    return data


# ------------------------------------------------------------------------------ whole records

TIME_TEXTS: Final = st.sampled_from(
    ["2026-11-24T12:00:00Z", "2026-11-24T12:00:00.5Z", "2026-11-24T12:00:00.123456Z",
     "2026-11-24T12:00:00.1234567Z", "2026-11-24T12:00:00+05:30", "2026-11-24T12:00:00-00:00",
     "2026-11-24T12:00:00+00:00", "2026-11-24t12:00:00z", "2026-11-24 12:00:00Z",
     "2026-11-24T12:00:00", "2026-11-24", "2026-11-24T24:00:00Z", "2026-11-24T12:00:60Z",
     "2026-02-30T12:00:00Z", "2028-02-29T23:59:59Z", "0001-01-01T00:00:00+01:00",
     "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
     "9999-12-31T24:00:00Z", "20261124T120000Z", "2026-W48-1T12:00Z", "2026-328T12:00Z",
     "2026-11-24T12Z", "2026-11-24T12:00:00+0530", "2026-11-24T12:00:00+05",
     "2026-11-24T12:00:00+24:00", "2026-11-24T12:00:00+05:60", "2026-11-24T12:00:00,5Z",
     "2026-11-24T12:00:00.Z", "yesterday", "", "２０２６-11-24T12:00:00Z", "2026-11-24T12:00:00Z\n",
     "2026-11-24T12:00:00\x00Z"]
)  # fmt: skip
RANDOM_TIMES: Final = st.text(alphabet="0123456789-:TtZz+.,W ", max_size=26)
RFC3339_TIMES: Final = st.builds(
    lambda moment, minutes, zulu: (
        moment.replace(tzinfo=timezone(timedelta(minutes=minutes)))
        .isoformat()
        .replace("+00:00", "Z" if zulu else "+00:00")
    ),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.sampled_from([0, 0, 0, 60, -90, 330, 1439, -1439]),
    st.booleans(),
)  # fmt: skip
TIMES: Final = st.one_of(
    st.just("2026-11-24T12:00:00Z"), st.none(), TIME_TEXTS, RFC3339_TIMES, RANDOM_TIMES
)
ODD_ATTRIBUTES: Final[st.SearchStrategy[Any]] = st.sampled_from(
    ["", "\x00", "a\x00b", "a\ud800", "é", 5, 1.5, True, [], {}, None, "1.0", "0.3", "x" * 257]
)
EXTENSION_NAMES: Final = ["partitionkey", "traceparent", "x1", "Foo", "foo\n", "foo-bar", "",
                          "é", "data_base64", "dataschema", "datacontentencoding"]  # fmt: skip
ACCOUNTS: Final = st.sampled_from(["acct_1", "a", "catalog", "", "x" * 256, "x" * 257, "a\x00",
                                   "a\ud800", "acct_€\nodd", 5])  # fmt: skip
TYPES: Final = [*EVENT_TYPES, "quota.account.exploded"]


@st.composite
def cloud_events(draw: st.DrawFn, event_type: str | None = None) -> dict[str, Any]:
    """A structured-mode event as a JSON object: mostly valid, else with attributes spoilt."""
    event_type = event_type or draw(st.sampled_from(TYPES))
    model = EVENT_TYPES.get(event_type)
    if draw(st.integers(0, 9)) == 0:
        subject: Any = draw(ACCOUNTS)
    else:
        subject = (
            "catalog" if event_type in CATALOG_EVENTS else draw(st.sampled_from(["acct_1", "é"]))
        )
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(st.sampled_from(["e1", "evt-2"]) | st.text(min_size=1, max_size=6)),
        "source": "samples",
        "type": event_type,
        "subject": subject,
        "time": draw(TIMES),
        "datacontenttype": "application/json",
        "data": draw(spoilt_data(model)) if model is not None else {},
    }
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        name = draw(st.sampled_from([*event, *EXTENSION_NAMES]))
        action = draw(st.sampled_from(["delete", "null", "odd", "odd"]))
        if action == "delete":
            event.pop(name, None)
        elif action == "null":
            event[name] = None
        elif name == "data_base64":
            event[name] = draw(st.sampled_from(["eyJhbW91bnQiOiAxfQ==", "", "!!", "e30=", "é", 5]))
        else:
            event[name] = draw(ODD_ATTRIBUTES)
    return event


EXTRA_HEADERS: Final = st.sampled_from(
    [("traceparent", b"00-abc-01"), ("x-raw", b"\xff\xfe"), ("content-type", b"text/plain"),
     ("Content-Type", b"application/cloudevents+json"), ("content-type", b"text/json; x=1"),
     ("ce_partitionkey", b"acct"), ("ce_Foo", b"1"), ("ce_foo-bar", b"1"), ("ce_", b"x"),
     ("ce_data", b"{}"), ("ce_time", b"2026-11-24T12:00:00+01:00"), ("ce_time", b"nope"),
     ("ce_specversion", b"0.3"), ("ce_schemaurl", b""), ("ce_dataschema", b""),
     ("ce_datacontentencoding", b""), ("ce_abc\n", b"1"), ("ce_id", b""), ("ce_subject", b""),
     ("ce_id", b"\xff"), ("CE_TYPE", b"quota.account.opened")]
)  # fmt: skip
#: Binary-mode data as it may arrive (besides the event's own data as JSON).
BODIES: Final = st.sampled_from(
    [b"", b"null", b'"text"', b"[1]", b"5", b"NaN", b"{", b"\xff", b"\xef\xbb\xbf{}", b"  ",
     b'{"amount": NaN}', b'{"amount": Infinity}', b'{"amount": 1e400}', b'{"amount": 1.0}',
     b'{"amount": 18446744073709551616}', b'{"amount": 1, "n": -9223372036854775809}',
     b'{"amount": ' + b"9" * 4301 + b"}", b'{"amount": 1, "s": "\\ud800"}',
     b'{"amount": 1, "s": "\\u0000"}', b'{"amount": 1, "\\u0000": 1}',
     b'{"amount": 1, "a": 1, "a": 2}',
     b'{"amount": 1, "s": "\xed\xa0\x80"}', b'{"amount": 1}' + b" x",
     b'{"amount": 1, "d": ' + b"[" * 200 + b"]" * 200 + b"}", b"[" * 5000 + b"]" * 5000]
)  # fmt: skip


def _header_value(value: Any) -> bytes:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def binary_records(draw: st.DrawFn, event: dict[str, Any]) -> Record:
    """`event` in binary mode: `ce_` headers in any case and order, the data as the value."""
    prefix = draw(st.sampled_from(["ce_", "ce_", "CE_", "Ce_"]))
    headers: Headers = []
    for name, value in event.items():
        if name in ("data", "data_base64") or value is None:
            continue
        if name == "datacontenttype" and draw(st.booleans()):
            headers.append(("content-type", _header_value(value)))
        else:
            headers.append((prefix + name, _header_value(value)))
    headers.extend(draw(st.lists(EXTRA_HEADERS, max_size=2)))
    headers = list(draw(st.permutations(headers)))
    if draw(st.integers(0, 4)) == 0:
        return headers, draw(BODIES)
    data = event.get("data")
    if data is None:
        return headers, draw(st.sampled_from([None, b""]))
    return headers, json.dumps(data).encode("utf-8", "surrogatepass")


#: Structured-mode values as they may arrive besides well-formed events.
POISON: Final = st.sampled_from(
    [None, b"", b"{nope", b"\xff\xfe", b"[1, 2]", b"null", b"1", b'"event"', b"\xef\xbb\xbf{}",
     b'{"specversion": "1.0", "id": "\\ud800", "source": "s", "type": "quota.account.opened"}',
     b'{"specversion": "1.0", "id": "e", "source": "s", "type": "quota.account.opened", '
     b'"subject": "a", "data": {"note": 18446744073709551616, "n": 1e400}}',
     b'{"specversion": "1.0", "id": "e", "source": "s", "type": "quota.account.opened", '
     b'"subject": "a", "data": {"d": ' + b"[" * 1100 + b"]" * 1100 + b"}}"]
)  # fmt: skip


@st.composite
def records(draw: st.DrawFn, event_type: str | None = None) -> Record:
    """A Kafka record: an event in structured or binary mode, or poison."""
    if event_type is None and draw(st.integers(0, 19)) == 0:
        return [], draw(POISON)
    event = draw(cloud_events(event_type))
    if draw(st.booleans()):
        return draw(binary_records(event))
    text = json.dumps(event, ensure_ascii=draw(st.booleans()))
    headers = draw(st.sampled_from([[], [("content-type", b"application/cloudevents+json")],
                                    [("x-raw", b"\xff")]]))  # fmt: skip
    return headers, text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------ the properties


@examples(1500)
@given(record=records())
def test_any_record_gets_the_same_verdict_from_both_decoders(record: Record) -> None:
    assert_same_verdict(record)


@pytest.mark.parametrize("event_type", list(EVENT_TYPES))
@examples(30)
@given(data=st.data())
def test_every_event_type_gets_the_same_verdict(event_type: str, data: st.DataObject) -> None:
    assert_same_verdict(data.draw(records(event_type)))


@pytest.mark.parametrize("event_type", list(EVENT_TYPES))
@examples(40)
@given(data=st.data())
def test_the_struct_accepts_what_the_model_accepts(event_type: str, data: st.DataObject) -> None:
    """No fallback to pydantic for data the model takes: the struct alone gives the same model
    (and refuses what the model refuses), so the hot path stays the fast one."""
    model = EVENT_TYPES[event_type]
    raw = data.draw(spoilt_data(model))
    if _unstorable(raw) is not None:
        return  # refused before any model sees it
    try:
        expected: EventData | None = model.model_validate(raw)
    except ValidationError:
        expected = None
    try:
        got: EventData | None = fast_data(PLANS[event_type], raw)
    except (ValueError, AssertionError):
        got = None
    if expected is None or got is None:
        assert got is expected is None, f"struct: {got!r}, model: {expected!r}"
    else:
        same_model(got, expected)


@examples(400)
@given(text=st.one_of(RFC3339_TIMES, TIME_TEXTS, RANDOM_TIMES))
def test_binary_mode_times_read_as_isoparse_reads_them(text: str) -> None:
    try:
        expected: datetime | str = isoparse(text)
    except (ValueError, OverflowError):
        expected = "refused"
    try:
        got: datetime | str = _header_time(text)
    except Rejection:
        got = "refused"
    assert repr(got) == repr(expected)


FLOAT_TEXTS: Final = st.from_regex(
    r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)


@examples(200)
@given(value=JSON_VALUES, numbers=st.lists(FLOAT_TEXTS, max_size=3))
def test_msgspec_reads_json_as_json_loads(value: Any, numbers: list[str]) -> None:
    """What msgspec reads of binary-mode data, it reads as the SDK's `json.loads` does."""
    text = '{"v": ' + json.dumps(value) + ', "n": [' + ",".join(numbers) + "]}"
    try:
        got = _JSON.decode(text.encode())
    except ValueError:
        return  # the SDK's reader decides
    assert same_json(got, json.loads(text))


# ---------------------------------------------------------------------- each kind, by example

ACCEPTED_EVENT: Final = recharge("acct_1", 5, event_id="e1")


#: JSON nested deeper than orjson (1024 levels) and `json.loads` (the recursion limit) read.
DEEP: Final = b"[" * 5000 + b"]" * 5000


def _with(**attributes: Any) -> bytes:
    return structured({**ACCEPTED_EVENT, **attributes})


def _binary_with(value: bytes | None = None, **headers: bytes) -> Record:
    base, data = binary(ACCEPTED_EVENT)
    named = dict(base)
    named.update({name.replace("__", "-"): raw for name, raw in headers.items()})
    return list(named.items()), data if value is None else value


POISON_RECORDS: Final[list[tuple[str, Record, str]]] = [
    ("not JSON", ([], b"{nope"), "invalid_json"),
    ("empty value", ([], b""), "invalid_json"),
    ("no value", ([], None), "not_cloudevent"),
    ("not UTF-8", ([], b'{"id": "\xff"}'), "invalid_json"),
    ("a UTF-8 BOM", ([], b"\xef\xbb\xbf" + structured(ACCEPTED_EVENT)), "invalid_json"),
    ("not an object", ([], b"[1, 2]"), "not_cloudevent"),
    ("a JSON string", ([], b'"event"'), "not_cloudevent"),
    ("deeply nested, structured", ([], _with(data={"d": 0}).replace(b'"d": 0', DEEP)),
     "invalid_json"),
    ("nested past the limit", ([], _with(data={"amount": 1, "d": nested(40)})), "bad_data"),
    ("a huge int (a float to orjson)", ([], _with(data={"amount": 2**64})), "bad_data"),
    ("a huge extra int", ([], _with(data={"amount": 1, "n": 10**30})), "accepted"),
    ("U+0000 in data", ([], _with(data={"amount": 1, "s": "a\x00"})), "bad_data"),
    ("U+0000 in a key", ([], _with(data={"amount": 1, "\x00": 1})), "bad_data"),
    ("U+0000 in the id", ([], _with(id="e\x00")), "bad_data"),
    ("U+0000 in the subject", ([], _with(subject="a\x00")), "bad_data"),
    ("a lone surrogate (orjson refuses it)", ([], _with(id="e\ud800")), "invalid_json"),
    ("missing id", ([], structured({k: v for k, v in ACCEPTED_EVENT.items() if k != "id"})),
     "not_cloudevent"),
    ("null id", ([], _with(id=None)), "not_cloudevent"),
    ("empty id", ([], _with(id="")), "not_cloudevent"),
    ("an id that is a number", ([], _with(id=5)), "not_cloudevent"),
    ("specversion 0.3, structured", ([], _with(specversion="0.3")), "not_cloudevent"),
    ("missing time", ([], _with(time=None)), "accepted"),
    ("a time without offset", ([], _with(time="2026-11-24T12:00:00")), "not_cloudevent"),
    ("a date for a time", ([], _with(time="2026-11-24")), "not_cloudevent"),
    ("a time that is not one", ([], _with(time="yesterday")), "not_cloudevent"),
    ("a time that is a number", ([], _with(time=1700000000)), "not_cloudevent"),
    ("a time beyond UTC's range", ([], _with(time="9999-12-31T23:59:59-01:00")), "not_cloudevent"),
    ("a bad extension name", ([], _with(Foo="x")), "not_cloudevent"),
    ("an extension name ending in a line break", ([], _with(**{"foo\n": "x"})), "accepted"),
    ("a bad extension name given as null", ([], _with(Foo=None)), "accepted"),
    ("data_base64 that is not base64", ([], _with(data=None, data_base64="e30")), "not_cloudevent"),
    ("data_base64 of no bytes", ([], _with(data=None, data_base64="!")), "bad_data"),
    ("data_base64 (bytes are no object)", ([], _with(data=None, data_base64="e30=")), "bad_data"),
    ("data_base64 that is a number: no data", ([], _with(data=None, data_base64=5)), "bad_data"),
    ("an unknown type", ([], _with(type="quota.account.exploded")), "unknown_type"),
    ("an account event for the catalog", ([], _with(subject="catalog")), "bad_data"),
    ("a subject too long", ([], _with(subject="x" * 257)), "bad_data"),
    ("a float amount", ([], _with(data={"amount": 5.0})), "bad_data"),
    ("a bool amount", ([], _with(data={"amount": True})), "bad_data"),
    ("a numeric string amount", ([], _with(data={"amount": "5"})), "bad_data"),
    ("a key hash with a line break after it",
     ([], structured(token_issued("a", "t", "k", key_sha256="ab" * 32 + "\n"))), "bad_data"),
    ("a CIDR in other form", ([], structured(token_issued("a", "t", "k",
                                                          allowed_cidrs=[" 10.1.2.3/8"]))),
     "accepted"),
    ("binary: broken JSON data", _binary_with(b"{broken"), "invalid_json"),
    ("binary: a JSON string as data", _binary_with(b'"text"'), "invalid_json"),
    ("binary: null data is no data", _binary_with(b"null"), "bad_data"),
    ("binary: NaN in data is kept", _binary_with(b'{"amount": 1, "x": NaN}'), "accepted"),
    ("binary: a lone surrogate in data", _binary_with(b'{"amount": 1, "x": "\\ud800"}'),
     "bad_data"),
    ("binary: deeply nested data", _binary_with(DEEP), "invalid_json"),
    ("binary: text data", _binary_with(b"hello", content__type=b"text/plain"), "bad_data"),
    ("binary: a header that is not UTF-8", _binary_with(traceparent=b"\xff"), "invalid_json"),
    ("binary: specversion 0.3", _binary_with(ce_specversion=b"0.3"), "accepted"),
    ("binary: specversion 2.0", _binary_with(ce_specversion=b"2.0"), "not_cloudevent"),
    ("binary: an empty dataschema", _binary_with(ce_dataschema=b""), "not_cloudevent"),
    ("binary: time at 24:00", _binary_with(ce_time=b"2026-11-24T24:00:00Z"), "accepted"),
    ("binary: a week-date time", _binary_with(ce_time=b"2026-W48-1T12:00+01:00"), "accepted"),
    ("binary: a time without offset", _binary_with(ce_time=b"2026-11-24T12:00:00"),
     "not_cloudevent"),
    ("binary: a reserved extension", _binary_with(ce_data=b"{}"), "not_cloudevent"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("record", "expected"),
    [pytest.param(record, code, id=name) for name, record, code in POISON_RECORDS],
)
def test_each_kind_of_record_gets_its_verdict(record: Record, expected: str) -> None:
    got = assert_same_verdict(record)
    assert (got if isinstance(got, str) else "accepted") == expected


def test_a_header_without_a_value_is_not_a_cloudevent() -> None:
    headers, value = binary(ACCEPTED_EVENT)
    record: Record = ([*headers, ("traceparent", cast(bytes, None))], value)
    assert assert_same_verdict(record) == "not_cloudevent"


def test_binary_times_keep_the_sdk_tzinfo() -> None:
    for text, offset in (("2026-11-24T12:00:00Z", 0), ("2026-11-24T12:00:00+05:30", 330)):
        headers, value = binary({**ACCEPTED_EVENT, "time": text})
        event = decode_record(headers, value)
        assert event == decode_kafka(headers, value)
        assert event.time is not None and event.time.utcoffset() == timedelta(minutes=offset)
        assert type(event.time.tzinfo) is type(isoparse(text).tzinfo)


def test_valid_samples_decode_alike_in_both_modes() -> None:
    for event in (ACCEPTED_EVENT, usage("acct_1", 7, {"model": "gpt-4o"}, event_id="e2"),
                  cloud_event("quota.model.registered", "catalog",
                              {"model": "m", "kind": "chat", "limits": {"n_max": 4}})):  # fmt: skip
        from_structured = decode_record([], structured(event))
        assert from_structured == decode_kafka([], structured(event))
        assert from_structured == decode_record(*binary(event))
        assert from_structured.time == datetime(2026, 11, 24, 12, tzinfo=UTC)


# ------------------------------------------------------------------- the structs and the models


def _plans(plan: DataPlan) -> list[DataPlan]:
    return [plan, *(p for f in plan.fields if f.nested for p in _plans(f.nested))]


#: The fields pydantic validates on the hot path (msgspec cannot state them); any other field is
#: the struct's. A new one here is a choice: teach `data_structs._msgspec_type`, or add it.
PYDANTIC_FIELDS: Final = {
    ("BudgetSet", "timezone"),
    ("TokenIssued", "expires_at"),
    ("TokenIssued", "allowed_cidrs"),
    ("TokenUpdated", "expires_at"),
    ("TokenUpdated", "allowed_cidrs"),
    ("TokenRotated", "previous_valid_until"),
    ("ReservationHeld", "expires_at"),
    ("ChannelProviderRateLimited", "until"),
}


def test_every_model_has_a_struct_with_all_its_fields() -> None:
    adapted = set()
    for plan in (p for root in PLANS.values() for p in _plans(root)):
        assert plan.struct is not None, f"{plan.model.__name__} is validated by pydantic alone"
        assert plan.struct.__struct_fields__ == tuple(plan.model.model_fields)
        assert plan.constructible
        adapted |= {(plan.model.__name__, f.name) for f in plan.fields if f.adapter is not None}
    assert adapted == PYDANTIC_FIELDS


def test_a_field_added_to_a_model_is_in_its_struct() -> None:
    class Grown(events.AccountUsageRecorded):
        region: events.Name | None = None
        weight: Annotated[int, annotated_types.Gt(0)] | None = None  # not strict: pydantic's

    plan = plan_for(Grown)
    assert plan.struct is not None
    assert plan.struct.__struct_fields__ == (*events.AccountUsageRecorded.model_fields, "region",
                                             "weight")  # fmt: skip
    assert [f.name for f in plan.fields if f.adapter is not None] == ["weight"]
    raw = {"amount": 3, "region": "eu", "weight": "7"}
    same_model(fast_data(plan, raw), Grown.model_validate(raw))


def test_construct_is_model_construct() -> None:
    for model, values, fields_set in (
        (events.AccountUsageRecorded, {"amount": 1, "model": None, "request_id": "r",
                                       "token_id": None, "reservation_id": None},
         {"amount", "request_id"}),
        (events.ModelLimits, {"max_prompt_chars": None, "sizes": ["a"], "n_min": None,
                              "n_max": None, "max_input_chars": None}, {"sizes"}),
    ):  # fmt: skip
        built = _construct(model, dict(values), set(fields_set))
        reference = model.model_construct(set(fields_set), **values)
        assert built.__dict__ == reference.__dict__
        assert list(built.__dict__) == list(reference.__dict__)
        same_model(built, reference)
