"""RejectNul: the ASGI middleware both services put in front of their routes."""

from __future__ import annotations

from typing import Final

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from services.errors import error_body

_NUL_BODY: Final = orjson.dumps(
    error_body(
        "invalid_request",
        "U+0000 (NUL) is not allowed in a path or query: nothing stored can hold it.",
        "invalid_request_error",
    )
)


class RejectNul:
    """400 for a request whose path or query holds U+0000 (`%00`).

    PostgreSQL text cannot hold U+0000, so no stored id or value has one, and a query that
    carries one fails inside the driver: answer clearly instead, before any route runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")
        ):
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_NUL_BODY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _NUL_BODY})
            return
        await self.app(scope, receive, send)
