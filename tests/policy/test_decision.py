"""The policy decision is a pure function: tested without I/O, row by row of the error table."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.policy.decision import Decision, decide, rate_limited
from services.policy.errors import ERRORS
from services.policy.inputs import extract_key, parse_pin
from services.policy.request import AuthorizeRequest
from services.policy.snapshot import RouteTable, Snapshot
from services.store.model import (
    Account,
    Budget,
    Channel,
    ModelSpec,
    RateLimit,
    RoutePolicy,
    State,
    Token,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
POSITION = 4242

USER_KEY = "sk-user0000000000000000abc123"
ADMIN_KEY = "sk-admin000000000000000def456"
GUEST_KEY = "sk-guest000000000000000ghi789"

# The error table, verbatim (CONTRACT's seed/error-table.txt): the tests hold their own copy.
ERROR_TABLE = """\
503 | - | Incorrect model ID. Please request to view the model page or you do not have permission to use this model | No available channel to handle request |
503 | - | Rate limited by provider – contact support to request higher concurrency or try again later. | Model encounters official rate limiting |
429 | - | The xx model Too many requests; please try again later. | Request frequency exceeds limit |
403 | insufficient_user_quota | Your account balance is insufficient. Please recharge your account to continue using the API. | User balance insufficient, needs recharge |
403 | - | Account suspended. | User status disabled or blacklisted |
403 | - | Forbidden – insufficient permissions. | User role permissions insufficient |
403 | - | Forbidden – key(last 6 digits of request key) allowed only from approved IP ranges. | IP not in token’s allowed network range |
403 | - | Forbidden – key(last 6 digits of request key) not authorized to access the requested model. | Token doesn’t support requested model |
403 | - | Key error;(last 6 digits of request key) | Non-admin user attempting to specify channel |
403 | - | Forbidden – channel has been disabled. | Channel status is disabled |
401 | - | Unauthorized – no access token supplied; please log in and include a valid token. | No Authorization header provided |
401 | - | Unauthorized – access token is invalid or expired. | Access token validation failed |
400 | - | Bad Request – invalid channel ID. | Channel ID format error or doesn’t exist |
400 | prompt_missing | prompt is required | Missing prompt for image generation |
400 | prompt_too_long | prompt is too long | Prompt exceeds length limit |
400 | text_too_long | input is too long | Audio input text too long |
400 | size_not_supported | size not supported | Image size not supported by model |
400 | n_not_within_range | invalid value of n | n parameter value not in valid range |
"""  # noqa: E501


@dataclass(frozen=True)
class TableRow:
    status: int
    code: str | None
    message: str


def table_rows() -> list[TableRow]:
    rows = []
    for line in ERROR_TABLE.splitlines():
        status, code, message, _cause, _ = (cell.strip() for cell in line.split("|"))
        rows.append(TableRow(int(status), None if code == "-" else code, message))
    return rows


# --------------------------------------------------------------------------------------------
# A small world


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token(token_id: str, account_id: str, key: str, **fields: Any) -> Token:
    values: dict[str, Any] = {
        "token_id": token_id,
        "account_id": account_id,
        "key_sha256": sha(key),
        "key_last6": key[-6:],
        "expires_at": None,
        "allowed_cidrs": (),
        "allowed_models": (),
        "revoked": False,
        "position": 1,
    }
    values.update(fields)
    return Token(**values)


def channel(channel_id: int, models: tuple[str, ...], **fields: Any) -> Channel:
    values: dict[str, Any] = {
        "channel_id": channel_id,
        "models": models,
        "groups": ("default",),
        "enabled": True,
        "rate_limited_until": None,
        "position": 1,
    }
    values.update(fields)
    return Channel(**values)


def world() -> State:
    state = State()
    state.accounts = {
        "acct_user": Account("acct_user", balance=1000, role="user"),
        "acct_admin": Account("acct_admin", balance=1000, role="admin"),
        "acct_guest": Account("acct_guest", balance=1000, role="guest"),
    }
    for tok in (
        token("tok_user", "acct_user", USER_KEY),
        token("tok_admin", "acct_admin", ADMIN_KEY),
        token("tok_guest", "acct_guest", GUEST_KEY),
    ):
        state.tokens[tok.token_id] = tok
        state.token_keys[tok.key_sha256] = tok.token_id
    state.channels = {
        1: channel(1, ("gpt-4o", "dall-e-3", "tts-1")),
        2: channel(2, ("gpt-4o",)),
        3: channel(3, ("gpt-4o",), enabled=False),
        4: channel(4, ("gpt-4o",), groups=("vip",)),
    }
    image_limits = {"max_prompt_chars": 10, "sizes": ["1024x1024"], "n_min": 1, "n_max": 2}
    state.models = {
        "gpt-4o": ModelSpec("gpt-4o", "chat", {}, 1),
        "dall-e-3": ModelSpec("dall-e-3", "image", image_limits, 1),
        "tts-1": ModelSpec("tts-1", "audio", {"max_input_chars": 10}, 1),
        "orphan": ModelSpec("orphan", "chat", {}, 1),
    }
    state.routes = {
        "/admin/*": RoutePolicy("/admin/*", "admin", 1),
        "/v1/*": RoutePolicy("/v1/*", "user", 1),
    }
    return state


def snap(state: State | None = None) -> Snapshot:
    return Snapshot.from_state(state if state is not None else world(), POSITION)


def req(**fields: Any) -> AuthorizeRequest:
    values: dict[str, Any] = {
        "authorization": f"Bearer {USER_KEY}",
        "client_ip": "203.0.113.7",
        "route": "/v1/chat/completions",
        "model": "gpt-4o",
    }
    values.update(fields)
    return AuthorizeRequest.model_validate(values)


def with_account(state: State, account_id: str, **fields: Any) -> State:
    state.accounts[account_id] = replace(state.accounts[account_id], **fields)
    return state


def with_token(state: State, token_id: str, **fields: Any) -> State:
    state.tokens[token_id] = replace(state.tokens[token_id], **fields)
    return state


def with_channel(state: State, channel_id: int, **fields: Any) -> State:
    state.channels[channel_id] = replace(state.channels[channel_id], **fields)
    return state


#: `rate_limit(account_id, model, limit, now)`: None when the request may go, else the seconds
#: until it may be retried (the service's limiter, as a function).
RateLimiter = Callable[[str, str, RateLimit, datetime], int | None]


def limiter(retry: int | None) -> RateLimiter:
    def rate_limit(account_id: str, model: str, limit: RateLimit, now: datetime) -> int | None:
        return retry

    return rate_limit


def run(
    request: AuthorizeRequest,
    snapshot: Snapshot | None = None,
    rate_limit: RateLimiter | None = None,
) -> Decision:
    """`decide`, then check 14 as the service runs it: the limit the decision names is
    counted (by `rate_limit`), and a full window turns it into `rate_limited`."""
    snapshot = snapshot if snapshot is not None else snap()
    decision = decide(request, snapshot, NOW)
    if rate_limit is None or decision.rate_limit is None or decision.rate_limit_key is None:
        return decision
    account_id, model = decision.rate_limit_key
    wait = rate_limit(account_id, model, decision.rate_limit, NOW)
    return decision if wait is None else rate_limited(decision, wait)


# --------------------------------------------------------------------------------------------
# One row of the table each

Scenario = Callable[[], Decision]


def _rate_limited() -> Decision:
    state = world()
    state.rate_limits[("acct_user", "*")] = RateLimit("acct_user", "*", 5, 60, 1)
    return run(req(), snap(state), limiter(17))


def _provider_limited() -> Decision:
    state = world()
    with_channel(state, 1, rate_limited_until=NOW + timedelta(seconds=90, microseconds=500))
    with_channel(state, 2, rate_limited_until=NOW + timedelta(seconds=200))
    return run(req(), snap(state))


# table message -> (reason, scenario, the last six characters or model the message names,
# retry_after)
SCENARIOS: dict[str, tuple[str, Scenario, str, int | None]] = {
    "Incorrect model ID": (
        "model_unavailable",
        lambda: run(req(model="no-such-model")),
        "",
        None,
    ),
    "Rate limited by provider": ("provider_rate_limited", _provider_limited, "", 91),
    "The xx model": ("rate_limited", _rate_limited, "gpt-4o", 17),
    "Your account balance": (
        "insufficient_user_quota",
        lambda: run(req(estimated_cost=1001)),
        "",
        None,
    ),
    "Account suspended.": (
        "account_suspended",
        lambda: run(req(), snap(with_account(world(), "acct_user", status="blacklisted"))),
        "",
        None,
    ),
    "Forbidden – insufficient permissions.": (
        "insufficient_permissions",
        lambda: run(req(route="/admin/users")),
        "",
        None,
    ),
    "Forbidden – key(last 6 digits of request key) allowed": (
        "ip_not_allowed",
        lambda: run(
            req(client_ip="192.0.2.1"),
            snap(with_token(world(), "tok_user", allowed_cidrs=("10.0.0.0/8",))),
        ),
        "abc123",
        None,
    ),
    "Forbidden – key(last 6 digits of request key) not": (
        "model_not_allowed",
        lambda: run(
            req(model="dall-e-3", request={"prompt": "a cat"}),
            snap(with_token(world(), "tok_user", allowed_models=("gpt-4o",))),
        ),
        "abc123",
        None,
    ),
    "Key error;": ("channel_pin_forbidden", lambda: run(req(channel_id="1")), "abc123", None),
    "Forbidden – channel has been disabled.": (
        "channel_disabled",
        lambda: run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id=3)),
        "",
        None,
    ),
    "Unauthorized – no access token": (
        "token_missing",
        lambda: run(req(authorization=None)),
        "",
        None,
    ),
    "Unauthorized – access token is invalid": (
        "token_invalid",
        lambda: run(req(authorization="Bearer sk-nobody")),
        "",
        None,
    ),
    "Bad Request": (
        "invalid_channel_id",
        lambda: run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id="abc")),
        "",
        None,
    ),
    "prompt is required": (
        "prompt_missing",
        lambda: run(req(model="dall-e-3", request={"size": "1024x1024"})),
        "",
        None,
    ),
    "prompt is too long": (
        "prompt_too_long",
        lambda: run(req(model="dall-e-3", request={"prompt": "x" * 11})),
        "",
        None,
    ),
    "input is too long": (
        "text_too_long",
        lambda: run(req(model="tts-1", request={"input": "y" * 11})),
        "",
        None,
    ),
    "size not supported": (
        "size_not_supported",
        lambda: run(req(model="dall-e-3", request={"prompt": "a cat", "size": "1x1"})),
        "",
        None,
    ),
    "invalid value of n": (
        "n_not_within_range",
        lambda: run(req(model="dall-e-3", request={"prompt": "a cat", "n": 3})),
        "",
        None,
    ),
}


def scenario_for(row: TableRow) -> tuple[str, Scenario, str, int | None]:
    matches = [value for prefix, value in SCENARIOS.items() if row.message.startswith(prefix)]
    assert len(matches) == 1, row.message
    return matches[0]


def expected_message(row: TableRow, named: str) -> str:
    message = row.message.replace("(last 6 digits of request key)", f"({named})")
    return message.replace("The xx model", f"The {named} model")


def test_the_table_has_eighteen_rows_and_every_row_a_scenario() -> None:
    rows = table_rows()
    assert len(rows) == 18
    reasons = {scenario_for(row)[0] for row in rows}
    assert reasons == set(ERRORS)


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: row.message[:40])
def test_every_row_of_the_error_table(row: TableRow) -> None:
    reason, scenario, named, retry_after = scenario_for(row)
    decision = scenario()
    assert decision.status == row.status
    assert decision.allowed is False
    assert decision.reason == reason
    assert decision.retry_after == retry_after
    assert decision.body == {
        "allowed": False,
        "error": {
            "message": expected_message(row, named),
            "type": ERRORS[reason].type,
            "code": row.code,
            "reason": reason,
        },
        "position": POSITION,
    }
    if retry_after is not None:
        assert decision.headers == {"Retry-After": str(retry_after)}
    else:
        assert decision.headers == {}


def test_messages_keep_their_en_dashes() -> None:
    for reason in ("token_missing", "token_invalid", "invalid_channel_id", "channel_disabled"):
        assert "\u2013" in ERRORS[reason].message
        assert "-" not in ERRORS[reason].message


def test_error_types_by_class() -> None:
    types = {reason: spec.type for reason, spec in ERRORS.items()}
    assert types["token_missing"] == types["token_invalid"] == "authentication_error"
    assert types["insufficient_user_quota"] == "insufficient_quota"
    assert types["rate_limited"] == "rate_limit_error"
    assert types["model_unavailable"] == types["provider_rate_limited"] == "service_unavailable"
    for reason, spec in ERRORS.items():
        if spec.status == 400:
            assert spec.type == "invalid_request_error", reason
        if spec.status == 403 and reason != "insufficient_user_quota":
            assert spec.type == "permission_error", reason


# --------------------------------------------------------------------------------------------
# Allowed


def test_allowed_body_is_exact() -> None:
    state = with_account(world(), "acct_user", balance=1500, held=200)
    decision = run(req(estimated_cost=1300), snap(state))
    assert (decision.status, decision.allowed, decision.reason) == (200, True, None)
    assert decision.retry_after is None
    assert decision.body == {
        "allowed": True,
        "account_id": "acct_user",
        "token_id": "tok_user",
        "role": "user",
        "group": "default",
        "balance": 1500,
        "available": 1300,
        "channels": [1, 2],
        "reservation": None,
        "budgets": [],
        "position": POSITION,
    }


def test_bearer_and_bare_keys() -> None:
    assert extract_key(f"Bearer {USER_KEY}") == USER_KEY
    assert extract_key(f"bearer   {USER_KEY}  ") == USER_KEY
    assert extract_key(USER_KEY) == USER_KEY
    assert extract_key("Bearer") == ""
    assert extract_key("Bearer   ") == ""
    assert extract_key(None) == ""
    assert run(req(authorization=USER_KEY)).allowed
    assert run(req(authorization=f"  {USER_KEY} ")).allowed
    for missing in ("", "   ", "Bearer", "Bearer  ", "BEARER"):
        assert run(req(authorization=missing)).reason == "token_missing", missing


# --------------------------------------------------------------------------------------------
# Precedence and details


def test_suspended_account_with_zero_balance_is_suspended() -> None:
    state = with_account(world(), "acct_user", status="suspended", balance=0)
    assert run(req(), snap(state)).reason == "account_suspended"


def test_unknown_model_on_a_token_with_allowed_models_is_not_allowed() -> None:
    state = with_token(world(), "tok_user", allowed_models=("gpt-4o",))
    decision = run(req(model="no-such-model"), snap(state))
    assert decision.reason == "model_not_allowed"
    assert run(req(model=None), snap(state)).reason == "model_not_allowed"
    assert run(req(model=None)).reason == "model_unavailable"


def test_revoked_token_is_invalid() -> None:
    state = with_token(world(), "tok_user", revoked=True)
    assert run(req(), snap(state)).reason == "token_invalid"


def test_expiry_at_exactly_now_is_invalid() -> None:
    expired = with_token(world(), "tok_user", expires_at=NOW)
    assert run(req(), snap(expired)).reason == "token_invalid"
    live = with_token(world(), "tok_user", expires_at=NOW + timedelta(microseconds=1))
    assert run(req(), snap(live)).allowed


def test_naive_now_is_taken_as_utc() -> None:
    state = with_token(world(), "tok_user", expires_at=NOW)
    assert decide(req(), snap(state), NOW.replace(tzinfo=None)).reason == "token_invalid"


@pytest.mark.parametrize(
    ("cidrs", "client_ip", "allowed"),
    [
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "2001:db9::1", False),
        (("2001:db8::/32",), "203.0.113.7", False),
        (("203.0.113.7",), "203.0.113.7", True),
        (("203.0.113.7/32",), "203.0.113.8", False),
        (("2001:db8::7",), "2001:db8::7", True),
        (("10.0.0.0/8",), "::ffff:10.1.2.3", True),
        (("10.0.0.0/8",), "::ffff:11.1.2.3", False),
        (("::ffff:0:0/96",), "10.1.2.3", True),
        (("10.0.0.0/8", "2001:db8::/32"), "2001:db8::1", True),
        (("10.0.0.0/8",), " 10.0.0.1 ", True),
        (("2001:db8::/32",), "[2001:db8::1]", True),
        (("10.0.0.0/8",), None, False),
        (("10.0.0.0/8",), "", False),
        (("10.0.0.0/8",), "not-an-ip", False),
        (("10.0.0.0/8",), "10.0.0.1, 10.0.0.2", False),
        ((), None, True),
        ((), "garbage", True),
    ],
)
def test_ip_ranges(cidrs: tuple[str, ...], client_ip: str | None, allowed: bool) -> None:
    state = with_token(world(), "tok_user", allowed_cidrs=cidrs)
    decision = run(req(client_ip=client_ip), snap(state))
    assert decision.allowed is allowed
    if not allowed:
        assert decision.reason == "ip_not_allowed"
        assert decision.body["error"]["message"] == (
            "Forbidden – key(abc123) allowed only from approved IP ranges."
        )


def test_ip_check_comes_before_the_account_status() -> None:
    state = with_token(world(), "tok_user", allowed_cidrs=("10.0.0.0/8",))
    with_account(state, "acct_user", status="suspended")
    assert run(req(client_ip="192.0.2.1"), snap(state)).reason == "ip_not_allowed"


def test_pin_via_key_suffix_for_an_admin() -> None:
    decision = run(req(authorization=f"Bearer {ADMIN_KEY}-2"))
    assert decision.allowed
    assert decision.body["channels"] == [2]
    assert decision.body["token_id"] == "tok_admin"


def test_pin_via_channel_id_for_an_admin() -> None:
    for pin in (2, "2", "002"):
        decision = run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id=pin))
        assert decision.allowed, pin
        assert decision.body["channels"] == [2]


def test_admin_pin_bypasses_groups_but_needs_the_model() -> None:
    admin = f"Bearer {ADMIN_KEY}"
    assert run(req(authorization=admin, channel_id=4)).body["channels"] == [4]
    assert run(req(authorization=admin, channel_id=2, model="tts-1")).reason == (
        "model_unavailable"
    )


def test_root_may_pin() -> None:
    state = with_account(world(), "acct_admin", role="root")
    assert run(req(authorization=f"Bearer {ADMIN_KEY}-1"), snap(state)).body["channels"] == [1]


@pytest.mark.parametrize("pinning", ["suffix", "channel_id"])
def test_pin_for_a_user_is_forbidden(pinning: str) -> None:
    request = (
        req(authorization=f"Bearer {USER_KEY}-1") if pinning == "suffix" else req(channel_id=1)
    )
    decision = run(request)
    assert decision.status == 403
    assert decision.reason == "channel_pin_forbidden"
    assert decision.body["error"]["message"] == "Key error;(abc123)"


def test_pin_for_a_user_is_forbidden_even_when_invalid() -> None:
    assert run(req(channel_id="abc")).reason == "channel_pin_forbidden"
    assert run(req(authorization=f"Bearer {USER_KEY}-abc")).reason == "channel_pin_forbidden"


@pytest.mark.parametrize("pin", ["abc", "0", "99", "-1", "1.5", " 1", "+1", "١", "9" * 40])
def test_invalid_pins_for_an_admin(pin: str) -> None:
    via_body = run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id=pin))
    assert via_body.status == 400
    assert via_body.reason == "invalid_channel_id"
    assert via_body.body["error"]["message"] == "Bad Request – invalid channel ID."


@pytest.mark.parametrize("pin", [0, -3, 99, 2**63])
def test_invalid_integer_pins_for_an_admin(pin: int) -> None:
    decision = run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id=pin))
    assert decision.reason == "invalid_channel_id"


@pytest.mark.parametrize("suffix", ["abc", "0", "99", ""])
def test_invalid_key_suffix_for_an_admin(suffix: str) -> None:
    decision = run(req(authorization=f"Bearer {ADMIN_KEY}-{suffix}"))
    assert decision.reason == "invalid_channel_id"


def test_conflicting_pins_are_invalid_and_agreeing_ones_are_fine() -> None:
    admin = f"Bearer {ADMIN_KEY}-1"
    assert run(req(authorization=admin, channel_id=2)).reason == "invalid_channel_id"
    assert run(req(authorization=admin, channel_id="01")).body["channels"] == [1]


def test_empty_channel_id_is_no_pin() -> None:
    assert run(req(channel_id="")).allowed


def test_unknown_key_with_unknown_base_is_invalid() -> None:
    assert run(req(authorization="Bearer sk-nobody-1")).reason == "token_invalid"


def test_key_last6_excludes_the_channel_suffix() -> None:
    state = with_token(world(), "tok_user", allowed_models=("gpt-4o",))
    decision = run(req(authorization=f"Bearer {USER_KEY}-12", model="tts-1"), snap(state))
    assert decision.body["error"]["message"] == (
        "Forbidden – key(abc123) not authorized to access the requested model."
    )


def test_pinned_disabled_channel_is_disabled_before_model_checks() -> None:
    decision = run(req(authorization=f"Bearer {ADMIN_KEY}", channel_id=3, model="nope"))
    assert decision.reason == "channel_disabled"


def test_longest_prefix_route_wins() -> None:
    state = world()
    state.routes = {
        "/v1/*": RoutePolicy("/v1/*", "user", 1),
        "/v1/admin/*": RoutePolicy("/v1/admin/*", "admin", 1),
        "/v1/admin/public": RoutePolicy("/v1/admin/public", "guest", 1),
        "/v1/admin/public*": RoutePolicy("/v1/admin/public*", "root", 1),
    }
    snapshot = snap(state)
    guest = f"Bearer {GUEST_KEY}"
    assert run(req(authorization=guest, route="/v1/chat"), snapshot).reason == (
        "insufficient_permissions"
    )
    assert run(req(authorization=guest, route="/v2/chat"), snapshot).allowed
    assert run(req(route="/v1/chat"), snapshot).allowed
    assert run(req(route="/v1/admin/x"), snapshot).reason == "insufficient_permissions"
    assert run(req(authorization=guest, route="/v1/admin/public"), snapshot).allowed
    assert run(req(authorization=guest, route="/v1/admin/public?x=1"), snapshot).allowed
    assert run(req(route="/v1/admin/publicity"), snapshot).reason == "insufficient_permissions"
    admin = f"Bearer {ADMIN_KEY}"
    assert run(req(authorization=admin, route="/v1/admin/x"), snapshot).allowed


def test_missing_route_gets_the_strictest_policy() -> None:
    assert run(req(route=None)).reason == "insufficient_permissions"
    assert run(req(authorization=f"Bearer {ADMIN_KEY}", route=None)).allowed
    state = world()
    state.routes = {}
    assert run(req(route=None), snap(state)).allowed


def test_group_decides_which_channels_serve() -> None:
    state = with_account(world(), "acct_user", group="vip")
    assert run(req(), snap(state)).body["channels"] == [4]
    assert run(req(model="tts-1"), snap(state)).reason == "model_unavailable"


def test_model_without_enabled_channel_is_unavailable() -> None:
    assert run(req(model="orphan")).reason == "model_unavailable"
    state = world()
    state.channels = {3: state.channels[3]}
    assert run(req(), snap(state)).reason == "model_unavailable"


def test_unicode_lengths_are_code_points() -> None:
    cat = "🐈"
    assert run(req(model="dall-e-3", request={"prompt": cat * 10})).allowed
    too_long = run(req(model="dall-e-3", request={"prompt": cat * 11}))
    assert too_long.reason == "prompt_too_long"
    assert run(req(model="tts-1", request={"input": "é" * 10})).allowed
    assert run(req(model="tts-1", request={"input": "e\u0301" * 5})).allowed
    assert run(req(model="tts-1", request={"input": "e\u0301" * 6})).reason == "text_too_long"


def test_image_checks_run_in_order() -> None:
    image = {"model": "dall-e-3"}
    everything_wrong = {"prompt": "x" * 11, "size": "1x1", "n": 9}
    assert run(req(**image, request={"prompt": " ", "size": "1x1"})).reason == "prompt_missing"
    assert run(req(**image, request=everything_wrong)).reason == "prompt_too_long"
    assert run(req(**image, request={"prompt": "ok", "size": "1x1", "n": 9})).reason == (
        "size_not_supported"
    )
    assert run(req(**image, request={"prompt": "ok", "n": 0})).reason == "n_not_within_range"
    assert run(req(**image, request={"prompt": "ok", "n": 2, "size": "1024x1024"})).allowed
    assert run(req(**image, request={"prompt": "ok"})).allowed


def test_n_defaults_to_one() -> None:
    state = world()
    state.models["dall-e-3"] = ModelSpec("dall-e-3", "image", {"n_min": 2}, 1)
    assert run(req(model="dall-e-3", request={"prompt": "a"}), snap(state)).reason == (
        "n_not_within_range"
    )


def test_limits_apply_by_what_is_set_whatever_the_kind() -> None:
    state = world()
    state.models["gpt-4o"] = ModelSpec("gpt-4o", "chat", {"max_prompt_chars": 3}, 1)
    snapshot = snap(state)
    assert run(req(), snapshot).allowed
    assert run(req(request={"prompt": "abc"}), snapshot).allowed
    assert run(req(request={"prompt": "abcd"}), snapshot).reason == "prompt_too_long"
    state.models["emb"] = ModelSpec("emb", "embedding", {"max_input_chars": 4}, 1)
    state.channels[2] = replace(state.channels[2], models=("gpt-4o", "emb"))
    snapshot = snap(state)
    assert run(req(model="emb", request={"input": ["ab", "cd"]}), snapshot).allowed
    assert run(req(model="emb", request={"input": ["ab", "cde"]}), snapshot).reason == (
        "text_too_long"
    )


def test_limit_checks_come_before_provider_limits() -> None:
    state = world()
    with_channel(state, 1, rate_limited_until=NOW + timedelta(seconds=5))
    decision = run(req(model="dall-e-3", request={}), snap(state))
    assert decision.reason == "prompt_missing"


def test_provider_limits_spare_free_channels_and_end_on_time() -> None:
    state = world()
    with_channel(state, 1, rate_limited_until=NOW + timedelta(seconds=5))
    assert run(req(), snap(state)).body["channels"] == [2]
    with_channel(state, 2, rate_limited_until=NOW)
    assert run(req(), snap(state)).body["channels"] == [2]
    with_channel(state, 2, rate_limited_until=NOW + timedelta(microseconds=1))
    decision = run(req(), snap(state))
    assert (decision.status, decision.reason, decision.retry_after) == (
        503,
        "provider_rate_limited",
        1,
    )


def test_provider_limit_on_a_pinned_channel() -> None:
    state = with_channel(world(), 2, rate_limited_until=NOW + timedelta(seconds=30))
    decision = run(req(authorization=f"Bearer {ADMIN_KEY}-2"), snap(state))
    assert (decision.reason, decision.retry_after) == ("provider_rate_limited", 30)
    assert run(req(authorization=f"Bearer {ADMIN_KEY}-1"), snap(state)).body["channels"] == [1]


def test_available_is_balance_minus_held() -> None:
    state = with_account(world(), "acct_user", balance=100, held=100)
    assert run(req(), snap(state)).reason == "insufficient_user_quota"
    state = with_account(world(), "acct_user", balance=-5)
    assert run(req(), snap(state)).reason == "insufficient_user_quota"
    state = with_account(world(), "acct_user", balance=100, held=40)
    assert run(req(estimated_cost=60), snap(state)).allowed
    assert run(req(estimated_cost=61), snap(state)).reason == "insufficient_user_quota"


def test_a_hold_with_a_request_id_leaves_check_13_to_the_hold() -> None:
    """Its retry must get its own hold back, though the snapshot shows too little left for a
    second one: the hold looks the request id up first, then applies check 13 itself."""
    state = with_account(world(), "acct_user", balance=100, held=70)
    for cost in (70, 100, 10**6):
        decision = run(req(estimated_cost=cost, request_id="req-1"), snap(state))
        assert decision.allowed and decision.body["available"] == 30
        assert run(req(estimated_cost=cost), snap(state)).reason == "insufficient_user_quota"
    state = with_account(world(), "acct_user", balance=100, held=100)
    assert run(req(estimated_cost=5, request_id="req-1"), snap(state)).allowed
    # without a hold there is nothing to look up: the snapshot decides
    assert run(req(request_id="req-1"), snap(state)).reason == "insufficient_user_quota"
    # the checks before 13 still apply
    assert run(req(estimated_cost=5, request_id="req-1", model="nope"), snap(state)).reason == (
        "model_unavailable"
    )


def test_rate_limiter_sees_the_model_limit_and_only_when_all_else_passed() -> None:
    calls: list[tuple[str, str, RateLimit, datetime]] = []

    def rate_limit(account_id: str, model: str, limit: RateLimit, now: datetime) -> int | None:
        calls.append((account_id, model, limit, now))
        return None

    state = world()
    star = RateLimit("acct_user", "*", 5, 60, 1)
    own = RateLimit("acct_user", "gpt-4o", 2, 10, 2)
    state.rate_limits[("acct_user", "*")] = star
    state.rate_limits[("acct_user", "gpt-4o")] = own
    snapshot = snap(state)

    decision = run(req(), snapshot, rate_limit)
    assert decision.allowed
    assert (decision.rate_limit_key, decision.rate_limit) == (("acct_user", "gpt-4o"), own)
    assert calls == [("acct_user", "gpt-4o", own, NOW)]

    calls.clear()
    decision = run(req(model="tts-1"), snapshot, rate_limit)
    assert (decision.rate_limit_key, decision.rate_limit) == (("acct_user", "tts-1"), star)
    assert calls == [("acct_user", "tts-1", star, NOW)]

    calls.clear()
    assert run(req(estimated_cost=10**6), snapshot, rate_limit).reason == (
        "insufficient_user_quota"
    )
    assert calls == []


def test_no_limit_means_no_limiter_call() -> None:
    def boom(account_id: str, model: str, limit: RateLimit, now: datetime) -> int | None:
        raise AssertionError("not to be called")

    decision = run(req(), snap(), boom)
    assert decision.allowed
    assert decision.rate_limit_key is None


def test_retry_after_is_at_least_one_second() -> None:
    state = world()
    state.rate_limits[("acct_user", "gpt-4o")] = RateLimit("acct_user", "gpt-4o", 1, 1, 1)
    decision = run(req(), snap(state), limiter(0))
    assert (decision.status, decision.retry_after) == (429, 1)
    assert decision.body["error"]["message"] == (
        "The gpt-4o model Too many requests; please try again later."
    )


def test_snapshot_is_read_only_and_indexed() -> None:
    snapshot = snap()
    assert snapshot.tokens[sha(USER_KEY)].token_id == "tok_user"
    assert [c.channel_id for c in snapshot.serving[("default", "gpt-4o")]] == [1, 2]
    assert ("default", "gpt-4o") in snapshot.serving
    with pytest.raises(TypeError):
        snapshot.accounts["x"] = Account("x")  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# The request model


@pytest.mark.parametrize(
    "fields",
    [
        {"request": {"n": "1"}},
        {"request": {"n": 1.0}},
        {"request": {"n": True}},
        {"request": {"prompt": 5}},
        {"estimated_cost": 0},
        {"estimated_cost": -1},
        {"estimated_cost": "10"},
        {"estimated_cost": 10.0},
        {"estimated_cost": True},
        {"estimated_cost": 2**63},
        {"channel_id": 1.5},
        {"channel_id": True},
        {"channel_id": [1]},
        {"authorization": 5},
        {"client_ip": 5},
        {"model": 1},
        {"request_id": ""},
        {"request": "x"},
    ],
)
def test_wrong_types_are_validation_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AuthorizeRequest.model_validate({"authorization": "k", **fields})


def test_request_model_accepts_the_contract_example() -> None:
    body = {
        "authorization": "Bearer sk-...",
        "client_ip": "203.0.113.7",
        "route": "/v1/images/generations",
        "model": "dall-e-3",
        "channel_id": "12",
        "request": {"prompt": "a cat", "size": "1024x1024", "n": 1, "input": None},
        "estimated_cost": 1200,
        "request_id": "req-123",
        "extra": "ignored",
    }
    request = AuthorizeRequest.model_validate(body)
    assert request.channel_id == "12"
    assert request.request.n == 1
    assert AuthorizeRequest.model_validate({}).request.prompt is None
    assert AuthorizeRequest.model_validate({"channel_id": 12}).channel_id == 12


# --------------------------------------------------------------------------------------------
# Properties

SNAPSHOT = snap()
text = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    authorization=st.one_of(
        st.none(),
        text,
        text.map(lambda s: f"Bearer {s}"),
        text.map(lambda s: f"Bearer {ADMIN_KEY}-{s}"),
        text.map(lambda s: f"{USER_KEY}-{s}"),
        st.sampled_from([f"Bearer {USER_KEY}", ADMIN_KEY, GUEST_KEY]),
    ),
    client_ip=st.one_of(st.none(), text, st.ip_addresses().map(str)),
    route=st.one_of(st.none(), text, text.map(lambda s: "/v1/" + s)),
    model=st.one_of(st.none(), text, st.sampled_from(["gpt-4o", "dall-e-3", "tts-1"])),
    channel_id=st.one_of(st.none(), text, st.integers(), st.integers(0, 5).map(str)),
    prompt=st.one_of(st.none(), text),
    size=st.one_of(st.none(), text),
    n=st.one_of(st.none(), st.integers()),
    input_=st.one_of(st.none(), text, st.lists(text, max_size=3)),
    estimated_cost=st.one_of(st.none(), st.integers(1, 2**63 - 1)),
)
def test_decide_never_raises_and_always_answers_from_the_table(
    authorization: str | None,
    client_ip: str | None,
    route: str | None,
    model: str | None,
    channel_id: str | int | None,
    prompt: str | None,
    size: str | None,
    n: int | None,
    input_: str | list[str] | None,
    estimated_cost: int | None,
) -> None:
    request = AuthorizeRequest(
        authorization=authorization,
        client_ip=client_ip,
        route=route,
        model=model,
        channel_id=channel_id,
        request={"prompt": prompt, "size": size, "n": n, "input": input_},
        estimated_cost=estimated_cost,
    )
    decision = decide(request, SNAPSHOT, NOW)
    assert decision.body["position"] == POSITION
    if decision.allowed:
        assert decision.status == 200
        assert decision.body["channels"]
        assert decision.body["channels"] == sorted(decision.body["channels"])
    else:
        assert decision.reason is not None
        spec = ERRORS[decision.reason]
        assert decision.status == spec.status
        assert decision.body["error"]["code"] == spec.code
        assert "{" not in decision.body["error"]["message"].replace(str(model), "")


@settings(max_examples=200, deadline=None)
@given(suffix=st.text(max_size=12).filter(lambda s: "-" not in s))
def test_a_known_key_with_any_suffix_is_never_an_invalid_token(suffix: str) -> None:
    # The pin is what follows the key's last dash: any suffix without a dash is a pin.
    decision = decide(req(authorization=f"Bearer {USER_KEY}-{suffix}"), SNAPSHOT, NOW)
    assert decision.reason == "channel_pin_forbidden"
    assert decision.body["error"]["message"] == "Key error;(abc123)"


segments = st.lists(st.sampled_from(["a", "b", "ab", ""]), min_size=1, max_size=4)
routes = segments.map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(
    policies=st.lists(
        st.tuples(routes, st.booleans(), st.sampled_from(["guest", "user", "admin", "root"])),
        max_size=8,
    ),
    path=routes,
)
def test_route_match_is_the_longest_match(policies: list[tuple[str, bool, str]], path: str) -> None:
    table: dict[str, RoutePolicy] = {}
    for route, is_prefix, role in policies:
        name = route + "*" if is_prefix else route
        table[name] = RoutePolicy(name, role, 1)
    # Reference: exact match, else the longest prefix, by brute force.
    expected = table.get(path)
    if expected is None:
        prefixes = [p for p in table.values() if p.route.endswith("*")]
        matching = [p for p in prefixes if path.startswith(p.route[:-1])]
        expected = max(matching, key=lambda p: len(p.route), default=None)
    assert RouteTable.build(table.values()).match(path) == expected


@given(pin=st.text(max_size=25))
def test_parse_pin_accepts_only_positive_ascii_integers(pin: str) -> None:
    value = parse_pin(pin)
    if value is not None:
        assert pin.isascii() and pin.isdigit()
        assert 0 < value == int(pin)


# --------------------------------------------------------------------------------------------
# Budgets from the snapshot: its per-key coverage must follow period ends and budget changes


def budgeted_world(spend: dict[tuple[str, datetime], int]) -> State:
    state = world()
    for budget in (
        Budget("b_day", "acct_user", "account", None, None, 100, "day", "UTC", 10, 1),
        Budget("b_month", "acct_user", "token", "tok_user", "gpt-4o", 1000, "month",
               "Europe/Berlin", 0, 1),
    ):  # fmt: skip
        state.put_budget(budget)
    state.budget_spend.update(spend)
    return state


def test_budget_figures_follow_the_period_and_the_snapshots_budgets() -> None:
    day = datetime(2026, 11, 24, tzinfo=UTC)
    month = datetime(2026, 10, 31, 23, tzinfo=UTC)  # 2026-11-01 00:00 in Berlin (CET)
    state = budgeted_world({("b_day", day): 80, ("b_month", month): 500})
    snapshot = snap(state)
    figures = {f["budget_id"]: f for f in decide(req(), snapshot, NOW).body["budgets"]}
    assert figures["b_day"] == {
        "budget_id": "b_day", "scope": "account", "period": "day", "amount": 100, "spent": 80,
        "held": 10, "remaining": 10, "resets_at": "2026-11-25T00:00:00Z",
    }  # fmt: skip
    assert figures["b_month"]["remaining"] == 500
    assert figures["b_month"]["resets_at"] == "2026-11-30T23:00:00Z"
    # 10 left today: a cost of 11 is refused by the day budget, one of 10 is not.
    refused = decide(req(estimated_cost=11, dry_run=True), snapshot, NOW)
    assert refused.reason == "budget_exceeded"
    assert refused.body["error"]["reset_at"] == "2026-11-25T00:00:00Z"
    assert decide(req(estimated_cost=10, dry_run=True), snapshot, NOW).allowed
    # The same snapshot the next day: the day's spend is yesterday's, the month's still counts.
    tomorrow = NOW + timedelta(days=1)
    later = {f["budget_id"]: f for f in decide(req(), snapshot, tomorrow).body["budgets"]}
    assert later["b_day"]["spent"] == 0 and later["b_day"]["resets_at"] == "2026-11-26T00:00:00Z"
    assert later["b_month"]["spent"] == 500
    assert decide(req(estimated_cost=90, dry_run=True), snapshot, tomorrow).allowed
    # Back to today, and a snapshot whose budgets changed: no figure of the old one is kept.
    assert decide(req(estimated_cost=11, dry_run=True), snapshot, NOW).reason == "budget_exceeded"
    state.budget_spend[("b_day", day)] = 100
    moved = snapshot.updated(state, POSITION + 1, budgets=True)
    assert decide(req(), moved, NOW).reason == "budget_exceeded"
    # Another token of the account is covered by the account budget only.
    assert [b.budget_id for b in moved.budgets_covering("acct_user", "tok_other", None)] == [
        "b_day"
    ]
