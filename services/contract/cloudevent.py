"""Reading CloudEvents (Kafka structured and binary mode, or JSON over HTTP) into typed events.

Parsing is the CloudEvents SDK's; this module only maps its failures onto our quarantine
reasons and checks what the SDK cannot know: the type, the subject and the data.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from services.contract.events import CATALOG_EVENTS, CATALOG_SUBJECT, EVENT_TYPES, Event

_FORMAT: Final = JSONFormat()

INVALID_JSON: Final = "invalid_json"
NOT_CLOUDEVENT: Final = "not_cloudevent"
UNKNOWN_TYPE: Final = "unknown_type"
BAD_DATA: Final = "bad_data"
ID_CONFLICT: Final = "id_conflict"

MAX_SUBJECT_CHARS: Final = 256

#: What reading a malformed event can raise besides a `Rejection` (OverflowError: a time or
#: number beyond what Python's types hold).
_NOT_CLOUDEVENT_ERRORS: Final = (
    BaseCloudEventException,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    OverflowError,
)


class Rejection(Exception):
    """An event that cannot be applied; `code` is one of the stable reasons above."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


def canonical_json(value: Any) -> bytes:
    """The one serialisation that is hashed: sorted keys, no spaces, UTF-8.

    orjson writes exactly what `json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` writes, ten times faster; the standard library takes the values orjson
    refuses (integers beyond 64 bits in free-form fields).
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, the form stored and hashed."""
    text = (value if value.tzinfo is UTC else value.astimezone(UTC)).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def content(
    id_: str, source: str, type_: str, subject: str | None, time: str | None, data: Any
) -> dict[str, Any]:
    """The attributes that identify an event's content (what a reused id is compared on, and
    what is hashed), `time` already formatted (`format_time`)."""
    return {"id": id_, "source": source, "type": type_, "subject": subject, "time": time,
            "data": data}  # fmt: skip


def event_content(event: Event) -> dict[str, Any]:
    """`content` of a decoded event."""
    time = format_time(event.time) if event.time is not None else None
    return content(event.id, event.source, event.type, event.subject, time, event.raw_data)


def decode_kafka(headers: Iterable[tuple[str, bytes]], value: bytes | None) -> Event:
    """Decode one Kafka record, structured or binary mode; raise `Rejection` when it can't be."""
    header_map = {name: raw for name, raw in headers}
    binary = any(name.lower().startswith("ce_") for name in header_map)
    if value is None and not binary:
        raise Rejection(NOT_CLOUDEVENT, "empty record value")
    try:
        if binary:
            given = {name.lower()[3:] for name in header_map if name.lower().startswith("ce_")}
            _require(given)
            cloud_event = from_binary(KafkaMessage(header_map, None, value or b""), _FORMAT)
        else:
            cloud_event, given = _from_attributes(orjson.loads(value or b""))
    except UnicodeDecodeError as exc:
        raise Rejection(INVALID_JSON, f"not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise Rejection(INVALID_JSON, str(exc)) from exc
    except RecursionError as exc:  # binary-mode data: the SDK's json.loads, about 1000 levels
        raise Rejection(INVALID_JSON, "data is nested too deeply to parse") from exc
    except _NOT_CLOUDEVENT_ERRORS as exc:
        raise Rejection(NOT_CLOUDEVENT, _describe(exc)) from exc
    data = cloud_event.get_data()
    if binary and isinstance(data, str | bytes) and _is_json(cloud_event):
        raise Rejection(INVALID_JSON, "binary-mode data is not valid JSON")
    return to_event(cloud_event, time_given="time" in given)


def decode_http_object(obj: Any) -> Event:
    """Decode one event given as a parsed JSON value (`POST /events`)."""
    try:
        cloud_event, given = _from_attributes(obj)
    except _NOT_CLOUDEVENT_ERRORS as exc:
        raise Rejection(NOT_CLOUDEVENT, _describe(exc)) from exc
    return to_event(cloud_event, time_given="time" in given)


def _from_attributes(parsed: Any) -> tuple[BaseCloudEvent, set[str]]:
    """A structured-mode event (already parsed JSON) as the SDK's CloudEvent.

    This is the SDK's JSON format reading, with the standard library's RFC 3339 parser in
    place of dateutil's (several times faster on the ledger's hot path); the SDK's event
    class still validates every attribute.
    """
    if not isinstance(parsed, Mapping):
        raise Rejection(NOT_CLOUDEVENT, "an event must be a JSON object")
    # An attribute given as null is an attribute not given.
    attributes = {name: value for name, value in parsed.items() if value is not None}
    given = set(attributes)
    _require(given)
    data = attributes.pop("data", None)
    encoded = attributes.pop("data_base64", None)
    if data is None and isinstance(encoded, str):
        data = base64.b64decode(encoded)
    time = attributes.get("time")
    if isinstance(time, str):
        attributes["time"] = datetime.fromisoformat(time)
    return CloudEvent(attributes, data), given


#: The SDK would invent an `id` (and a `time`) for an event without one; an event without an
#: id could then never be recognised when it is delivered again, so it is not a CloudEvent.
REQUIRED_ATTRIBUTES: Final = ("specversion", "id", "source", "type")


def _require(given: Iterable[str]) -> None:
    missing = [name for name in REQUIRED_ATTRIBUTES if name not in set(given)]
    if missing:
        raise Rejection(NOT_CLOUDEVENT, f"missing required attribute(s): {', '.join(missing)}")


def to_event(cloud_event: BaseCloudEvent, *, time_given: bool) -> Event:
    """Check type, subject and data of an SDK event and build our typed `Event`.

    `time_given` says whether the event carried a time: the SDK fills in the current time
    otherwise, which must not become part of the event's content.
    """
    event_type = cloud_event.get_type()
    model = EVENT_TYPES.get(event_type)
    if model is None:
        raise Rejection(UNKNOWN_TYPE, f"unknown event type {event_type!r}")
    time = cloud_event.get_time() if time_given else None
    if time is not None and time.tzinfo is None:
        raise Rejection(NOT_CLOUDEVENT, "time must be RFC 3339 with a UTC offset")
    if time is not None:
        try:
            time.astimezone(UTC)  # what is stored and hashed: 9999-12-31T23:59-01:00 has none
        except OverflowError:
            raise Rejection(NOT_CLOUDEVENT, "time is out of range once taken to UTC") from None
    subject = cloud_event.get_subject()
    if not subject or len(subject) > MAX_SUBJECT_CHARS:
        raise Rejection(BAD_DATA, f"subject must be 1..{MAX_SUBJECT_CHARS} characters")
    if (event_type in CATALOG_EVENTS) != (subject == CATALOG_SUBJECT):
        expected = f"'{CATALOG_SUBJECT}'" if event_type in CATALOG_EVENTS else "an account id"
        raise Rejection(BAD_DATA, f"subject of {event_type} must be {expected}")
    raw_data = cloud_event.get_data()
    if raw_data is None:
        raw_data = {}
    if not isinstance(raw_data, dict):
        raise Rejection(BAD_DATA, "data must be a JSON object")
    # Such an event could never be stored (or hashed): refuse it here, on every path.
    for text in (cloud_event.get_id(), cloud_event.get_source(), event_type, subject):
        problem = _unstorable_text(text)
        if problem is not None:
            raise Rejection(BAD_DATA, problem)
    problem = _unstorable(raw_data)
    if problem is not None:
        raise Rejection(BAD_DATA, problem)
    try:
        data = model.model_validate(raw_data)
    except ValidationError as exc:
        raise Rejection(BAD_DATA, _describe_validation(exc)) from exc
    return Event(
        id=cloud_event.get_id(),
        source=cloud_event.get_source(),
        type=event_type,
        subject=subject,
        time=time,
        data=data,
        raw_data=raw_data,
    )


#: How deep `data` may nest (the object itself is level 1). Deeper values are refused before
#: they reach code that recurses over them (validation, hashing, the fold), whatever the source.
MAX_DATA_DEPTH: Final = 32


def _unstorable_text(text: str) -> str | None:
    """Why a string could not be stored, or None: PostgreSQL text cannot hold U+0000, and a lone
    surrogate (JSON allows the escape `\\ud800`) is not Unicode that UTF-8 can encode."""
    if "\x00" in text:
        return "a string contains U+0000 (NUL), which cannot be stored"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "a string contains a lone surrogate, which is not valid Unicode"
    return None


def _unstorable(value: Any) -> str | None:
    """Why a JSON value (keys included) could not be stored and hashed, or None.

    Walks the value with an explicit stack: a deeply nested value must not end in a
    RecursionError here."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            problem = _unstorable_text(item)
            if problem is not None:
                return problem
        elif isinstance(item, dict | list):
            if depth > MAX_DATA_DEPTH:
                return f"data is nested deeper than {MAX_DATA_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    problem = _unstorable_text(key) if isinstance(key, str) else None
                    if problem is not None:
                        return problem
                    pending.append((child, depth + 1))
            else:
                pending.extend((child, depth + 1) for child in item)
    return None


def encode_structured(event: Event) -> bytes:
    """The structured-mode JSON we publish for an event accepted over HTTP."""
    body: dict[str, Any] = {"specversion": "1.0", "datacontenttype": "application/json"}
    body.update(event_content(event))
    if body["time"] is None:
        del body["time"]
    return canonical_json(body)


def _is_json(cloud_event: BaseCloudEvent) -> bool:
    content_type = cloud_event.get_datacontenttype() or "application/json"
    return JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(content_type) is not None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(["data", *(str(item) for item in error["loc"])])
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
