"""The ledger's admin page: `/ui` and its static assets (served without auth; the page sends
the admin token it is given as a bearer token), and the account search it uses."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from services.errors import ApiError, ErrorBody
from services.ledger.api_models import BAD_REQUEST, AccountSearch, admin_read
from services.ledger.deps import Admin, LedgerDep
from services.store import projections

router = APIRouter()

#: The page's files, by the name they are served under; nothing else in the folder is served.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}

# Everything comes from this origin: the page works offline and injected markup cannot load code.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

MAX_SEARCH_RESULTS = 100


def _static(name: str) -> bytes:
    return resources.files("services.ledger").joinpath("ui_static", name).read_bytes()


@router.get(
    "/ui",
    tags=["ui"],
    response_class=HTMLResponse,
    responses={200: {"description": "The admin page"}},
)
async def ui_page() -> Response:
    """The admin page (no auth: it holds no data until the token is entered)."""
    return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                    headers=SECURITY_HEADERS)  # fmt: skip


@router.get(
    "/ui/static/{name}",
    tags=["ui"],
    response_model=None,
    response_class=Response,
    responses={
        200: {
            "description": "One of the page's scripts or its stylesheet",
            "content": {
                media_type.split(";")[0]: {"schema": {"type": "string"}}
                for media_type in ASSETS.values()
            },
        },
        **BAD_REQUEST,
        404: {"model": ErrorBody, "description": "No such asset"},
    },
)
async def ui_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", "no such asset")
    return Response(_static(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get(
    "/accounts",
    dependencies=[Admin],
    tags=["accounts"],
    response_model=None,
    responses=admin_read(AccountSearch),
)
async def search_accounts(
    ledger: LedgerDep,
    prefix: Annotated[str, Query(max_length=200, description="account ids starting with")] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_RESULTS)] = 20,
) -> dict[str, Any]:
    """Accounts whose id starts with `prefix`, ordered by id."""
    async with ledger.pool.acquire() as conn:
        found = await projections.accounts_starting_with(conn, prefix, limit)
    return {
        "items": [
            {"account_id": a.account_id, "balance": a.balance, "status": a.status} for a in found
        ]
    }
