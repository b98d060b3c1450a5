"""The typed data of every event type as msgspec structs, generated from the pydantic models of
`events.py` when this module is imported (`plan_for`): the same fields, strict integers,
bounds, lengths, patterns, literals and defaults. A field msgspec cannot state (CIDRs, IANA
time zones, aware datetimes) is validated by a pydantic `TypeAdapter` of the field's own type,
which runs the same functions; the models' `mode="after"` validators run on the built model.
The model is built without validating again (`_construct`). Data the struct refuses goes to
the pydantic model (`typed_data`), which decides and words the rejection. Used by
`fast_decode.decode_record`, the ledger's decoder.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic.types import Strict

from services.contract.cloudevent import (
    BAD_DATA,
    Rejection,
    _describe_validation,
)
from services.contract.events import (
    EVENT_TYPES,
    EventData,
)


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
