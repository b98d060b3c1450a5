"""What the ledger's routes depend on: the running ledger's resources and admin auth."""

from __future__ import annotations

import hmac
from typing import Annotated

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.errors import ApiError
from services.ledger.consumer import LedgerConsumer
from services.settings import Settings


class Ledger:
    """What the lifespan builds and the routes use."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        consumer: LedgerConsumer | None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.consumer = consumer


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


LedgerDep = Annotated[Ledger, Depends(_ledger)]
_bearer = HTTPBearer(auto_error=False)


def require_admin(
    ledger: LedgerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 without a bearer token, 403 with a wrong one."""
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "admin_token_missing",
            "admin bearer token required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = ledger.settings.admin_token.encode()
    if not expected or not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError(403, "admin_token_invalid", "wrong admin token")


Admin = Depends(require_admin)
