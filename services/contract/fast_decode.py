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
    when this module is imported (`_plan`): the same fields, strict integers, bounds, lengths,
    patterns, literals and defaults. A field msgspec cannot state (CIDRs, IANA time zones, aware
    datetimes) is validated by a pydantic `TypeAdapter` of the field's own type, which runs the
    same functions; the models' `mode="after"` validators run on the built model. The model is
    built without validating again (`_construct`). Data the struct refuses goes to the pydantic
    model, which decides and words the rejection.
"""

from __future__ import annotations

import base64
import inspect
import re
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import msgspec
import orjson
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v03 import event as v03
from cloudevents.core.v1 import event as v1
from dateutil import tz
from dateutil.parser import isoparse
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import Strict

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
    _describe_validation,
    _require,
    _unstorable,
    _unstorable_text,
)
from services.contract.events import (
    CATALOG_EVENTS,
    CATALOG_SUBJECT,
    EVENT_TYPES,
    Event,
    EventData,
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


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class FieldPlan:
    """How one field of a model is read from its struct."""

    name: str
    info: FieldInfo
    #: A field that is itself a model (or None): its plan builds it.
    nested: DataPlan | None = None
    #: A field msgspec cannot state: pydantic validates it (the struct passes it on as it is).
    adapter: TypeAdapter[Any] | None = None


@dataclass(frozen=True, slots=True)
class DataPlan:
    """How the data of one model is validated and built; `struct` None: pydantic does it all."""

    model: type[EventData]
    struct: type[msgspec.Struct] | None
    fields: tuple[FieldPlan, ...] = ()
    names: frozenset[str] = frozenset()
    #: Every field is the struct's as it is, with a constant default: the struct's fields are
    #: the model's `__dict__`.
    plain: bool = False
    #: The model's `mode="after"` validators, in pydantic's order.
    validators: tuple[Callable[[Any], Any], ...] = ()
    #: Whether `_construct` builds it the way `model_construct` would.
    constructible: bool = False


def typed_data(plan: DataPlan, raw_data: dict[str, Any]) -> EventData:
    """The model of `raw_data`, as `plan.model.model_validate(raw_data)` returns it."""
    if plan.struct is not None:
        try:
            return _build(plan, msgspec.convert(raw_data, plan.struct), raw_data)
        except (ValueError, AssertionError):  # msgspec's, a TypeAdapter's or a validator's
            pass  # the model decides, and words the rejection
    try:
        return plan.model.model_validate(raw_data)
    except ValidationError as exc:
        raise Rejection(BAD_DATA, _describe_validation(exc)) from exc


def fast_data(plan: DataPlan, raw_data: dict[str, Any]) -> EventData:
    """The model of `raw_data` by the struct alone; raises what it refuses (for the tests)."""
    assert plan.struct is not None
    return _build(plan, msgspec.convert(raw_data, plan.struct), raw_data)


def _build(plan: DataPlan, struct: msgspec.Struct, raw: dict[str, Any]) -> EventData:
    fields_set = set(raw) if plan.names.issuperset(raw) else raw.keys() & plan.names
    if plan.plain:
        values = msgspec.structs.asdict(struct)
    else:
        values = {}
        for field in plan.fields:
            name = field.name
            if name not in raw:
                values[name] = field.info.get_default(
                    call_default_factory=True, validated_data=values
                )
            elif field.adapter is not None:
                values[name] = field.adapter.validate_python(raw[name])
            else:
                value = getattr(struct, name)
                if field.nested is not None and value is not None:
                    value = _build(field.nested, value, raw[name])
                values[name] = value
    if plan.constructible:
        instance = _construct(plan.model, values, fields_set)
    else:
        instance = plan.model.model_construct(fields_set, **values)
    for validator in plan.validators:
        instance = validator(instance)
    return instance


_setattr: Final = object.__setattr__


def _construct(model: type[EventData], values: dict[str, Any], fields_set: set[str]) -> EventData:
    """`model.model_construct(fields_set, **values)` with every field given, for a model without
    aliases, extras kept, private attributes or `model_post_init`: what that ends in, without
    its four microseconds of looking for them."""
    instance = model.__new__(model)
    _setattr(instance, "__dict__", values)
    _setattr(instance, "__pydantic_fields_set__", fields_set)
    _setattr(instance, "__pydantic_extra__", None)
    _setattr(instance, "__pydantic_private__", None)
    return instance


class _Untranslatable(Exception):
    """A type or constraint that msgspec cannot state with pydantic's meaning."""


_BOUNDS: Final[dict[type[Any], str]] = {
    annotated_types.Gt: "gt",
    annotated_types.Ge: "ge",
    annotated_types.Lt: "lt",
    annotated_types.Le: "le",
    annotated_types.MultipleOf: "multiple_of",
    annotated_types.MinLen: "min_length",
    annotated_types.MaxLen: "max_length",
}
_INT_CONSTRAINTS: Final = frozenset({"gt", "ge", "lt", "le", "multiple_of"})
_STR_CONSTRAINTS: Final = frozenset({"min_length", "max_length", "pattern"})
_LIST_CONSTRAINTS: Final = frozenset({"min_length", "max_length"})
#: Patterns whose meaning is the same in pydantic's regex engine (Rust's) and Python's `re` once
#: a final `$` (end of text there, before a final line break here) is written `\Z`.
_PORTABLE_PATTERN: Final = re.compile(r"\^?[A-Za-z0-9\[\]{},/_-]*\$?")
_CONSTANT_DEFAULTS: Final = (type(None), str, int, bool)
_CONFIG_KEYS: Final = frozenset({"extra", "frozen", "title"})


def _constraints(metadata: Iterable[Any]) -> tuple[bool, dict[str, Any]]:
    """Whether `Strict` is among pydantic's metadata, and the rest as `msgspec.Meta` keywords."""
    strict = False
    meta: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            inner_strict, inner = _constraints(item.metadata)
            strict = strict or inner_strict
            meta.update(inner)
        elif isinstance(item, Strict):
            strict = item.strict
        elif type(item) in _BOUNDS:
            keyword = _BOUNDS[type(item)]
            meta[keyword] = getattr(item, keyword)
        elif isinstance(item, annotated_types.BaseMetadata) and vars(item).keys() == {"pattern"}:
            pattern = vars(item)["pattern"]
            if not isinstance(pattern, str) or _PORTABLE_PATTERN.fullmatch(pattern) is None:
                raise _Untranslatable(f"pattern {pattern!r}")
            meta["pattern"] = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
        else:
            raise _Untranslatable(repr(item))
    return strict, meta


def _msgspec_type(annotation: Any, metadata: list[Any]) -> Any:
    """The msgspec type that accepts exactly what pydantic accepts for a JSON value."""
    if get_origin(annotation) is Annotated:
        base, *more = get_args(annotation)
        return _msgspec_type(base, [*more, *metadata])
    strict, meta = _constraints(metadata)
    origin = get_origin(annotation)
    constrained = strict or bool(meta)
    if annotation is type(None) and not constrained:
        return annotation
    if origin in (Union, types.UnionType) and not constrained:
        return Union[tuple(_msgspec_type(arg, []) for arg in get_args(annotation))]  # noqa: UP007
    if origin is Literal and not constrained:
        if all(type(choice) is str for choice in get_args(annotation)):
            return annotation
    elif origin is list and meta.keys() <= _LIST_CONSTRAINTS:
        (item,) = get_args(annotation)
        items = types.GenericAlias(list, (_msgspec_type(item, []),))
        return Annotated[items, msgspec.Meta(**meta)] if meta else items
    elif annotation is int and strict and meta.keys() <= _INT_CONSTRAINTS:
        return Annotated[int, msgspec.Meta(**meta)] if meta else int
    elif annotation is str and strict and meta.keys() <= _STR_CONSTRAINTS:
        return Annotated[str, msgspec.Meta(**meta)] if meta else str
    elif isinstance(annotation, type) and issubclass(annotation, EventData) and not constrained:
        nested = plan_for(annotation)
        if nested.struct is not None:
            return nested.struct
    raise _Untranslatable(repr(annotation))


def _nested_model(annotation: Any) -> type[EventData] | None:
    """The model a field holds (`Model` or `Model | None`), if it holds one."""
    choices = (
        get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    ) or (annotation,)
    models = [c for c in choices if isinstance(c, type) and issubclass(c, EventData)]
    return models[0] if len(models) == 1 else None


def _after_validators(model: type[EventData]) -> tuple[Callable[[Any], Any], ...] | None:
    """The model's validators if all are `mode="after"` ones taking the model alone, else None."""
    decorators = model.__pydantic_decorators__
    if decorators.validators or decorators.field_validators or decorators.root_validators:
        return None
    found = []
    for decorator in decorators.model_validators.values():
        func = decorator.func
        if decorator.info.mode != "after" or len(inspect.signature(func).parameters) != 1:
            return None
        found.append(func)
    return tuple(found)


_PLANS_BY_MODEL: dict[type[EventData], DataPlan] = {}


def plan_for(model: type[EventData]) -> DataPlan:
    """The plan of a model: its struct generated from its fields (memoised)."""
    plan = _PLANS_BY_MODEL.get(model)
    if plan is None:
        plan = _PLANS_BY_MODEL[model] = _plan(model)
    return plan


def _plan(model: type[EventData]) -> DataPlan:
    config = model.model_config
    validators = _after_validators(model)
    if (
        validators is None
        or not config.keys() <= _CONFIG_KEYS
        or config.get("extra", "ignore") != "ignore"
        or any(f.alias or f.validation_alias for f in model.model_fields.values())
    ):
        return DataPlan(model, None)
    fields = []
    struct_fields: list[tuple[str, Any, Any]] = []
    plain = True
    for name, info in model.model_fields.items():
        try:
            field_type = _msgspec_type(info.annotation, list(info.metadata))
            nested_model = _nested_model(info.annotation)
            field = FieldPlan(
                name, info, nested=plan_for(nested_model) if nested_model is not None else None
            )
        except _Untranslatable:
            field_type = Any
            form: Any = info.annotation
            if info.metadata:
                form = Annotated.__class_getitem__((form, *info.metadata))  # type: ignore[attr-defined]
            adapter: TypeAdapter[Any] = TypeAdapter(form)
            field = FieldPlan(name, info, adapter=adapter)
        fields.append(field)
        plain = plain and field.nested is None and field.adapter is None
        if info.is_required():
            struct_fields.append((name, field_type, msgspec.NODEFAULT))
        elif info.default_factory is None and isinstance(info.default, _CONSTANT_DEFAULTS):
            struct_fields.append((name, field_type, info.default))
        else:  # the real default comes from the model (`FieldInfo.get_default`)
            struct_fields.append((name, field_type, None))
            plain = False
    struct = msgspec.defstruct(
        f"{model.__name__}Struct",
        [(name, tp) if default is msgspec.NODEFAULT else (name, tp, default)
         for name, tp, default in struct_fields],
        kw_only=True,
        frozen=True,
        module=__name__,
    )  # fmt: skip
    constructible = (
        not model.__private_attributes__
        and model.__pydantic_post_init__ is None
        and not model.__pydantic_root_model__
    )
    return DataPlan(
        model,
        struct,
        tuple(fields),
        frozenset(model.model_fields),
        plain,
        validators,
        constructible,
    )


#: Every event type's plan.
PLANS: Final[dict[str, DataPlan]] = {name: plan_for(model) for name, model in EVENT_TYPES.items()}
