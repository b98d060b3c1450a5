"""Audit reads of one account's history: `/accounts/{id}/statement` and `/accounts/{id}/balance`.

An `APIRouter`; the ledger application includes it. Both routes need the admin bearer token
(401 without one, 403 with a wrong one). The semantics are described in `statements`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from services.errors import ApiError, ErrorBody
from services.ledger import statements as st
from services.ledger.api_models import NOT_FOUND, BalanceAsOf, Statement, admin_read
from services.ledger.deps import Admin, LedgerDep

router = APIRouter(tags=["accounts"])

POINT_HELP = (
    "An integer ledger position or an RFC 3339 time with an offset (e.g. 2026-11-24T12:00:00Z)."
)
# Documentation only (the routes answer a bad value with 400 and their own message).
CURSOR_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,18}$"}]}
POINT_SCHEMA: dict[str, Any] = {
    "anyOf": [*CURSOR_SCHEMA["anyOf"], {"type": "string", "format": "date-time"}]
}

STATEMENT_DESCRIPTION = """
Every event of the account in ledger (position) order, with the signed `amount` it moved the
balance (0 for events that do not touch it) and the running `balance` after it.

* `since` is **inclusive**, `until` is **exclusive**; each is an integer position or an RFC 3339
  time. A time bound is resolved in ledger order: the window starts (`since`) or stops (`until`)
  at the account's first event whose time is at or after it (with in-order event times this is
  exactly `since <= time < until`).
* `opening_balance` is the balance after every account event before this page's first position;
  `closing_balance` the balance after this page's last entry (the opening balance if the page is
  empty).
* Pages are by position: `limit` entries (default 500, at most 5000); `next` is an opaque cursor
  to pass as `cursor` (with the same `since`/`until`) for the following page, or null at the end.
* `format=csv` returns `text/csv` with the header row
  `position,time,type,amount,balance,event_id,source` and one row per entry; the cursor is
  in `X-Next-Cursor` and a `Link: <...>; rel="next"` header, the balances in
  `X-Opening-Balance` and `X-Closing-Balance`.
* Times are RFC 3339 in UTC with a `Z`. 400 for a bad bound or cursor; 404 for an account with no
  events.
"""

BALANCE_DESCRIPTION = """
The balance after the account's last event at or before `as_of` (an event exactly at that
position or time counts). `position` is that event's position, or null with `balance` 0 when the
account had no event yet. For a time, events are taken in ledger order up to the account's first
event whose time is after `as_of`. `as_of` is echoed back: an integer for a position, an RFC 3339
UTC time otherwise. 400 for a missing or bad `as_of`; 404 for an account with no events.
"""


def _point(value: str | None, name: str) -> st.Point | None:
    if value is None:
        return None
    try:
        return st.parse_point(value, name)
    except st.BadPoint as exc:
        raise ApiError(400, "invalid_parameter", str(exc)) from None


def _unknown(account_id: str) -> ApiError:
    return ApiError(404, "unknown_account", f"unknown account {account_id}")


@router.get(
    "/accounts/{account_id}/statement",
    dependencies=[Admin],
    summary="An account's statement",
    response_model=None,
    description=STATEMENT_DESCRIPTION,
    responses=admin_read(
        None,
        {
            200: {
                "model": Statement,
                "description": "A page of the statement (JSON, or CSV with `format=csv`)",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            },
            400: {"model": ErrorBody, "description": "Bad `since`, `until` or `cursor`"},
            **NOT_FOUND,
        },
    ),
)
async def get_statement(
    account_id: str,
    request: Request,
    ledger: LedgerDep,
    since: Annotated[
        str | None, Query(description=f"Inclusive. {POINT_HELP}", json_schema_extra=POINT_SCHEMA)
    ] = None,
    until: Annotated[
        str | None, Query(description=f"Exclusive. {POINT_HELP}", json_schema_extra=POINT_SCHEMA)
    ] = None,
    format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
    limit: Annotated[int, Query(ge=1, le=st.MAX_LIMIT)] = st.DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(description="`next` of the previous page", json_schema_extra=CURSOR_SCHEMA),
    ] = None,
) -> dict[str, Any] | Response:
    since_point = _point(since, "since")
    until_point = _point(until, "until")
    try:
        after = st.parse_cursor(cursor) if cursor is not None else None
    except st.BadPoint as exc:
        raise ApiError(400, "invalid_parameter", str(exc)) from None
    async with ledger.pool.acquire() as conn:
        statement = await st.read_statement(
            conn, account_id, since=since_point, until=until_point, limit=limit, cursor=after
        )
    if statement is None:
        raise _unknown(account_id)
    if format == "json":
        return statement.as_json()
    headers = {
        "X-Opening-Balance": str(statement.opening_balance),
        "X-Closing-Balance": str(statement.closing_balance),
    }
    following = st.format_cursor(statement.next)
    if following is not None:
        link = request.url.include_query_params(cursor=following)
        headers["X-Next-Cursor"] = following
        headers["Link"] = f'<{link}>; rel="next"'
    return Response(
        st.csv_rows(statement.entries),
        media_type="text/csv; charset=utf-8",
        headers=headers,
    )


@router.get(
    "/accounts/{account_id}/balance",
    dependencies=[Admin],
    summary="An account's balance at a point in its history",
    description=BALANCE_DESCRIPTION,
    response_model=None,
    responses=admin_read(
        BalanceAsOf,
        {400: {"model": ErrorBody, "description": "Missing or bad `as_of`"}, **NOT_FOUND},
    ),
)
async def get_balance_as_of(
    account_id: str,
    ledger: LedgerDep,
    as_of: Annotated[
        str | None, Query(description=f"Required. {POINT_HELP}", json_schema_extra=POINT_SCHEMA)
    ] = None,
) -> dict[str, Any]:
    if as_of is None or not as_of.strip():
        raise ApiError(
            400,
            "invalid_parameter",
            f"as_of is required: {POINT_HELP[0].lower()}{POINT_HELP[1:]}",
        )
    point = _point(as_of, "as_of")
    assert point is not None
    async with ledger.pool.acquire() as conn:
        result = await st.balance_as_of(conn, account_id, point)
    if result is None:
        raise _unknown(account_id)
    return result.as_json()
