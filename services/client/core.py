"""What the sync and async clients share: building requests, reading answers, the retry
bookkeeping (`_Core`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from services.contract.samples import cloud_event

if TYPE_CHECKING:
    pass

from services.client.model import (
    _UNDECIDED,
    SERVICE_TOKEN_HEADER,
    UNAVAILABLE_MESSAGE,
    USAGE_RECORDED,
    Budget,
    Decision,
    FailMode,
    Hold,
    QuotaError,
    QuotaUnavailable,
    Reason,
    Reservation,
    Retry,
    _Outcome,
    _pick,
    log,
)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_field(body: Any, name: str) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    value = error.get(name) if isinstance(error, dict) else None
    return value if isinstance(value, str) else None


def _retry_after(outcome: _Outcome) -> tuple[bool, float | None]:
    """Whether `outcome` is worth another attempt, and the Retry-After it asks for."""
    if isinstance(outcome, httpx.TransportError):
        return True, None
    header = outcome.headers.get("retry-after", "").strip()
    if outcome.status_code != 503 or not header.isdigit():
        return False, None
    if _error_field(_json(outcome), "reason") == Reason.PROVIDER_RATE_LIMITED:
        return False, None
    return True, float(header)


class _Attempts:
    """The retry loop's state: `pause(outcome)` is None to stop with `outcome`, else the
    seconds to wait before the next attempt."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.made = 0
        self.started = time.monotonic()

    def pause(self, outcome: _Outcome) -> float | None:
        self.made += 1
        again, retry_after = _retry_after(outcome)
        if not again or self.made >= self.retry.attempts:
            return None
        pause = self.retry.pause(self.made, retry_after)
        if time.monotonic() - self.started + pause > self.retry.total_seconds:
            return None
        return pause


def _describe(outcome: _Outcome) -> str:
    if isinstance(outcome, httpx.TransportError):
        return f"{type(outcome).__name__}: {outcome}" if str(outcome) else type(outcome).__name__
    answer = _json(outcome)
    code = _error_field(answer, "reason") or _error_field(answer, "code")
    return f"HTTP {outcome.status_code}" + (f" {code}" if code else "")


def _error(outcome: _Outcome, what: str) -> QuotaError:
    """The exception for a call that did not get the answer it wanted."""
    if isinstance(outcome, httpx.TransportError):
        error: QuotaError = QuotaUnavailable(f"{what}: {_describe(outcome)}")
        error.__cause__ = outcome
        return error
    kind = QuotaUnavailable if outcome.status_code == 503 else QuotaError
    code = _error_field(_json(outcome), "code")
    return kind(f"{what}: {_describe(outcome)}", status=outcome.status_code, code=code)


# --------------------------------------------------------------------------------- the core


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    url: str
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _Core:
    """What both clients share: the configuration, the requests and reading the answers."""

    def __init__(
        self,
        policy_url: str,
        fail_mode: FailMode,
        service_token: str | None,
        ledger_url: str | None,
        ledger_token: str | None,
        retry: Retry,
        source: str,
    ) -> None:
        if not isinstance(fail_mode, FailMode):
            raise TypeError("fail_mode must be FailMode.OPEN or FailMode.CLOSED")
        self.policy_url = policy_url.rstrip("/")
        self.fail_mode = fail_mode
        self.ledger_url = ledger_url.rstrip("/") if ledger_url else None
        self.retry = retry
        self.source = source
        self.policy_headers = {"Content-Type": "application/json"}
        if service_token is not None:
            self.policy_headers[SERVICE_TOKEN_HEADER] = service_token
        self.ledger_headers = {"Content-Type": "application/json"}
        if ledger_token is not None:
            self.ledger_headers["Authorization"] = f"Bearer {ledger_token}"

    # authorize

    def authorize_call(
        self,
        authorization: str | None,
        model: str | None,
        route: str | None,
        client_ip: str | None,
        channel_id: str | int | None,
        request: Mapping[str, Any] | None,
        estimated_cost: int | None,
        request_id: str | None,
        dry_run: bool,
    ) -> tuple[_Call, dict[str, Any]]:
        """The `POST /authorize` call and its body. A hold without `request_id` gets one when
        it may be retried, so that a retry (of this very body) finds the hold instead of making
        a second; with `NO_RETRY` the body is sent as given."""
        retried = self.retry.attempts > 1
        if estimated_cost is not None and request_id is None and not dry_run and retried:
            request_id = f"qc-{uuid.uuid4().hex}"
        given = {
            "authorization": authorization, "model": model, "route": route,
            "client_ip": client_ip, "channel_id": channel_id, "request": request,
            "estimated_cost": estimated_cost, "request_id": request_id,
        }  # fmt: skip
        body = {name: value for name, value in given.items() if value is not None}
        if dry_run:
            body["dry_run"] = True
        content = json.dumps(body, separators=(",", ":")).encode()
        return _Call("POST", f"{self.policy_url}/authorize", content, self.policy_headers), body

    def decision(self, outcome: _Outcome, body: Mapping[str, Any]) -> Decision:
        """The answer as a `Decision`; the fail mode's when the policy could not decide."""
        answer = _json(outcome) if isinstance(outcome, httpx.Response) else None
        if not (isinstance(answer, dict) and isinstance(answer.get("allowed"), bool)):
            return self.fallback(_describe(outcome), body)
        assert isinstance(outcome, httpx.Response)
        decision = _parse_decision(outcome, answer, body)
        if decision.reason in _UNDECIDED and self.fail_mode is FailMode.OPEN:
            return self.fallback(_describe(outcome), body)
        return decision

    def fallback(self, cause: str, body: Mapping[str, Any]) -> Decision:
        """The decision of the fail mode, when the policy could not decide because of `cause`."""
        log.warning("quota policy could not decide (%s): failing %s", cause, self.fail_mode)
        asked: dict[str, Any] = {"request_id": body.get("request_id"), "model": body.get("model")}
        code = Reason.QUOTA_UNAVAILABLE
        if self.fail_mode is FailMode.OPEN:
            return Decision(True, 200, code, code.value, cause=cause, degraded=True, **asked)
        error = {"message": UNAVAILABLE_MESSAGE, "type": "service_unavailable", "code": None,
                 "reason": code.value}  # fmt: skip
        return Decision(
            False, 503, code, code.value, UNAVAILABLE_MESSAGE, retry_after=1, degraded=True,
            cause=cause, raw={"allowed": False, "error": error},
            headers=httpx.Headers({"Retry-After": "1"}),
            **asked,
        )  # fmt: skip

    # reservations

    def reservation_call(self, reservation_id: str, release: bool) -> _Call:
        path = f"/reservations/{quote(reservation_id, safe='')}"
        if release:
            return _Call("POST", f"{self.policy_url}{path}/release", None, self.policy_headers)
        return _Call("GET", f"{self.policy_url}{path}", None, self.policy_headers)

    def reservation(self, outcome: _Outcome, what: str) -> Reservation | None:
        """The reservation answered (200, or a release's 409: already settled or expired);
        None for an unknown id; else `QuotaError`."""
        if isinstance(outcome, httpx.Response):
            answer = _json(outcome)
            if outcome.status_code in (200, 409) and isinstance(answer, dict):
                return _pick(Reservation, answer)
            if outcome.status_code == 404 and _error_field(answer, "code") == "unknown_reservation":
                return None
        raise _error(outcome, what)

    # events

    def usage(
        self, decision: Decision, amount: int, model: str | None, event_id: str | None
    ) -> dict[str, Any] | None:
        """The `usage_recorded` event settling `decision` (its hold, when it has one); None
        for a degraded decision, which knows no account."""
        if not decision.allowed:
            raise ValueError("settle: the decision was denied; there is nothing to settle")
        if decision.account_id is None:
            log.warning("settle: a degraded decision knows no account; usage %d not recorded",
                        amount)  # fmt: skip
            return None
        data: dict[str, Any] = {"amount": amount}
        optional = {
            "model": model or decision.model, "token_id": decision.token_id,
            "request_id": decision.request_id,
            "reservation_id": decision.reservation.id if decision.reservation else None,
        }  # fmt: skip
        data.update((name, value) for name, value in optional.items() if value is not None)
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return cloud_event(USAGE_RECORDED, decision.account_id, data, event_id=event_id,
                           time=now, source=self.source)  # fmt: skip

    def publish_call(self, events: Sequence[Mapping[str, Any]]) -> _Call:
        if self.ledger_url is None:
            raise ValueError("publishing needs ledger_url (POST /events) or a produce callable")
        content = json.dumps(list(events), separators=(",", ":")).encode()
        return _Call("POST", f"{self.ledger_url}/events", content, self.ledger_headers)

    def published(self, outcome: _Outcome) -> list[str]:
        if isinstance(outcome, httpx.Response) and outcome.status_code == 202:
            ids: list[str] = outcome.json()["ids"]
            return ids
        raise _error(outcome, "POST /events")


def _parse_decision(
    response: httpx.Response, answer: dict[str, Any], body: Mapping[str, Any]
) -> Decision:
    """A decision's JSON (CONTRACT section 3), typed."""
    headers = httpx.Headers(
        [
            (name, value)
            for name, value in response.headers.multi_items()
            if name == "retry-after" or name.startswith("x-ratelimit-")
        ]
    )
    retry_after = response.headers.get("retry-after", "").strip()
    common: dict[str, Any] = {
        "status": response.status_code,
        "position": answer.get("position"),
        "retry_after": int(retry_after) if retry_after.isdigit() else None,
        "request_id": body.get("request_id"),
        "model": body.get("model"),
        "raw": answer,
        "headers": headers,
    }
    if not answer["allowed"]:
        code = _error_field(answer, "reason") or _error_field(answer, "code") or "unknown"
        message = _error_field(answer, "message")
        return Decision(False, reason=Reason.of(code), reason_code=code, message=message, **common)
    hold = answer.get("reservation")
    return Decision(
        True,
        account_id=answer.get("account_id"),
        token_id=answer.get("token_id"),
        role=answer.get("role"),
        group=answer.get("group"),
        balance=answer.get("balance"),
        available=answer.get("available"),
        channels=tuple(answer.get("channels") or ()),
        reservation=_pick(Hold, hold) if isinstance(hold, dict) else None,
        budgets=tuple(
            _pick(Budget, item) for item in answer.get("budgets") or () if isinstance(item, dict)
        ),
        **common,
    )


# --------------------------------------------------------------------------------- clients
