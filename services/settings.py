"""Configuration: one settings class, read from `QUOTA_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_ADMIN_TOKEN = "dev-admin-token"


class Settings(BaseSettings):
    """Every knob of both services; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="QUOTA_", extra="ignore")

    database_url: str = "postgresql://postgres@127.0.0.1:5432/quota"
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "quota.events"
    topic_partitions: int = Field(default=4, ge=1)
    consumer_group: str = "quota-ledger"
    admin_token: str = ""
    service_token: str = ""
    #: Let a policy service run without QUOTA_SERVICE_TOKEN (gateways unauthenticated).
    allow_anonymous_gateways: bool = False
    redis_url: str = ""
    batch_max_records: int = Field(default=5000, ge=1)
    batch_timeout_ms: int = Field(default=200, ge=1)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    kafka_fetch_max_wait_ms: int = Field(default=50, ge=1)
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    max_staleness_seconds: float = Field(default=10.0, gt=0)
    fail_open: bool = False
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    reservation_ttl_seconds: float = Field(default=300.0, gt=0)
    #: How long a starting process waits for PostgreSQL (and the ledger for the broker).
    startup_timeout_seconds: float = Field(default=60.0, gt=0)
    #: How long `POST /keys` (and rotate, revoke) wait for their event to be applied.
    key_apply_timeout_seconds: float = Field(default=15.0, gt=0)
    #: Where `quota key ...` finds the ledger's API.
    ledger_url: str = "http://127.0.0.1:8080"
    log_level: str = "INFO"
    log_json: bool = True
    access_log: bool = False
    dev_mode: bool = False
    #: OpenTelemetry traces (`services.tracing`; needs the `otel` extra); the OTEL_* variables
    #: say where they go.
    otel_enabled: bool = False

    def check_secrets(self, *, admin: bool = True, gateways: bool = False) -> None:
        """Refuse to run production processes without their secrets: the ledger (`admin`)
        without an admin token of its own, the policy service (`gateways`) without a service
        token unless the operator opted out (QUOTA_ALLOW_ANONYMOUS_GATEWAYS=true). `quota dev`
        needs neither. Every problem is named in the one message."""
        if self.dev_mode:
            return
        problems = []
        if admin and (not self.admin_token or self.admin_token == DEV_ADMIN_TOKEN):
            problems.append(
                "QUOTA_ADMIN_TOKEN must be set to a secret of your own "
                "(the default is only accepted by `quota dev`)"
            )
        if gateways and not self.service_token.strip() and not self.allow_anonymous_gateways:
            problems.append(
                "QUOTA_SERVICE_TOKEN must be set: the policy service refuses to serve "
                "unauthenticated gateways (set QUOTA_ALLOW_ANONYMOUS_GATEWAYS=true to accept them)"
            )
        if problems:
            raise SystemExit("; ".join(problems))


def sqlalchemy_url(database_url: str) -> str:
    """Turn the operator's plain `postgresql://` URL into SQLAlchemy's asyncpg form."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix) :]
    raise ValueError(f"QUOTA_DATABASE_URL must be a postgresql:// URL, got {database_url!r}")


def asyncpg_dsn(database_url: str) -> str:
    """Turn any accepted database URL into the plain form asyncpg takes."""
    return "postgresql://" + sqlalchemy_url(database_url)[len("postgresql+asyncpg://") :]
