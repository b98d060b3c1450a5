"""Helpers for the JSON schemas both services put into their OpenAPI documents by hand
(`openapi_extra`), where pydantic's `$defs` cannot go."""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel

#: Bounds at or beyond this are not exact once FastAPI's OpenAPI models turn them into floats
#: (2**63 - 1 would read 2**63): such a bound is written as `format: int64` instead.
_EXACT_FLOAT_LIMIT: Final = 2**53


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$ref` into its `$defs` replaced by the definition,
    and int64 bounds written as `format: int64` (see `_EXACT_FLOAT_LIMIT`)."""
    schema = model.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


def _inline(schema: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _inline(definitions[ref.removeprefix("#/$defs/")], definitions)
    out = {key: _inline(value, definitions) for key, value in schema.items() if key != "$defs"}
    if out.get("type") == "integer":
        for bound in ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum"):
            value = out.get(bound)
            if isinstance(value, int) and abs(value) >= _EXACT_FLOAT_LIMIT:
                del out[bound]
                out["format"] = "int64"
    return out
