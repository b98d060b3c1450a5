"""The policy decision: one pure function from a request and a snapshot of the projections.

`decide(request, snapshot, now)` runs the checks of POST /authorize (CONTRACT §3) in the
contract's order; the first that fails decides. It does no I/O: the clock is a parameter and
the projections come in a `Snapshot`. Check 14 needs a counter shared by the service (in
process or in Redis), so `decide` stops at naming it: an allowed decision carries the account's
limit for the model (`rate_limit_key`, `rate_limit`), the service counts the request against
it, and `rate_limited(decision, retry_after)` is the 429 when the window is full. Holding a
reservation (section 5) is the service's job too, after an allowed decision; the decision
leaves `"reservation": null` in the body for it to fill in. A request with both
`estimated_cost` and `request_id` skips check 13 here: the hold applies it, under the ledger
lock, after looking the request id up, so a retry of a hold (on any replica) gets that hold
back even when the snapshot shows too little left for a second one.

Choices where the contract is silent (documented here, tested in tests/policy):

- Error `type` by class: 401 `authentication_error`; 403 `permission_error`, except the balance
  row (403 `insufficient_quota`); 400 `invalid_request_error`; 429 `rate_limit_error`;
  503 `service_unavailable`.
- `authorization`: surrounding whitespace is ignored; the `Bearer` scheme is matched
  case-insensitively (RFC 9110); anything else is taken as a bare key. The key is hashed as UTF-8.
- Pins: an empty `channel_id` in the body counts as no pin (gateways forward empty headers); an
  empty key suffix (`sk-abc-`) is a pin, and an invalid one. A pin is a positive integer in ASCII
  digits (leading zeros allowed, no sign, no spaces). A key suffix and a body `channel_id` that
  name different channels are an invalid pin (400), for an admin; below admin any pin is 403.
- A pinned channel bypasses group matching (an admin pin picks the channel); it must still be
  enabled (check 9), serve the model (check 10) and not be provider-rate-limited (check 12).
- Routes: the query string and fragment are not part of the route. An exact policy beats any
  prefix policy; among prefixes the longest wins. When the request carries no `route`, the
  strictest policy applies (fail closed: the service cannot tell which route is being called).
- A missing `model` is an unknown model: denied at check 6 (token with `allowed_models`) or 10.
- Check 11 applies every limit a model has, whatever its kind, to the fields the request carries;
  only `prompt_missing` is kind-specific (image). So a chat model with `max_prompt_chars` gets
  `prompt_too_long`; an embedding model with `max_input_chars` gets `text_too_long`. A prompt of
  only whitespace is missing. `n` defaults to 1. `input` may be a string or a list of strings
  (embeddings), whose lengths add up. Lengths are in Unicode code points.
- Check 14: the account's limit for the model, else its `*` limit, counted per (account, model).
  The limiter is called only when every other check has passed, so only allowed decisions count.
- Retry-After is whole seconds rounded up, at least 1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.contract.events import INT64_MAX, ROLE_RANK
from services.ledger.fold import (
    ACTIVE,
    Account,
    Channel,
    ModelSpec,
    RateLimit,
    RoutePolicy,
    State,
    Token,
)

# --------------------------------------------------------------------------------------------
# The request


class RequestFields(BaseModel):
    """The fields of the client's own request body that check 11 needs; all optional."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: StrictStr | None = None
    size: StrictStr | None = None
    n: StrictInt | None = None
    input: StrictStr | list[StrictStr] | None = None


class AuthorizeRequest(BaseModel):
    """The body of POST /authorize. Types are strict: a wrong type is a validation error."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    authorization: StrictStr | None = None
    client_ip: StrictStr | None = None
    route: StrictStr | None = None
    model: StrictStr | None = None
    channel_id: StrictStr | StrictInt | None = None
    request: RequestFields = Field(default_factory=RequestFields)
    estimated_cost: Annotated[StrictInt, Field(gt=0, le=INT64_MAX)] | None = None
    #: Stored with the hold, so no U+0000 (PostgreSQL text cannot hold it).
    request_id: (
        Annotated[StrictStr, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$")] | None
    ) = None


# --------------------------------------------------------------------------------------------
# Errors: the contract's table, in code

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

AUTHENTICATION_ERROR: Final = "authentication_error"
PERMISSION_ERROR: Final = "permission_error"
INSUFFICIENT_QUOTA: Final = "insufficient_quota"
INVALID_REQUEST_ERROR: Final = "invalid_request_error"
RATE_LIMIT_ERROR: Final = "rate_limit_error"
SERVICE_UNAVAILABLE: Final = "service_unavailable"

#: Placeholders in message templates: the key's last six characters, and the model's name.
KEY_PLACEHOLDER: Final = "{key}"
MODEL_PLACEHOLDER: Final = "{model}"


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    code: str | None
    type: str
    message: str

    def render(self, key_last6: str = "", model: str = "") -> str:
        return self.message.replace(KEY_PLACEHOLDER, key_last6).replace(MODEL_PLACEHOLDER, model)


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


# --------------------------------------------------------------------------------------------
# The snapshot

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ADMIN_RANK: Final = ROLE_RANK["admin"]
_STRICTEST_RANK: Final = max(ROLE_RANK.values())


def role_rank(role: str) -> int:
    """An account's rank; an unknown role ranks lowest."""
    return ROLE_RANK.get(role, 0)


def required_rank(min_role: str) -> int:
    """A policy's required rank; an unknown role requires the highest (fail closed)."""
    return ROLE_RANK.get(min_role, _STRICTEST_RANK)


@dataclass(frozen=True, slots=True, eq=False)
class RouteTable:
    """Route policies indexed for the longest match: exact paths, and prefixes by length."""

    exact: Mapping[str, RoutePolicy]
    prefixes: Mapping[str, RoutePolicy]
    #: The distinct lengths of the prefixes, longest first: a lookup probes only these.
    prefix_lengths: tuple[int, ...]
    #: The highest rank any policy requires (applies when the request names no route).
    strictest: RoutePolicy | None

    @classmethod
    def build(cls, policies: Iterable[RoutePolicy]) -> RouteTable:
        exact: dict[str, RoutePolicy] = {}
        prefixes: dict[str, RoutePolicy] = {}
        strictest: RoutePolicy | None = None
        for policy in policies:
            if policy.route.endswith("*"):
                prefixes[policy.route[:-1]] = policy
            else:
                exact[policy.route] = policy
            if strictest is None or required_rank(policy.min_role) > required_rank(
                strictest.min_role
            ):
                strictest = policy
        lengths = tuple(sorted({len(prefix) for prefix in prefixes}, reverse=True))
        return cls(MappingProxyType(exact), MappingProxyType(prefixes), lengths, strictest)

    def match(self, route: str | None) -> RoutePolicy | None:
        """The policy that governs `route`: exact first, then the longest prefix."""
        if route is None:
            return self.strictest
        path = route.split("?", 1)[0].split("#", 1)[0]
        policy = self.exact.get(path)
        if policy is not None:
            return policy
        for length in self.prefix_lengths:
            if length <= len(path):
                policy = self.prefixes.get(path[:length])
                if policy is not None:
                    return policy
        return None


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The networks of a token's `allowed_cidrs`; unparsable entries admit no one."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            continue
    return tuple(networks)


def _freeze(mapping: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(mapping)


def _token_indexes(state: State) -> dict[str, Any]:
    tokens = {token.key_sha256.lower(): token for token in state.tokens.values()}
    networks = {
        token.token_id: parse_networks(token.allowed_cidrs)
        for token in state.tokens.values()
        if token.allowed_cidrs
    }
    return {"tokens": _freeze(tokens), "networks": _freeze(networks)}


def _catalog_indexes(state: State) -> dict[str, Any]:
    serving: dict[tuple[str, str], list[int]] = {}
    for channel in state.channels.values():
        if not channel.enabled:
            continue
        for group in set(channel.groups):
            for model in set(channel.models):
                serving.setdefault((group, model), []).append(channel.channel_id)
    return {
        "channels": _freeze(dict(state.channels)),
        "models": _freeze(dict(state.models)),
        "routes": RouteTable.build(state.routes.values()),
        "serving": _freeze({key: tuple(sorted(ids)) for key, ids in serving.items()}),
    }


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """A read-only view of the projections at one ledger position, indexed for `decide`.

    `accounts` is a live view of the store's accounts (the hot, often-changing part): the
    store updates them and moves to the new snapshot without awaiting in between, so a
    decision, which never awaits, sees one position. The other indexes are rebuilt copies."""

    position: int
    accounts: Mapping[str, Account]
    #: key_sha256 (lowercase hex) -> token, revoked ones included.
    tokens: Mapping[str, Token]
    channels: Mapping[int, Channel]
    models: Mapping[str, ModelSpec]
    routes: RouteTable
    rate_limits: Mapping[tuple[str, str], RateLimit]
    #: (group, model) -> ids of the enabled channels serving that model to that group, sorted.
    serving: Mapping[tuple[str, str], tuple[int, ...]]
    #: token_id -> the parsed networks of its `allowed_cidrs`.
    networks: Mapping[str, tuple[Network, ...]] = field(default_factory=lambda: _freeze({}))

    @classmethod
    def from_state(cls, state: State, position: int) -> Snapshot:
        return cls(
            position=position,
            # A live read-only view: the store moves accounts and position together, between
            # two decisions, and copying every account per change costs O(accounts).
            accounts=_freeze(state.accounts),
            **_token_indexes(state),
            **_catalog_indexes(state),
            rate_limits=_freeze(dict(state.rate_limits)),
        )

    def updated(
        self,
        state: State,
        position: int,
        *,
        accounts: bool = False,
        tokens: bool = False,
        catalog: bool = False,
        rate_limits: bool = False,
    ) -> Snapshot:
        """This snapshot moved to `position`, re-indexing only the parts that changed."""
        parts: dict[str, Any] = {"position": position}
        if accounts:
            parts["accounts"] = _freeze(state.accounts)
        if tokens:
            parts.update(_token_indexes(state))
        if catalog:
            parts.update(_catalog_indexes(state))
        if rate_limits:
            parts["rate_limits"] = _freeze(dict(state.rate_limits))
        return replace(self, **parts)

    def rate_limit_for(self, account_id: str, model: str) -> RateLimit | None:
        """The account's limit for the model, else its `*` limit."""
        limit = self.rate_limits.get((account_id, model))
        if limit is None:
            limit = self.rate_limits.get((account_id, "*"))
        return limit if limit is not None and limit.requests > 0 else None


# --------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True, slots=True)
class Decision:
    status: int
    allowed: bool
    reason: str | None
    body: dict[str, Any]
    retry_after: int | None = None
    #: The (account_id, model) counter of check 14 and the limit to apply to it; None when the
    #: account has no limit for the model or the decision stopped before check 14.
    rate_limit_key: tuple[str, str] | None = None
    rate_limit: RateLimit | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def deny(
    reason: str,
    position: int,
    *,
    key_last6: str = "",
    model: str = "",
    retry_after: int | None = None,
    rate_limit_key: tuple[str, str] | None = None,
    rate_limit: RateLimit | None = None,
) -> Decision:
    spec = ERRORS[reason]
    body = {
        "allowed": False,
        "error": {
            "message": spec.render(key_last6, model),
            "type": spec.type,
            "code": spec.code,
            "reason": reason,
        },
        "position": position,
    }
    return Decision(spec.status, False, reason, body, retry_after, rate_limit_key, rate_limit)


def rate_limited(decision: Decision, retry_after: int) -> Decision:
    """Check 14 failed: the 429 for an allowed `decision` whose window is full, to retry after
    `retry_after` seconds (at least 1)."""
    if decision.rate_limit_key is None:
        raise ValueError("only a decision that names a rate limit can be rate limited")
    return deny(
        RATE_LIMITED,
        decision.body["position"],
        model=decision.rate_limit_key[1],
        retry_after=max(retry_after, 1),
        rate_limit_key=decision.rate_limit_key,
        rate_limit=decision.rate_limit,
    )


_BEARER: Final = re.compile(r"bearer(?:\s+(.*))?", re.IGNORECASE | re.DOTALL)
_PIN: Final = re.compile(r"[0-9]{1,19}")


def extract_key(authorization: str | None) -> str:
    """The key of an Authorization value: `Bearer <key>` or a bare key; "" when there is none."""
    if authorization is None:
        return ""
    value = authorization.strip()
    bearer = _BEARER.fullmatch(value)
    if bearer is not None:
        return (bearer.group(1) or "").strip()
    return value


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_pin(pin: str | int) -> int | None:
    """A pinned channel id: a positive integer within int64, or None when it is not one."""
    if isinstance(pin, int):
        value = pin
    elif _PIN.fullmatch(pin):
        value = int(pin)
    else:
        return None
    return value if 0 < value <= INT64_MAX else None


def parse_address(client_ip: str | None) -> Address | None:
    if client_ip is None:
        return None
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_allowed(address: Address | None, networks: Iterable[Network]) -> bool:
    """Whether the address is in one of the networks; IPv4-mapped IPv6 matches IPv4 networks."""
    if address is None:
        return False
    candidates: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    else:
        candidates.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    for network in networks:
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return True
    return False


def seconds_until(later: datetime, now: datetime) -> int:
    """Whole seconds from `now` to `later`, rounded up, at least 1."""
    delta = later - now
    seconds = delta.days * 86400 + delta.seconds + (1 if delta.microseconds else 0)
    return max(seconds, 1)


def text_length(value: str | list[str] | None) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return sum(len(item) for item in value)


def check_limits(spec: ModelSpec, fields: RequestFields) -> str | None:
    """Check 11: the first of the model's limits the request breaks, as a reason."""
    limits = spec.limits
    prompt = fields.prompt
    if spec.kind == "image" and (prompt is None or not prompt.strip()):
        return PROMPT_MISSING
    max_prompt = limits.get("max_prompt_chars")
    if max_prompt is not None and prompt is not None and len(prompt) > max_prompt:
        return PROMPT_TOO_LONG
    sizes = limits.get("sizes")
    if sizes is not None and fields.size is not None and fields.size not in sizes:
        return SIZE_NOT_SUPPORTED
    n_min, n_max = limits.get("n_min"), limits.get("n_max")
    if n_min is not None or n_max is not None:
        n = 1 if fields.n is None else fields.n
        if (n_min is not None and n < n_min) or (n_max is not None and n > n_max):
            return N_NOT_WITHIN_RANGE
    max_input = limits.get("max_input_chars")
    if max_input is not None and text_length(fields.input) > max_input:
        return TEXT_TOO_LONG
    return None


def _resolve_key(key: str, snapshot: Snapshot) -> tuple[Token, str, str | None] | None:
    """The token of a key, the key without its channel suffix, and the suffix (the pin)."""
    token = snapshot.tokens.get(key_sha256(key))
    if token is not None:
        return token, key, None
    base, dash, suffix = key.rpartition("-")
    if dash:
        token = snapshot.tokens.get(key_sha256(base))
        if token is not None:
            return token, base, suffix
    return None


def decide(request: AuthorizeRequest, snapshot: Snapshot, now: datetime) -> Decision:
    """Run the contract's checks in order; the first that fails decides (check 14: see the
    module doc and `rate_limited`)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    position = snapshot.position

    # 1. A key at all.
    key = extract_key(request.authorization)
    if not key:
        return deny(TOKEN_MISSING, position)

    # 2. A known, live token.
    resolved = _resolve_key(key, snapshot)
    if resolved is None:
        return deny(TOKEN_INVALID, position)
    token, base_key, key_pin = resolved
    if token.revoked or (token.expires_at is not None and token.expires_at <= now):
        return deny(TOKEN_INVALID, position)
    last6 = base_key[-6:]

    # 3. The client's address.
    if token.allowed_cidrs:
        networks = snapshot.networks.get(token.token_id)
        if networks is None:
            networks = parse_networks(token.allowed_cidrs)
        if not address_allowed(parse_address(request.client_ip), networks):
            return deny(IP_NOT_ALLOWED, position, key_last6=last6)

    # 4. The account's status.
    account = snapshot.accounts.get(token.account_id) or Account(account_id=token.account_id)
    if account.status != ACTIVE:
        return deny(ACCOUNT_SUSPENDED, position)

    # 5. The route's minimum role.
    rank = role_rank(account.role)
    policy = snapshot.routes.match(request.route)
    if policy is not None and required_rank(policy.min_role) > rank:
        return deny(INSUFFICIENT_PERMISSIONS, position)

    # 6. The token's models.
    model = request.model
    if token.allowed_models and model not in token.allowed_models:
        return deny(MODEL_NOT_ALLOWED, position, key_last6=last6)

    # 7. Pinning a channel is for admins.
    pins: list[str | int] = []
    if key_pin is not None:
        pins.append(key_pin)
    if request.channel_id is not None and request.channel_id != "":
        pins.append(request.channel_id)
    if pins and rank < ADMIN_RANK:
        return deny(CHANNEL_PIN_FORBIDDEN, position, key_last6=last6)

    # 8. The pin names a channel.
    pinned: Channel | None = None
    if pins:
        ids = {parse_pin(pin) for pin in pins}
        channel_id = ids.pop() if len(ids) == 1 else None
        pinned = snapshot.channels.get(channel_id) if channel_id is not None else None
        if pinned is None:
            return deny(INVALID_CHANNEL_ID, position)

        # 9. The pinned channel is enabled.
        if not pinned.enabled:
            return deny(CHANNEL_DISABLED, position)

    # 10. The model exists and a channel serves it.
    spec = snapshot.models.get(model) if model is not None else None
    if spec is None or model is None:
        return deny(MODEL_UNAVAILABLE, position)
    if pinned is not None:
        if model not in pinned.models:
            return deny(MODEL_UNAVAILABLE, position)
        eligible: tuple[Channel, ...] = (pinned,)
    else:
        ids_serving = snapshot.serving.get((account.group, model), ())
        eligible = tuple(snapshot.channels[i] for i in ids_serving if i in snapshot.channels)
        if not eligible:
            return deny(MODEL_UNAVAILABLE, position)

    # 11. The request fits the model's limits.
    broken = check_limits(spec, request.request)
    if broken is not None:
        return deny(broken, position)

    # 12. Some eligible channel is not rate-limited by its provider.
    free = [c for c in eligible if c.rate_limited_until is None or c.rate_limited_until <= now]
    if not free:
        ends = min(c.rate_limited_until for c in eligible if c.rate_limited_until is not None)
        return deny(PROVIDER_RATE_LIMITED, position, retry_after=seconds_until(ends, now))

    # 13. The balance covers the request; for a hold with a request id, the hold decides it
    # (see the module doc).
    available = account.balance - account.held
    cost = request.estimated_cost
    if (cost is None or request.request_id is None) and (
        available <= 0 or (cost is not None and cost > available)
    ):
        return deny(INSUFFICIENT_USER_QUOTA, position)

    # 14. The account's rate limit for the model: named here, counted by the service.
    limit = snapshot.rate_limit_for(account.account_id, model)
    counter = (account.account_id, model) if limit is not None else None

    body: dict[str, Any] = {
        "allowed": True,
        "account_id": account.account_id,
        "token_id": token.token_id,
        "role": account.role,
        "group": account.group,
        "balance": account.balance,
        "available": available,
        "channels": sorted(c.channel_id for c in free),
        "reservation": None,
        "position": position,
    }
    return Decision(200, True, None, body, None, counter, limit)
