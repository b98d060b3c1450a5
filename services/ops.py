"""The operations routes both services serve the same way: `/healthz`, `/readyz` (from the
service's own readiness check) and `/metrics` (Prometheus text)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from services.supervise import Readiness


class Health(BaseModel):
    status: str


def add_ops_routes(
    app: FastAPI, readiness: Callable[[Request], Awaitable[Readiness]], not_ready: str
) -> None:
    """Register the three routes; `readiness` decides `/readyz` (200 when ready, else 503 with
    the reason), `not_ready` documents its 503."""

    @app.get("/healthz", tags=["ops"], response_model=None, responses={200: {"model": Health}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": not_ready}},
    )
    async def readyz(request: Request) -> JSONResponse:
        ready = await readiness(request)
        status = 200 if ready.ready else 503
        return JSONResponse(ready.model_dump(exclude_none=True), status_code=status)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
