"""Decoding Kafka records on the ledger's hot path: orjson and msgspec, the SDK path's verdicts.

`decode_record(headers, value)` is `cloudevent.decode_kafka` without the CloudEvents SDK's event
object and without pydantic validating the data: the same `Event` for every record that accepts,
and a `Rejection` with the same code for every record it refuses (the `detail` may be worded
otherwise). tests/contract/test_fast_decode.py holds the two to that. `decode_kafka` stays what
`POST /events` and the producers' side use.

Envelope
    Structured mode is parsed by orjson, as before (so huge integers, depth and escapes read the
    same), and its attributes are checked by converting them into `_StructuredEvent`: the SDK's
    rules for CloudEvents 1.0 (required attributes non-empty strings, `specversion` "1.0",
    optional ones non-empty strings when given, an attribute given as null not given at all).
    Binary mode reads the `ce_` headers as the SDK's Kafka binding does (every header value must
    be UTF-8, `content-type` is `datacontenttype`, a `ce_specversion` of "0.3" is a CloudEvents
    0.3 event) and checks them with `_Attributes` or `_AttributesV03`. Extension attribute names
    follow the SDK's `^[a-z0-9]+$` (a trailing line break passes, as there).
`time`
    Structured mode: `datetime.fromisoformat`, as before. Binary mode: the SDK uses dateutil's
    `isoparse`; the usual `2026-11-24T12:00:00Z` (UTC, up to six fraction digits) is parsed by the
    standard library into the same value with the same `tzinfo`, anything else by `isoparse`.
Binary-mode data
    The SDK reads JSON data with `json.loads`; msgspec reads the same value for the JSON it
    accepts, and anything it refuses (NaN, lone surrogates, numbers beyond a float) goes to the
    SDK's own `read_data`.
Data
    One msgspec struct per event data model, generated from the pydantic models of `events.py`
    (`services.contract.data_structs`); data a struct refuses goes to the pydantic model, which
    decides and words the rejection.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
import orjson
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v03 import event as v03
from cloudevents.core.v1 import event as v1
from dateutil import tz
from dateutil.parser import isoparse

from services.contract.cloudevent import (
    _NOT_CLOUDEVENT_ERRORS,
    BAD_DATA,
    INVALID_JSON,
    MAX_DATA_DEPTH,
    MAX_SUBJECT_CHARS,
    NOT_CLOUDEVENT,
    REQUIRED_ATTRIBUTES,
    UNKNOWN_TYPE,
    Rejection,
    _describe,
    _require,
    _unstorable,
    _unstorable_text,
)
from services.contract.data_structs import PLANS, typed_data
from services.contract.events import (
    CATALOG_EVENTS,
    CATALOG_SUBJECT,
    Event,
)

_FORMAT: Final = JSONFormat()
_JSON: Final = msgspec.json.Decoder()
_T = TypeVar("_T")

# ------------------------------------------------------------------------------------ envelope

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Attributes(msgspec.Struct, frozen=True, gc=False):
    """The attributes CloudEvents 1.0 defines, as the SDK's `CloudEvent` checks them.

    `time` is a string here; it is parsed apart (and its type is all the SDK checks)."""

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    subject: _NonEmpty | None = None
    time: str | None = None
    datacontenttype: _NonEmpty | None = None
    dataschema: _NonEmpty | None = None


class _StructuredEvent(_Attributes, frozen=True, gc=False):
    """A structured-mode event: the attributes and the two ways of giving the data."""

    data: Any = None
    data_base64: Any = None


class _AttributesV03(msgspec.Struct, frozen=True, gc=False):
    """The attributes of CloudEvents 0.3, which the SDK's Kafka binding takes in binary mode."""

    specversion: Literal["0.3"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    subject: _NonEmpty | None = None
    time: str | None = None
    datacontenttype: _NonEmpty | None = None
    datacontentencoding: _NonEmpty | None = None
    schemaurl: _NonEmpty | None = None


#: The attribute names each version defines (the SDK's lists); any other is an extension.
V1_ATTRIBUTES: Final = frozenset(v1.REQUIRED_ATTRIBUTES + v1.OPTIONAL_ATTRIBUTES)
V03_ATTRIBUTES: Final = frozenset(v03.REQUIRED_ATTRIBUTES + v03.OPTIONAL_ATTRIBUTES)
_STRUCTURED_KEYS: Final = V1_ATTRIBUTES | {"data", "data_base64"}
_REQUIRED: Final = frozenset(REQUIRED_ATTRIBUTES)

#: The SDK's rule for extension attribute names, `re.match` and `$` as there.
_EXTENSION_NAME: Final = re.compile(r"^[a-z0-9]+$")

#: The `ce_time` the standard library reads exactly as `isoparse` does (UTC only: `isoparse`
#: gives `tz.UTC` there, and `tzoffset` objects for other offsets).
_UTC_TIME: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-]00:00)"
)


def decode_record(headers: Iterable[tuple[str, bytes]], value: bytes | None) -> Event:
    """Decode one Kafka record, structured or binary mode; raise `Rejection` when it can't be.

    The same result as `cloudevent.decode_kafka(headers, value)`, in half the time."""
    header_map = {name: raw for name, raw in headers}
    if header_map:
        lowered = [name.lower() for name in header_map]
        given = {name[3:] for name in lowered if name.startswith("ce_")}
        if given:  # any `ce_` header: binary mode
            return _binary(header_map, lowered, given, value)
    return _structured(value)


def _structured(value: bytes | None) -> Event:
    if value is None:
        raise Rejection(NOT_CLOUDEVENT, "empty record value")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise Rejection(INVALID_JSON, str(exc)) from exc
    if not isinstance(parsed, dict):
        raise Rejection(NOT_CLOUDEVENT, "an event must be a JSON object")
    try:
        event = msgspec.convert(parsed, _StructuredEvent)
    except msgspec.ValidationError as exc:
        # An attribute given as null is an attribute not given.
        _require({name for name, given in parsed.items() if given is not None})
        raise Rejection(NOT_CLOUDEVENT, f"bad attribute: {exc}") from exc
    if not _STRUCTURED_KEYS.issuperset(parsed):
        _check_extensions(
            name
            for name, given in parsed.items()
            if given is not None and name not in _STRUCTURED_KEYS
        )
    time = None
    if event.time is not None:
        time = _aware(_parse(datetime.fromisoformat, event.time))
    data = event.data
    if data is None and isinstance(event.data_base64, str):
        data = _parse(base64.b64decode, event.data_base64)
    return _event(
        event.type, event.id, event.source, event.subject, time, data, clean=_plain_json(value)
    )


def _binary(
    header_map: dict[str, bytes], lowered: list[str], given: set[str], value: bytes | None
) -> Event:
    """Binary mode; `lowered` are the header names in lower case, `given` the attributes."""
    if not _REQUIRED.issubset(given):
        _require(given)
    attributes: dict[str, str] = {}
    time = None
    for name, raw in zip(lowered, header_map.values(), strict=True):
        try:
            text = raw.decode("utf-8")  # every header, as the SDK does
        except UnicodeDecodeError as exc:
            raise Rejection(INVALID_JSON, f"not UTF-8: {exc}") from exc
        except AttributeError as exc:  # a header without a value
            raise Rejection(NOT_CLOUDEVENT, _describe(exc)) from exc
        if name.startswith("ce_"):
            attribute = name[3:]
            if attribute == "time":
                time = _header_time(text)
            attributes[attribute] = text
        elif name == "content-type":
            attributes["datacontenttype"] = text
    content_type = attributes.get("datacontenttype")
    data, clean = _binary_data(value or b"", content_type)
    envelope: _Attributes | _AttributesV03
    try:
        if attributes["specversion"] == "0.3":
            envelope, known = msgspec.convert(attributes, _AttributesV03), V03_ATTRIBUTES
        else:
            envelope, known = msgspec.convert(attributes, _Attributes), V1_ATTRIBUTES
    except msgspec.ValidationError as exc:
        raise Rejection(NOT_CLOUDEVENT, f"bad attribute: {exc}") from exc
    if not known.issuperset(attributes):
        _check_extensions(name for name in attributes if name not in known)
    if time is not None:
        _aware(time)
    if isinstance(data, str | bytes) and _is_json(content_type):
        raise Rejection(INVALID_JSON, "binary-mode data is not valid JSON")
    return _event(
        envelope.type, envelope.id, envelope.source, envelope.subject, time, data, clean=clean
    )


def _parse(parse: Callable[[str], _T], text: str) -> _T:
    try:
        return parse(text)
    except _NOT_CLOUDEVENT_ERRORS as exc:
        raise Rejection(NOT_CLOUDEVENT, _describe(exc)) from exc


def _aware(time: datetime) -> datetime:
    if time.tzinfo is None:
        raise Rejection(NOT_CLOUDEVENT, "Attribute 'time' must be timezone aware")
    return time


def _header_time(text: str) -> datetime:
    """`ce_time` as the SDK's Kafka binding reads it (`isoparse`)."""
    if _UTC_TIME.fullmatch(text) is not None:
        try:
            naive = datetime.fromisoformat(text[:-1] if text[-1] == "Z" else text[:-6])
        except ValueError:
            pass  # 24:00:00, a 30 February: `isoparse` decides
        else:
            time: datetime = datetime.combine(naive.date(), naive.time(), tz.UTC)
            return time
    parsed: datetime = _parse(isoparse, text)
    return parsed


def _check_extensions(names: Iterable[str]) -> None:
    for name in names:
        if name == "data" or _EXTENSION_NAME.match(name) is None:
            raise Rejection(NOT_CLOUDEVENT, f"invalid extension attribute name {name!r}")


def _is_json(content_type: str | None) -> bool:
    pattern = JSONFormat.JSON_CONTENT_TYPE_PATTERN
    return pattern.match(content_type or JSONFormat.DEFAULT_CONTENT_TYPE) is not None


def _binary_data(body: bytes, content_type: str | None) -> tuple[Any, bool]:
    """The data as the SDK's `read_data` reads it, and whether `_plain_json` vouches for it."""
    if not body:
        return None, True
    if _is_json(content_type):
        try:
            return _JSON.decode(body), _plain_json(body)
        except (msgspec.DecodeError, RecursionError):
            pass
    try:
        return _FORMAT.read_data(body, content_type), False
    except RecursionError as exc:  # json.loads: as decode_kafka words it
        raise Rejection(INVALID_JSON, "data is nested too deeply to parse") from exc


def _plain_json(text: bytes) -> bool:
    """Whether JSON text that orjson or msgspec parsed certainly holds nothing `_unstorable`
    refuses: neither refuses a lone surrogate, JSON writes U+0000 only as the escape, and
    there are too few brackets to nest too deep."""
    return b"\\u0000" not in text and text.count(b"{") + text.count(b"[") <= MAX_DATA_DEPTH


def _event(
    event_type: str,
    event_id: str,
    source: str,
    subject: str | None,
    time: datetime | None,
    data: Any,
    *,
    clean: bool,
) -> Event:
    """`cloudevent.to_event` on checked attributes, in its order of checks."""
    plan = PLANS.get(event_type)
    if plan is None:
        raise Rejection(UNKNOWN_TYPE, f"unknown event type {event_type!r}")
    if time is not None and time.year in (1, 9999):  # only there can UTC leave the range
        try:
            time.astimezone(UTC)
        except OverflowError:
            raise Rejection(NOT_CLOUDEVENT, "time is out of range once taken to UTC") from None
    if not subject or len(subject) > MAX_SUBJECT_CHARS:
        raise Rejection(BAD_DATA, f"subject must be 1..{MAX_SUBJECT_CHARS} characters")
    if (event_type in CATALOG_EVENTS) != (subject == CATALOG_SUBJECT):
        expected = f"'{CATALOG_SUBJECT}'" if event_type in CATALOG_EVENTS else "an account id"
        raise Rejection(BAD_DATA, f"subject of {event_type} must be {expected}")
    raw_data = {} if data is None else data
    if not isinstance(raw_data, dict):
        raise Rejection(BAD_DATA, "data must be a JSON object")
    texts = event_id + source + subject  # the type is one of ours
    if "\x00" in texts or not texts.isascii():
        for text in (event_id, source, subject):
            problem = _unstorable_text(text)
            if problem is not None:
                raise Rejection(BAD_DATA, problem)
    if not clean:
        problem = _unstorable(raw_data)
        if problem is not None:
            raise Rejection(BAD_DATA, problem)
    return Event(
        id=event_id,
        source=source,
        type=event_type,
        subject=subject,
        time=time,
        data=typed_data(plan, raw_data),
        raw_data=raw_data,
    )
