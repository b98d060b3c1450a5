"""A FastAPI proxy in front of an OpenAI-compatible upstream, metered by quota (docs/client.md).

    QUOTA_POLICY_URL=http://127.0.0.1:8081 QUOTA_SERVICE_TOKEN=... \
    QUOTA_LEDGER_URL=http://127.0.0.1:8080 QUOTA_ADMIN_TOKEN=... \
    UPSTREAM_URL=https://api.openai.com UPSTREAM_API_KEY=sk-... \
    uvicorn --factory examples.fastapi_proxy:from_env

Each request is authorized with an estimated cost (its `max_tokens`, else 1,024), held while the
upstream works; the upstream's `usage.total_tokens` settles the hold, a failure releases it.
"""

from __future__ import annotations

import contextlib
import os

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.client import AsyncQuotaClient, FailMode, QuotaError

DEFAULT_ESTIMATE = 1_024


def create_app(quota: AsyncQuotaClient, upstream: httpx.AsyncClient) -> FastAPI:
    """The proxy: `quota` decides and records, `upstream` (with its own key) answers."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        decision = await quota.authorize(
            request.headers.get("authorization"), model=body.get("model"),
            route=request.url.path, client_ip=request.client.host if request.client else None,
            estimated_cost=body.get("max_tokens") or DEFAULT_ESTIMATE,
        )  # fmt: skip
        if not decision.allowed:  # the policy's answer, as the client should get it
            return JSONResponse(dict(decision.raw), decision.status, dict(decision.headers))
        try:
            answer = await upstream.post(request.url.path, json=body)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            if decision.reservation is not None:  # nothing was used: free the hold now
                with contextlib.suppress(QuotaError):  # else it ends at its TTL
                    await quota.release(decision.reservation.id)
            error = {"message": f"upstream failed: {exc}", "type": "upstream_error"}
            return JSONResponse({"error": error}, 502)
        result = answer.json()
        await quota.settle(decision, result["usage"]["total_tokens"])
        return JSONResponse(result, answer.status_code)

    return app


def from_env() -> FastAPI:
    """The proxy configured by the environment variables above (`uvicorn --factory`)."""
    env = os.environ
    quota = AsyncQuotaClient(
        env["QUOTA_POLICY_URL"], fail_mode=FailMode.CLOSED,
        service_token=env.get("QUOTA_SERVICE_TOKEN"),
        ledger_url=env["QUOTA_LEDGER_URL"], ledger_token=env.get("QUOTA_ADMIN_TOKEN"),
    )  # fmt: skip
    key = env["UPSTREAM_API_KEY"]
    upstream = httpx.AsyncClient(
        base_url=env["UPSTREAM_URL"], headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    return create_app(quota, upstream)
