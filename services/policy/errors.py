"""The error table of the decisions (CONTRACT section 3, the one-api / new-api table): each
reason's status, code, type and message, exactly as the table has them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

TOKEN_MISSING: Final = "token_missing"
TOKEN_INVALID: Final = "token_invalid"
IP_NOT_ALLOWED: Final = "ip_not_allowed"
ACCOUNT_SUSPENDED: Final = "account_suspended"
INSUFFICIENT_PERMISSIONS: Final = "insufficient_permissions"
MODEL_NOT_ALLOWED: Final = "model_not_allowed"
CHANNEL_PIN_FORBIDDEN: Final = "channel_pin_forbidden"
INVALID_CHANNEL_ID: Final = "invalid_channel_id"
CHANNEL_DISABLED: Final = "channel_disabled"
MODEL_UNAVAILABLE: Final = "model_unavailable"
PROMPT_MISSING: Final = "prompt_missing"
PROMPT_TOO_LONG: Final = "prompt_too_long"
SIZE_NOT_SUPPORTED: Final = "size_not_supported"
N_NOT_WITHIN_RANGE: Final = "n_not_within_range"
TEXT_TOO_LONG: Final = "text_too_long"
PROVIDER_RATE_LIMITED: Final = "provider_rate_limited"
INSUFFICIENT_USER_QUOTA: Final = "insufficient_user_quota"
RATE_LIMITED: Final = "rate_limited"
BUDGET_EXCEEDED: Final = "budget_exceeded"
TOKEN_BUDGET_EXCEEDED: Final = "token_budget_exceeded"
CONCURRENCY_LIMITED: Final = "concurrency_limited"

AUTHENTICATION_ERROR: Final = "authentication_error"
PERMISSION_ERROR: Final = "permission_error"
INSUFFICIENT_QUOTA: Final = "insufficient_quota"
INVALID_REQUEST_ERROR: Final = "invalid_request_error"
RATE_LIMIT_ERROR: Final = "rate_limit_error"
SERVICE_UNAVAILABLE: Final = "service_unavailable"

#: Placeholders in message templates: the key's last six characters, the model's name, and a
#: budget's period.
KEY_PLACEHOLDER: Final = "{key}"
MODEL_PLACEHOLDER: Final = "{model}"
PERIOD_PLACEHOLDER: Final = "{period}"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    code: str | None
    type: str
    message: str

    def render(self, key_last6: str = "", model: str = "", period: str = "") -> str:
        return (
            self.message.replace(KEY_PLACEHOLDER, key_last6)
            .replace(MODEL_PLACEHOLDER, model)
            .replace(PERIOD_PLACEHOLDER, period)
        )


# The messages are the error table's, exactly; the dashes are en dashes (U+2013).
ERRORS: Final[Mapping[str, ErrorSpec]] = MappingProxyType(
    {
        TOKEN_MISSING: ErrorSpec(
            401,
            None,
            AUTHENTICATION_ERROR,
            "Unauthorized – no access token supplied; please log in and include a valid token.",
        ),
        TOKEN_INVALID: ErrorSpec(
            401, None, AUTHENTICATION_ERROR, "Unauthorized – access token is invalid or expired."
        ),
        IP_NOT_ALLOWED: ErrorSpec(
            403,
            None,
            PERMISSION_ERROR,
            "Forbidden – key({key}) allowed only from approved IP ranges.",
        ),
        ACCOUNT_SUSPENDED: ErrorSpec(403, None, PERMISSION_ERROR, "Account suspended."),
        INSUFFICIENT_PERMISSIONS: ErrorSpec(
            403, None, PERMISSION_ERROR, "Forbidden – insufficient permissions."
        ),
        MODEL_NOT_ALLOWED: ErrorSpec(
            403,
            None,
            PERMISSION_ERROR,
            "Forbidden – key({key}) not authorized to access the requested model.",
        ),
        CHANNEL_PIN_FORBIDDEN: ErrorSpec(403, None, PERMISSION_ERROR, "Key error;({key})"),
        INVALID_CHANNEL_ID: ErrorSpec(
            400, None, INVALID_REQUEST_ERROR, "Bad Request – invalid channel ID."
        ),
        CHANNEL_DISABLED: ErrorSpec(
            403, None, PERMISSION_ERROR, "Forbidden – channel has been disabled."
        ),
        MODEL_UNAVAILABLE: ErrorSpec(
            503,
            None,
            SERVICE_UNAVAILABLE,
            "Incorrect model ID. Please request to view the model page or you do not have "
            "permission to use this model",
        ),
        PROMPT_MISSING: ErrorSpec(400, PROMPT_MISSING, INVALID_REQUEST_ERROR, "prompt is required"),
        PROMPT_TOO_LONG: ErrorSpec(
            400, PROMPT_TOO_LONG, INVALID_REQUEST_ERROR, "prompt is too long"
        ),
        SIZE_NOT_SUPPORTED: ErrorSpec(
            400, SIZE_NOT_SUPPORTED, INVALID_REQUEST_ERROR, "size not supported"
        ),
        N_NOT_WITHIN_RANGE: ErrorSpec(
            400, N_NOT_WITHIN_RANGE, INVALID_REQUEST_ERROR, "invalid value of n"
        ),
        TEXT_TOO_LONG: ErrorSpec(400, TEXT_TOO_LONG, INVALID_REQUEST_ERROR, "input is too long"),
        PROVIDER_RATE_LIMITED: ErrorSpec(
            503,
            None,
            SERVICE_UNAVAILABLE,
            "Rate limited by provider – contact support to request higher concurrency or "
            "try again later.",
        ),
        INSUFFICIENT_USER_QUOTA: ErrorSpec(
            403,
            INSUFFICIENT_USER_QUOTA,
            INSUFFICIENT_QUOTA,
            "Your account balance is insufficient. Please recharge your account to continue "
            "using the API.",
        ),
        RATE_LIMITED: ErrorSpec(
            429,
            None,
            RATE_LIMIT_ERROR,
            "The {model} model Too many requests; please try again later.",
        ),
    }
)

#: CONTRACT section 9's checks 13a-13c: not rows of the seed's table (their code is their
#: reason).
CONTROL_ERRORS: Final[Mapping[str, ErrorSpec]] = MappingProxyType(
    {
        BUDGET_EXCEEDED: ErrorSpec(
            403,
            BUDGET_EXCEEDED,
            INSUFFICIENT_QUOTA,
            "Budget exceeded – this account's {period} budget is used up.",
        ),
        TOKEN_BUDGET_EXCEEDED: ErrorSpec(
            403,
            TOKEN_BUDGET_EXCEEDED,
            INSUFFICIENT_QUOTA,
            "Budget exceeded – key({key}) has used up its {period} budget.",
        ),
        CONCURRENCY_LIMITED: ErrorSpec(
            429,
            CONCURRENCY_LIMITED,
            RATE_LIMIT_ERROR,
            "Too many concurrent requests for this key; try again later.",
        ),
    }
)

#: Every decision's denial by reason: the table's, then section 9's.
SPECS: Final[Mapping[str, ErrorSpec]] = MappingProxyType({**ERRORS, **CONTROL_ERRORS})
