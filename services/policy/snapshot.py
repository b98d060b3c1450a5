"""The snapshot `decide` reads: the projections at one ledger position, indexed (tokens by
key hash, channels serving each group and model, route policies by longest match)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from services.contract.events import ROLE_RANK
from services.policy.budget_view import MAX_COVERAGES, Coverage, CoverageCache, build_coverage
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
        path = route
        if "?" in path or "#" in path:
            path = path.split("?", 1)[0].split("#", 1)[0]
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
    for token in state.tokens.values():  # a rotated token's previous key, while in its grace
        if token.previous_key_sha256 is not None:
            tokens.setdefault(token.previous_key_sha256.lower(), token)
    networks = {
        token.token_id: parse_networks(token.allowed_cidrs)
        for token in state.tokens.values()
        if token.allowed_cidrs
    }
    return {"tokens": _freeze(tokens), "networks": _freeze(networks)}


def _budget_views(state: State) -> dict[str, Any]:
    return {
        "budgets_by_account": _freeze(state.budgets_by_account),
        "budget_spend": _freeze(state.budget_spend),
    }


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
        "serving": _freeze(
            {key: tuple(state.channels[i] for i in sorted(ids)) for key, ids in serving.items()}
        ),
    }


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """A read-only view of the projections at one ledger position, indexed for `decide`.

    `accounts` is a live view of the store's accounts (the hot, often-changing part): the
    store updates them and moves to the new snapshot without awaiting in between, so a
    decision, which never awaits, sees one position. The other indexes are rebuilt copies."""

    position: int
    accounts: Mapping[str, Account]
    #: key_sha256 (lowercase hex) -> token, revoked ones included; a rotated token is found
    #: by its previous key too (check 2 honours its `previous_valid_until`).
    tokens: Mapping[str, Token]
    channels: Mapping[int, Channel]
    models: Mapping[str, ModelSpec]
    routes: RouteTable
    rate_limits: Mapping[tuple[str, str], RateLimit]
    #: (group, model) -> the enabled channels serving that model to that group, by id.
    serving: Mapping[tuple[str, str], tuple[Channel, ...]]
    #: token_id -> the parsed networks of its `allowed_cidrs`.
    networks: Mapping[str, tuple[Network, ...]] = field(default_factory=lambda: _freeze({}))
    #: Live views, like `accounts`: account_id -> its budgets in check order, and
    #: (budget_id, period start) -> spend (recent periods only).
    budgets_by_account: Mapping[str, tuple[Budget, ...]] = field(
        default_factory=lambda: _freeze({})
    )
    budget_spend: Mapping[tuple[str, datetime], int] = field(default_factory=lambda: _freeze({}))
    #: The budgets' figures per covering key, built on first use (`coverage`); a snapshot
    #: whose budgets change starts a new one.
    coverages: CoverageCache = field(default_factory=dict)

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
            **_budget_views(state),
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
        budgets: bool = False,
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
        if budgets:
            parts.update(_budget_views(state), coverages={})
        return replace(self, **parts)

    def budgets_covering(self, account_id: str, token_id: str, model: str | None) -> list[Budget]:
        """The account's budgets that cover a request by `token_id` for `model`: its account
        budgets first, then its token budgets, each by id (the hold's order)."""
        return [b for b in self.budgets_by_account.get(account_id, ()) if b.covers(token_id, model)]

    def coverage(
        self, account_id: str, token_id: str, model: str | None, now: datetime
    ) -> Coverage | None:
        """The budgets covering a request by `token_id` for `model` at `now`, with their
        figures (None: no budget covers it)."""
        key = (account_id, token_id, model)
        found = self.coverages.get(key)
        if found is not None and found.holds(now):
            return found
        budgets = self.budgets_covering(account_id, token_id, model)
        if not budgets:
            return None
        if len(self.coverages) >= MAX_COVERAGES:
            self.coverages.clear()
        found = self.coverages[key] = build_coverage(budgets, self.budget_spend, now)
        return found

    def rate_limit_for(self, account_id: str, model: str) -> RateLimit | None:
        """The account's limit for the model, else its `*` limit; one that caps requests,
        units (`estimated_cost` summed), or both."""
        limit = self.rate_limits.get((account_id, model))
        if limit is None:
            limit = self.rate_limits.get((account_id, "*"))
        if limit is None or (limit.requests <= 0 and not limit.units):
            return None
        return limit
