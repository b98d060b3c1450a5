"""deploy/prometheus/ and deploy/grafana/ against the real services, and the HTTP metrics.

- `promtool check rules` and `promtool test rules` (Debian's `prometheus` package) pass on
  alerts.yml and its unit tests, and every dashboard query parses (as a recording rule).
- A real ledger and a real policy process get some traffic (events, a quarantined record,
  allowed and denied decisions, a hold, a refused hold, a release); every metric named by a
  dashboard panel or an alert rule is in the `/metrics` exposition of one of them.
- `services.http_metrics` counts responses by status class (a route that raises is a 5xx)
  and leaves the probes and the scrape out.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from fastapi import FastAPI, HTTPException
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services import http_metrics
from services.settings import Settings
from tests.builders import (
    cloud_event,
    produce_raw,
    recharge,
    token_issued,
    wait_for_position,
    wait_for_rejected,
)
from tests.conftest import ADMIN_TOKEN
from tests.processes import QuotaProcesses

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "quota.json"
PROMTOOL_FALLBACK = "/usr/bin/promtool"

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
KEY = "sk-observe-key-0000000000000001"


# --------------------------------------------------------------------------- promtool


def promtool() -> str:
    found = shutil.which("promtool") or PROMTOOL_FALLBACK
    if not Path(found).exists():
        pytest.fail(
            "promtool is not installed (looked on PATH and at /usr/bin/promtool). "
            "`python3 bootstrap.py test` installs Debian's `prometheus` package, which holds "
            "it, when run as root; otherwise: apt-get install --no-install-recommends prometheus"
        )
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_the_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    checked = run_promtool("check", "rules", str(ALERTS))
    assert "SUCCESS" in checked
    run_promtool("test", "rules", str(ALERTS_TEST))


def test_every_alert_has_a_for_a_severity_and_annotations_that_say_what_to_do() -> None:
    rules = alert_rules()
    tested = alerts_with_firing_tests()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name} has no for:"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook_url"].partition("#")
        doc = ROOT / page
        assert doc.exists(), f"{name}: {page} does not exist"
        assert anchor in markdown_anchors(doc), f"{name}: no section #{anchor} in {page}"
        assert name in tested, f"{name} has no unit test in which it fires"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each panel's expr, with Grafana's interval variables filled in, as a recording rule;
    every panel asks the data source the dashboard's `datasource` variable picks."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    rules = [
        {"record": f"dashboard:panel_{panel_id}_{ref_id}", "expr": grafana_expanded(expr)}
        for panel_id, ref_id, expr in dashboard_queries()
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in checked


# --------------------------------------------------------------------------- the files


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts_with_firing_tests() -> set[str]:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def dashboard_queries() -> Iterator[tuple[int, str, str]]:
    """(panel id, refId, expr) of every query of every panel, rows' panels included."""
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[int, str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["id"], target["refId"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])


def grafana_expanded(expr: str) -> str:
    return re.sub(r"\$(__rate_interval|__interval|__range)\b", "5m", expr)


# --------------------------------------------------------------------------- PromQL names

#: Identifiers of PromQL that are not metric names (functions are told by their parenthesis).
PROMQL_KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "offset", "atan2", "sum", "min", "max", "avg", "group", "stddev", "stdvar",
        "count", "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
        "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_DURATION = re.compile(r"(?<![\w:.])(?:\d+(?:ms|[smhdwy]))+\b")
_NUMBER = re.compile(r"(?<![\w:])(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in matchers and grouping clauses) or Grafana variables."""
    text = _STRING.sub(" ", expr)  # strings first: a regex matcher may hold braces
    for pattern in (_MATCHERS, _BRACKETS, _GROUPING, _VARIABLE, _DURATION, _NUMBER):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if match.group() in PROMQL_KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(match.group())
    return names


def test_metric_names_are_told_from_functions_keywords_and_labels() -> None:
    expr = """
        (clamp_min(sum by (job) (rate(a_total{service="policy", code=~"5x{2}"}[5m]))
          - sum by(job)(rate(b_total{reason=~"(x|y)"}[$__rate_interval] offset 1h30m)), 0)
         / on (job) group_left (le) c_bucket > 0.5e-3 * d_seconds)
        unless on(job) max_over_time(e_age[5m:1m]) > bool 1e3 or vector(0)
        and label_replace(f_info, "dst", "$1", "src", "(.*)") and count(g == 0) by (loop)
    """
    assert metric_names(expr) == {
        "a_total", "b_total", "c_bucket", "d_seconds", "e_age", "f_info", "g",
    }  # fmt: skip
    rule = next(r for r in alert_rules() if r["alert"] == "QuotaPolicyServerErrors")
    assert metric_names(rule["expr"]) == {
        "quota_http_responses_total",
        "quota_policy_decisions_total",
        "quota_policy_snapshot_age_seconds",
        "quota_policy_max_staleness_seconds",
    }


Families = dict[str, str]  # family name -> type


def exposed(text: str) -> tuple[Families, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The metric families of an exposition (declared ones too, with no sample yet) and its
    samples by (name, labels)."""
    families: Families = {}
    samples = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def family_of(name: str, families: Families) -> str | None:
    """The exposed family a name in a query selects (`_total` of a counter, `_bucket`,
    `_sum`, `_count` of a histogram), or None."""
    if name in families:
        return name
    suffixes = {"_total": ("counter",), "_bucket": ("histogram",),
                "_sum": ("histogram", "summary"), "_count": ("histogram", "summary")}  # fmt: skip
    for suffix, types in suffixes.items():
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in types:
            return base
    return None


# --------------------------------------------------------------------------- the real services


def world() -> list[dict[str, Any]]:
    return [
        cloud_event("quota.model.registered", "catalog", {"model": "gpt-4o", "kind": "chat"}),
        cloud_event("quota.channel.registered", "catalog",
                    {"channel_id": 1, "models": ["gpt-4o"], "groups": ["default"]}),
        recharge("acct_observe", 100),
        token_issued("acct_observe", "tok_observe", KEY),
    ]  # fmt: skip


def ask(key: str | None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"route": "/v1/chat/completions", "model": "gpt-4o", **fields}
    if key is not None:
        body["authorization"] = f"Bearer {key}"
    return body


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.timeout(120)
async def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(
    settings: Settings, pool: asyncpg.Pool, quota_processes: QuotaProcesses
) -> None:
    ledger = quota_processes.start("ledger", "ledger")
    policy = quota_processes.start("policy", "policy")
    await asyncio.gather(quota_processes.wait_ready(ledger), quota_processes.wait_ready(policy))
    events = world()
    async with (
        httpx.AsyncClient(base_url=ledger.url, trust_env=False, timeout=10) as to_ledger,
        httpx.AsyncClient(base_url=policy.url, trust_env=False, timeout=10) as to_policy,
    ):
        published = await to_ledger.post("/events", json=events, headers=ADMIN)
        assert published.status_code == 202, published.text
        await produce_raw(settings.kafka_bootstrap, settings.topic, [(b"x", b"not json", [])])
        await wait_for_position(pool, len(events))
        await wait_for_rejected(pool, 1)
        await quota_processes.wait_ready(policy, len(events))

        allowed = await to_policy.post("/authorize", json=ask(KEY))
        assert allowed.status_code == 200, allowed.text
        missing = await to_policy.post("/authorize", json=ask(None))
        assert missing.status_code == 401, missing.text
        held = await to_policy.post("/authorize", json=ask(KEY, estimated_cost=10))
        assert held.status_code == 200, held.text
        refused = await to_policy.post("/authorize", json=ask(KEY, estimated_cost=1_000))
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["reason"] == "insufficient_user_quota"
        reservation = held.json()["reservation"]["id"]
        released = await to_policy.post(f"/reservations/{reservation}/release")
        assert released.status_code == 200, released.text

        ledger_text = (await to_ledger.get("/metrics")).text
        policy_text = (await to_policy.get("/metrics")).text

    ledger_families, ledger_samples = exposed(ledger_text)
    policy_families, policy_samples = exposed(policy_text)
    families = {**ledger_families, **policy_families}

    # Every name a panel or a rule selects is a family one of the services exports.
    named: dict[str, set[str]] = {}
    for panel_id, ref_id, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"panel {panel_id} query {ref_id} names no metric: {expr}"
        for name in names:
            named.setdefault(name, set()).add(f"dashboard panel {panel_id} ({ref_id})")
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            named.setdefault(name, set()).add(f"alert {rule['alert']}")
    missing_names = {
        name: sorted(where) for name, where in named.items() if family_of(name, families) is None
    }
    assert not missing_names, f"named but exported by neither service: {missing_names}"

    # The traffic shows in the figures the panels draw.
    policy_2xx = sample(policy_samples, "quota_http_responses_total", service="policy", code="2xx")
    policy_4xx = sample(policy_samples, "quota_http_responses_total", service="policy", code="4xx")
    assert (policy_2xx, policy_4xx) == (3, 2)  # probes and scrapes are not counted
    timed = sample(policy_samples, "quota_http_request_seconds_count", service="policy")
    assert timed == 5
    assert sample(policy_samples, "quota_policy_decisions_total", reason="allowed") == 2
    assert sample(policy_samples, "quota_policy_decisions_total", reason="token_missing") == 1
    assert (
        sample(policy_samples, "quota_policy_decisions_total", reason="insufficient_user_quota")
        == 1
    )
    assert sample(policy_samples, "quota_policy_hold_batch_size_count") >= 1
    assert sample(policy_samples, "quota_policy_snapshot_position") >= len(events)
    age = sample(policy_samples, "quota_policy_snapshot_age_seconds")
    assert 0 <= age < sample(policy_samples, "quota_policy_max_staleness_seconds") == 10
    assert sample(ledger_samples, "quota_http_responses_total", service="ledger", code="2xx") == 1
    assert sample(ledger_samples, "quota_ledger_events_applied_total") == len(events)
    quarantined = sample(
        ledger_samples, "quota_ledger_events_quarantined_total", code="invalid_json"
    )
    assert quarantined == 1
    assert sample(ledger_samples, "quota_ledger_consumer_lag") == 0


# --------------------------------------------------------------------------- the middleware


def unit_app(service: str) -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(503, "away")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    http_metrics.install(app, service)
    return app


def responses(service: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "quota_http_responses_total", {"service": service, "code": code}
    )
    return value or 0.0


async def test_the_http_metrics_count_responses_by_status_class() -> None:
    service = f"unit-{uuid.uuid4().hex[:8]}"
    app = unit_app(service)
    assert responses(service, "5xx") == 0  # exported, at 0, before any request
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as client:
        for path, status in (
            ("/ok", 200), ("/ok", 200), ("/nowhere", 404), ("/unavailable", 503),
            ("/boom", 500), ("/healthz", 200),
        ):  # fmt: skip
            assert (await client.get(path)).status_code == status, path
    counts = {code: responses(service, code) for code in http_metrics.CODES}
    assert counts == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 2}  # /healthz left out
    timed = REGISTRY.get_sample_value("quota_http_request_seconds_count", {"service": service})
    assert timed == 5

    http_metrics.observe(service, 204, 0.001)  # what a fast path outside the app calls
    http_metrics.observe(service, 599, 0.001)
    assert (responses(service, "2xx"), responses(service, "5xx")) == (3, 3)
