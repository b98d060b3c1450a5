"""The `quota` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
import uvicorn
from fastapi import FastAPI

from services import tracing
from services.ledger.keys_cli import key_app
from services.logs import configure_logging
from services.settings import Settings

app = typer.Typer(help="Event-sourced quota and permission service.", no_args_is_help=True)
app.add_typer(key_app, name="key")

Host = Annotated[str, typer.Option(help="Address to listen on.")]


@app.command()
def migrate() -> None:
    """Bring the database at QUOTA_DATABASE_URL to the newest schema."""
    from services.migrate import upgrade

    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    upgrade(settings.database_url)
    typer.echo("database is at the newest schema")


def _serve(
    create_app: Callable[[Settings], FastAPI], host: str, port: int, *, gateways: bool = False
) -> None:
    """A production process: settings from the environment, its secrets checked (the ledger's
    admin token; for `gateways`, the policy service, the service token), traces when
    QUOTA_OTEL_ENABLED, one server."""
    settings = Settings()
    settings.check_secrets(admin=not gateways, gateways=gateways)
    configure_logging(settings.log_level, settings.log_json)
    tracing.configure(settings, "quota-policy" if gateways else "quota-ledger")
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        # A JSON line per request costs more than a decision; /metrics counts them instead.
        access_log=settings.access_log,
    )


@app.command()
def ledger(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Consume the event topic into PostgreSQL and serve the ledger API."""
    from services.ledger.app import create_app

    _serve(create_app, host, port)


@app.command()
def policy(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
) -> None:
    """Answer /authorize from an in-memory snapshot kept fresh by the ledger.

    Refuses to start without QUOTA_SERVICE_TOKEN unless QUOTA_ALLOW_ANONYMOUS_GATEWAYS=true."""
    from services.policy.app import create_app

    _serve(create_app, host, port, gateways=True)


@app.command("verify")
def verify_command() -> None:
    """Check the hash chain and every projection against a re-fold; non-zero exit if not ok."""
    import asyncio
    import json

    from services.ledger.audit import verify
    from services.settings import asyncpg_dsn
    from services.store.db import create_pool

    async def run() -> dict[str, object]:
        pool = await create_pool(asyncpg_dsn(Settings().database_url), max_size=1)
        try:
            async with pool.acquire() as conn:
                return (await verify(conn)).as_json()
        finally:
            await pool.close()

    report = asyncio.run(run())
    typer.echo(json.dumps(report, indent=2))
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def replay(
    check: Annotated[bool, typer.Option("--check", help="Only report differences.")] = False,
    from_kafka: Annotated[
        bool, typer.Option("--from-kafka", help="Rebuild from the topic's beginning.")
    ] = False,
) -> None:
    """Rebuild every projection from history and swap it in (or only report, with --check)."""
    from services.ledger.replay_cli import replay_command

    raise typer.Exit(replay_command(check, from_kafka))


@app.command()
def statement(
    account: str,
    since: Annotated[
        str | None, typer.Option(help="RFC 3339 time or position (inclusive).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="RFC 3339 time or position (exclusive).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
) -> None:
    """Print an account's statement with running balances."""
    from services.ledger.statement_cli import statement_command

    raise typer.Exit(statement_command(account, since, until, fmt))


@app.command()
def dev(
    host: Host = "127.0.0.1",
    ledger_port: Annotated[int, typer.Option(help="Ledger port.")] = 8080,
    policy_port: Annotated[int, typer.Option(help="Policy port.")] = 8081,
) -> None:
    """Everything on one machine: embedded PostgreSQL and broker, migrations, demo data."""
    from services.dev import run_dev

    run_dev(host=host, ledger_port=ledger_port, policy_port=policy_port)


def main() -> None:
    app()
