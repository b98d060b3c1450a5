"""`quota key issue|rotate|revoke|list`: the key routes of a running ledger, over HTTP.

The ledger is found at QUOTA_LEDGER_URL (default http://127.0.0.1:8080) and called with
QUOTA_ADMIN_TOKEN. Each command prints the ledger's JSON answer to stdout; `issue` and `rotate`
print the new key there, once (it is stored nowhere and cannot be shown again). Exit codes: 0
done, 1 the ledger refused (its error on stderr), 2 no admin token or no ledger to talk to.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer

from services.settings import DEV_ADMIN_TOKEN, Settings

key_app = typer.Typer(
    help="Issue, rotate, revoke and list API keys through the ledger (QUOTA_LEDGER_URL, "
    "QUOTA_ADMIN_TOKEN).",
    no_args_is_help=True,
)

#: Slack beyond the ledger's own wait for the event to be applied.
HTTP_SLACK_SECONDS = 10.0


@key_app.command("issue")
def issue(
    account: Annotated[str, typer.Argument(help="The account the key spends from.")],
    prefix: Annotated[
        str, typer.Option(help="At most 16 of [A-Za-z0-9_-] before the random part.")
    ] = "sk-",
    expires_at: Annotated[
        str | None, typer.Option(help="RFC 3339 time with an offset; default: never.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="At most this many active holds of the key at once.")
    ] = None,
    allowed_cidr: Annotated[
        list[str] | None, typer.Option(help="Only from this CIDR or address (repeatable).")
    ] = None,
    allowed_model: Annotated[
        list[str] | None, typer.Option(help="Only for this model (repeatable).")
    ] = None,
) -> None:
    """Issue a key for ACCOUNT and print it (once)."""
    body: dict[str, Any] = {"account_id": account, "prefix": prefix}
    if expires_at is not None:
        try:
            datetime.fromisoformat(expires_at)
        except ValueError:
            _fail(2, f"--expires-at must be an RFC 3339 time, got {expires_at!r}")
        body["expires_at"] = expires_at
    if max_concurrent is not None:
        body["max_concurrent"] = max_concurrent
    if allowed_cidr:
        body["allowed_cidrs"] = allowed_cidr
    if allowed_model:
        body["allowed_models"] = allowed_model
    _print(_call("POST", "/keys", body), shows_key=True)


@key_app.command("rotate")
def rotate(
    token: Annotated[str, typer.Argument(help="The token_id whose key is replaced.")],
    grace: Annotated[
        int,
        typer.Option("--grace", min=0, max=604800, help="Seconds the previous key keeps working."),
    ] = 0,
    prefix: Annotated[
        str, typer.Option(help="The new key's prefix (prefixes are not stored).")
    ] = "sk-",
) -> None:
    """A new key for TOKEN (same token_id, budgets and limits); print it (once)."""
    body = {"grace_seconds": grace, "prefix": prefix}
    _print(_call("POST", f"/keys/{_segment(token)}/rotate", body), shows_key=True)


@key_app.command("revoke")
def revoke(token: Annotated[str, typer.Argument(help="The token_id to revoke.")]) -> None:
    """Revoke TOKEN: its key gets 401 at every policy that has reached the printed position."""
    _print(_call("DELETE", f"/keys/{_segment(token)}", None), shows_key=False)


@key_app.command("list")
def list_keys(account: Annotated[str, typer.Argument(help="The account.")]) -> None:
    """The account's keys: token ids, last six characters, limits; never a secret."""
    _print(_call("GET", f"/accounts/{_segment(account)}/keys", None), shows_key=False)


def _segment(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _call(method: str, path: str, body: dict[str, Any] | None) -> Any:
    """The ledger's JSON answer to the request; exits 1 on an error answer, 2 when the ledger
    cannot be asked."""
    import httpx

    settings = Settings()
    token = settings.admin_token
    if not token:
        _fail(2, f"QUOTA_ADMIN_TOKEN is not set (`quota dev` uses {DEV_ADMIN_TOKEN})")
    timeout = settings.key_apply_timeout_seconds + HTTP_SLACK_SECONDS
    url = settings.ledger_url.rstrip("/") + path
    try:
        response = httpx.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        _fail(2, f"cannot reach the ledger at {settings.ledger_url}: {exc}")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code >= 400 or not isinstance(answer, dict | list):
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict):
            _fail(1, f"{response.status_code} {error.get('code')}: {error.get('message')}")
        _fail(1, f"{response.status_code}: {response.text[:500]}")
    return answer


def _print(answer: Any, *, shows_key: bool) -> None:
    typer.echo(json.dumps(answer, indent=2))
    if shows_key:
        print("The key is shown once: store it now; it cannot be shown again.", file=sys.stderr)


def _fail(code: int, message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise typer.Exit(code)
