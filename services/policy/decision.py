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

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.policy.budget_view import BudgetFigure
from services.policy.errors import (
    ACCOUNT_SUSPENDED,
    BUDGET_EXCEEDED,
    CHANNEL_DISABLED,
    CHANNEL_PIN_FORBIDDEN,
    CONCURRENCY_LIMITED,
    INSUFFICIENT_PERMISSIONS,
    INSUFFICIENT_USER_QUOTA,
    INVALID_CHANNEL_ID,
    IP_NOT_ALLOWED,
    MODEL_NOT_ALLOWED,
    MODEL_UNAVAILABLE,
    PROVIDER_RATE_LIMITED,
    RATE_LIMITED,
    SPECS,
    TOKEN_BUDGET_EXCEEDED,
    TOKEN_INVALID,
    TOKEN_MISSING,
)
from services.policy.inputs import (
    address_allowed,
    check_limits,
    extract_key,
    key_sha256,
    parse_address,
    parse_pin,
    seconds_until,
)
from services.policy.request import AuthorizeInput
from services.policy.snapshot import (
    ADMIN_RANK,
    Snapshot,
    parse_networks,
    required_rank,
    role_rank,
)
from services.store.model import (
    ACTIVE,
    TOKEN_SCOPE,
    Account,
    Channel,
    RateLimit,
    Token,
)


@dataclass(frozen=True, slots=True)
class Hold:
    """The reservation an allowed decision holds (or, for a repeated request id, held)."""

    id: str
    amount: int
    expires_at: str
    state: str


def snapshot_figures(
    snapshot: Snapshot, account_id: str, token_id: str, model: str | None, now: datetime
) -> tuple[BudgetFigure, ...]:
    """The snapshot's figures of the budgets covering a request by `token_id` for `model`."""
    coverage = snapshot.coverage(account_id, token_id, model, now)
    return () if coverage is None else coverage.figures


# Grant and Decision are not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, which costs a decision about two microseconds. Each is built for one
# request; only the service completes one, in place, before it is answered (a hold's
# reservation and figures, the rate limit's headers).
@dataclass(slots=True)
class Grant:
    """What an allowed decision tells the gateway."""

    account_id: str
    token_id: str
    role: str
    group: str
    balance: int
    available: int
    channels: tuple[int, ...]
    reservation: Hold | None = None
    budgets: tuple[BudgetFigure, ...] = ()


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a decision is denied: the error table's row (or the service's own refusal)."""

    reason: str
    message: str
    type: str
    code: str | None
    #: More fields of the error object (a budget denial's `reset_at`).
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(slots=True)
class Decision:
    """A decision, typed; `body` renders it in CONTRACT section 3's shape (once, at the edge)."""

    status: int
    position: int
    grant: Grant | None = None
    denial: Denial | None = None
    retry_after: int | None = None
    #: The (account_id, model) counter of check 14 and the limit to apply to it; None when the
    #: account has no limit for the model or the decision stopped before check 14.
    rate_limit_key: tuple[str, str] | None = None
    rate_limit: RateLimit | None = None
    #: `X-RateLimit-*` of the check-14 limit the decision was counted against (set by the
    #: service; none when it stopped before check 14 or the account has no limit for it).
    limit_headers: tuple[tuple[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.grant is not None

    @property
    def reason(self) -> str | None:
        return self.denial.reason if self.denial is not None else None

    @property
    def headers(self) -> dict[str, str]:
        headers = dict(self.limit_headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    @property
    def body(self) -> dict[str, Any]:
        """`{"allowed": true, "account_id", ..., "reservation", "position"}` or
        `{"allowed": false, "error": {"message", "type", "code", "reason"}, "position"}`."""
        grant, denial = self.grant, self.denial
        if grant is not None:
            hold = grant.reservation
            return {
                "allowed": True,
                "account_id": grant.account_id,
                "token_id": grant.token_id,
                "role": grant.role,
                "group": grant.group,
                "balance": grant.balance,
                "available": grant.available,
                "channels": list(grant.channels),
                "reservation": None
                if hold is None
                else {
                    "id": hold.id,
                    "amount": hold.amount,
                    "expires_at": hold.expires_at,
                    "state": hold.state,
                },
                "budgets": [figure.json for figure in grant.budgets],
                "position": self.position,
            }
        assert denial is not None
        return {
            "allowed": False,
            "error": {
                "message": denial.message,
                "type": denial.type,
                "code": denial.code,
                "reason": denial.reason,
                **dict(denial.extra),
            },
            "position": self.position,
        }


def refusal(
    status: int, reason: str, message: str, type_: str, position: int, retry_after: int | None
) -> Decision:
    """A denial of the service's own (not the error table's): stale snapshot, wrong service
    token, invalid request, a hold that cannot be written."""
    return Decision(status, position, None, Denial(reason, message, type_, reason), retry_after)


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
    spec = SPECS[reason]
    denial = Denial(reason, spec.render(key_last6, model), spec.type, spec.code)
    return Decision(spec.status, position, None, denial, retry_after, rate_limit_key, rate_limit)


def budget_denied(budget: BudgetFigure, position: int, key_last6: str) -> Decision:
    """Check 13a (an account budget) or 13b (a token budget): used up until `reset_at`."""
    reason = TOKEN_BUDGET_EXCEEDED if budget.scope == TOKEN_SCOPE else BUDGET_EXCEEDED
    spec = SPECS[reason]
    denial = Denial(
        reason, spec.render(key_last6, period=budget.period), spec.type, spec.code,
        (("reset_at", budget.resets_at),),
    )  # fmt: skip
    return Decision(spec.status, position, None, denial)


def concurrency_limited(position: int) -> Decision:
    """Check 13c: a hold would exceed the token's or the account's `max_concurrent`."""
    return deny(CONCURRENCY_LIMITED, position, retry_after=1)


def rate_limited(decision: Decision, retry_after: int) -> Decision:
    """Check 14 failed: the 429 for an allowed `decision` whose window is full, to retry after
    `retry_after` seconds (at least 1)."""
    if decision.rate_limit_key is None:
        raise ValueError("only a decision that names a rate limit can be rate limited")
    return deny(
        RATE_LIMITED,
        decision.position,
        model=decision.rate_limit_key[1],
        retry_after=max(retry_after, 1),
        rate_limit_key=decision.rate_limit_key,
        rate_limit=decision.rate_limit,
    )


def _resolve_key(
    key: str, snapshot: Snapshot, now: datetime
) -> tuple[Token, str, str | None] | None:
    """The token of a key, the key without its channel suffix, and the suffix (the pin). A
    rotated token's previous key resolves until its `previous_valid_until`, then no more."""
    # The whole key, then the key before its last `-` with the rest as the pin.
    base, dash, suffix = key.rpartition("-")
    readings: tuple[tuple[str, str | None], ...] = (
        ((key, None), (base, suffix)) if dash else ((key, None),)
    )
    for candidate, pin in readings:
        digest = key_sha256(candidate)
        token = snapshot.tokens.get(digest)
        if token is None:
            continue
        if digest != token.key_sha256 and (
            token.previous_valid_until is None or token.previous_valid_until <= now
        ):
            return None  # a rotated-away key past its grace
        return token, candidate, pin
    return None


def decide(request: AuthorizeInput, snapshot: Snapshot, now: datetime) -> Decision:
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
    resolved = _resolve_key(key, snapshot, now)
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
        eligible = snapshot.serving.get((account.group, model), ())
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
    # (see the module doc), and 13a-13b with it.
    available = account.balance - account.held
    cost = request.estimated_cost
    checked_here = cost is None or request.request_id is None or request.dry_run
    if checked_here and (available <= 0 or (cost is not None and cost > available)):
        return deny(INSUFFICIENT_USER_QUOTA, position)

    # 13a-13b. Every budget that covers the request has room for it (13c, the concurrency
    # caps, only the hold can tell: it counts the active holds).
    # A hold answers with the figures the hold function saw, so only a decision that holds
    # nothing shows the snapshot's.
    figures: tuple[BudgetFigure, ...] = ()
    coverage = snapshot.coverage(account.account_id, token.token_id, model, now)
    if coverage is not None:
        if checked_here:
            refused = coverage.refusal(cost)
            if refused is not None:
                return budget_denied(refused, position, last6)
        if cost is None or request.dry_run:
            figures = coverage.figures

    # 14. The account's rate limit for the model: named here, counted by the service.
    limit = snapshot.rate_limit_for(account.account_id, model)
    counter = (account.account_id, model) if limit is not None else None

    grant = Grant(
        account.account_id,
        token.token_id,
        account.role,
        account.group,
        account.balance,
        available,
        tuple([c.channel_id for c in free]),  # `eligible` is in channel id order
        budgets=figures,
    )
    return Decision(200, position, grant, None, None, counter, limit)
