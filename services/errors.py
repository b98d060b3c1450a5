"""One error shape for both services: every error answer carries an `error` object.

    {"error": {"code": "unknown_account", "message": "unknown account acct_9",
               "type": "not_found_error", "details": null}}

`code` is a stable name to branch on, `message` is for people, `type` the class of error
(the same classes as the decisions' error table), `details` a list when there is more to say
(the invalid events of `POST /events`, the fields a request got wrong). A denied decision
(`POST /authorize`, CONTRACT section 3) carries the same object with `reason` in it, beside
`"allowed": false` and `position`. Exceptions become this shape in one place per app
(`install`): `ApiError`, HTTP errors raised by the framework, and request validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

#: An error's `type` by HTTP status, where the raiser does not name one.
TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}
#: An error's `code` by HTTP status, for errors raised by the framework itself.
CODES: Final[Mapping[int, str]] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request",
    503: "unavailable",
}


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    type: str
    details: list[Any] | None = None


class ErrorBody(BaseModel):
    """Every error answer of both services (decisions add `allowed`, `position` and
    `error.reason`)."""

    model_config = ConfigDict(extra="allow")

    error: ErrorInfo


class ApiError(Exception):
    """An error answer, raised anywhere below a route."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str | None = None,
        details: list[Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_ or TYPES.get(status, "api_error")
        self.details = details
        self.headers = dict(headers or {})


def error_body(
    code: str, message: str, type_: str, details: list[Any] | None = None
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_, "details": details}}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    type_: str | None = None,
    details: list[Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = error_body(code, message, type_ or TYPES.get(status, "api_error"), details)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.code,
        exc.message,
        type_=exc.type,
        details=exc.details,
        headers=exc.headers,
    )


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(
        exc.status_code,
        CODES.get(exc.status_code, "http_error"),
        message,
        headers=exc.headers,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = jsonable_encoder(exc.errors())
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    message = f"{where}: {first.get('msg', 'invalid')}"
    return error_response(422, "invalid_request", message, details=problems)


def install(app: FastAPI) -> None:
    """Answer `ApiError`, the framework's HTTP errors and request validation in the one shape,
    and say so in the OpenAPI schema (FastAPI's default 422 model becomes `ErrorBody`)."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            if "HTTPValidationError" in components:
                components["HTTPValidationError"] = ErrorBody.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
                components.setdefault(
                    "ErrorInfo",
                    ErrorInfo.model_json_schema(ref_template="#/components/schemas/{model}"),
                )
                components["HTTPValidationError"].pop("$defs", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
