"""`quota statement ACCOUNT [--since] [--until] [--format json|csv]`: the whole statement.

The same semantics as `GET /accounts/{id}/statement` (see `statements`), read straight from the
database at QUOTA_DATABASE_URL; every page is fetched, so the output holds the whole window and
`next` is null. Exit codes: 0 printed, 1 unknown account, 2 bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys

from services.ledger import statements as st
from services.settings import Settings, asyncpg_dsn
from services.store.db import create_pool

PAGE_SIZE = st.MAX_LIMIT


def statement_command(account: str, since: str | None, until: str | None, fmt: str) -> int:
    """Print the account's statement to stdout as JSON or CSV; return the exit code."""
    if fmt not in ("json", "csv"):
        print(f"--format must be json or csv, got {fmt!r}", file=sys.stderr)
        return 2
    try:
        since_point = st.parse_point(since, "--since") if since is not None else None
        until_point = st.parse_point(until, "--until") if until is not None else None
    except st.BadPoint as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return asyncio.run(_run(account, since_point, until_point, fmt))


async def _run(account: str, since: st.Point | None, until: st.Point | None, fmt: str) -> int:
    pool = await create_pool(asyncpg_dsn(Settings().database_url), max_size=1)
    try:
        async with pool.acquire() as conn:
            first = await st.read_statement(
                conn, account, since=since, until=until, limit=PAGE_SIZE
            )
            if first is None:
                print(f"unknown account {account}", file=sys.stderr)
                return 1
            if fmt == "csv":
                sys.stdout.write(st.csv_rows(first.entries))
            entries = list(first.entries) if fmt == "json" else []
            page = first
            while page.next is not None:
                following = await st.read_statement(
                    conn, account, since=since, until=until, limit=PAGE_SIZE, cursor=page.next
                )
                assert following is not None
                page = following
                if fmt == "csv":
                    sys.stdout.write(st.csv_rows(page.entries, header=False))
                else:
                    entries.extend(page.entries)
    finally:
        await pool.close()
    if fmt == "json":
        whole = st.Statement(account, first.opening_balance, page.closing_balance, entries, None)
        print(json.dumps(whole.as_json(), indent=2))
    sys.stdout.flush()
    return 0
