"""The admin page at `/ui` and the account search it uses: the search over HTTP, and the page in
a real headless Chromium against a real ledger whose history came through Kafka."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from services.infra.broker import free_port
from services.ledger import app as ledger_app
from services.ledger import audit_api, ui
from services.settings import Settings
from tests.builders import (
    budget_set,
    cloud_event,
    limits_set,
    produce,
    recharge,
    token_issued,
    usage,
    wait_for,
    wait_for_position,
)
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / ".work" / "ui.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STATEMENT_ROUTE = "/accounts/{account_id}/statement"
TABLE_PAGE = 25  # the page's statement page size (TABLE_PAGE in ui_static/app.js)


def ledger_with_ui(settings: Settings) -> FastAPI:
    """The ledger app with the UI and statement routers, included here until `create_app`
    includes them."""
    app = ledger_app.create_app(settings)
    if "/ui" not in _paths(app):
        app.include_router(ui.router)
    if STATEMENT_ROUTE not in _paths(app):
        app.include_router(audit_api.router)
    return app


def _paths(app: FastAPI) -> set[str]:
    return {path for route in app.routes if isinstance(path := getattr(route, "path", None), str)}


@asynccontextmanager
async def asgi_ledger(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = ledger_with_ui(settings)
    async with app.router.lifespan_context(app):
        await app.state.ledger.consumer.started.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
            yield client


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` on a real loopback port, in a thread with its own event loop (lifespan included)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="ledger-ui", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


async def _ready(url: str) -> None:
    async def ready() -> bool:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=2) as client:
                response = await client.get("/readyz")
        except httpx.TransportError:
            return False
        return response.status_code == 200

    await wait_for(ready, timeout=60, what=f"ledger at {url} ready")


def _history(account: str) -> list[dict[str, Any]]:
    """Thirty-odd balance entries with two status changes: the statement spans two UI pages."""
    events = [
        cloud_event("quota.account.opened", account, {"role": "user", "group": "default"}),
        recharge(account, 10_000, time="2026-11-24T08:00:00Z"),
    ]
    for i in range(28):
        events.append(usage(account, 150 + 10 * i, time=f"2026-11-24T09:{i:02d}:00Z"))
        if i == 10:
            events.append(cloud_event("quota.account.suspended", account, {"reason": "review"},
                                      time="2026-11-24T09:10:30Z"))  # fmt: skip
            events.append(cloud_event("quota.account.reinstated", account, {},
                                      time="2026-11-24T09:10:40Z"))  # fmt: skip
        if i == 20:
            events.append(recharge(account, 2_500, time="2026-11-24T09:20:30Z"))
    events.append(cloud_event("quota.account.adjusted", account, {"delta": -7, "reason": "fix"},
                              time="2026-11-24T10:00:00Z"))  # fmt: skip
    return events


def _chrome(profile: str) -> webdriver.Chrome:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail(
            "Debian's chromium and chromium-driver are missing: scripts/run_tests.py installs"
            " them when run as root (ensure_chromium)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def _int(text: str) -> int:
    return int(text.replace(",", "").replace("+", ""))


def _table_rows(driver: WebDriver) -> list[dict[str, Any]]:
    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, "#statement tbody tr"):
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        rows.append(
            {
                "position": int(cells[0]),
                "time": cells[1],
                "type": cells[2],
                "amount": _int(cells[3]),
                "balance": _int(cells[4]),
                "event_id": cells[5],
                "source": cells[6],
            }
        )
    return rows


def _attr(driver: WebDriver, element_id: str, name: str) -> str | None:
    return driver.find_element(By.ID, element_id).get_attribute(name)


def _wait_page(wait: WebDriverWait[webdriver.Chrome], number: int) -> None:
    wait.until(lambda d: _attr(d, "statement", "data-page") == str(number))


def _browse(url: str, account: str, pages: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Drive the page like an operator would; return what it showed."""
    seen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quota-ui-chromium-") as profile:
        driver = _chrome(profile)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(f"{url}/ui")
            assert driver.title == "Quota ledger"
            assert not driver.find_element(By.ID, "workspace").is_displayed()
            driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
            wait.until(expected_conditions.visibility_of_element_located((By.ID, "search")))
            seen["stored_token"] = driver.execute_script(
                "return sessionStorage.getItem('quota-ledger-admin-token')"
            )

            search = driver.find_element(By.ID, "search")
            search.send_keys(account[:-1])
            search.submit()
            wait.until(lambda d: _attr(d, "results", "data-prefix") == account[:-1])
            choice = (By.CSS_SELECTOR, f"#results button[data-account='{account}']")
            wait.until(expected_conditions.element_to_be_clickable(choice)).click()
            wait.until(lambda d: _attr(d, "account", "data-loaded") == "true")
            wait.until(lambda d: int(_attr(d, "balance-chart", "data-points") or 0) >= total)
            seen["points"] = len(
                driver.find_elements(By.CSS_SELECTOR, "#balance-chart circle.point")
            )
            seen["data_points"] = int(
                driver.find_element(By.ID, "balance-chart").get_attribute("data-points") or 0
            )
            seen["axis_labels"] = [
                e.text for e in driver.find_elements(By.CSS_SELECTOR, "#balance-chart text.label")
            ]
            seen["state"] = {
                e.get_attribute("data-field"): e.text
                for e in driver.find_elements(By.CSS_SELECTOR, "#account-state dd")
            }
            seen["status_changes"] = [
                [c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in driver.find_elements(By.CSS_SELECTOR, "#status-changes tbody tr")
            ]
            wait.until(lambda d: _attr(d, "verify", "data-state") in ("ok", "failed", "error"))
            seen["verify"] = {
                "state": driver.find_element(By.ID, "verify").get_attribute("data-state"),
                "ok": driver.find_element(By.ID, "verify-ok").text,
                "count": driver.find_element(By.ID, "verify-count").text,
                "hash": driver.find_element(By.ID, "verify-hash").text,
                "differences": driver.find_element(By.ID, "verify-differences").text,
            }
            SCREENSHOT.parent.mkdir(exist_ok=True)
            driver.save_screenshot(str(SCREENSHOT))

            seen["pages"] = [_table_rows(driver)]
            for number in range(2, len(pages) + 1):
                driver.find_element(By.ID, "page-next").click()
                _wait_page(wait, number)
                seen["pages"].append(_table_rows(driver))
            seen["next_disabled"] = not driver.find_element(By.ID, "page-next").is_enabled()
            driver.find_element(By.ID, "page-prev").click()
            _wait_page(wait, len(pages) - 1)
            seen["back"] = _table_rows(driver)
            seen["console"] = [
                entry
                for entry in cast(Any, driver).get_log("browser")
                if entry.get("level") == "SEVERE"
            ]
        finally:
            driver.quit()
    return seen


async def test_search_lists_accounts_by_prefix(settings: Settings, pool: asyncpg.Pool) -> None:
    accounts = ["acct_b2", "acct_a1", "acct_a3", "acct_a2", "other_a1", "acct_%", "acct__x"]
    events = [recharge(account, 10 * (i + 1)) for i, account in enumerate(accounts)]
    events.append(cloud_event("quota.account.suspended", "acct_a2", {}))
    async with asgi_ledger(settings) as client:
        await produce(settings.kafka_bootstrap, settings.topic, events)
        await wait_for_position(pool, len(events))
        found = (await client.get("/accounts", params={"prefix": "acct_a"}, headers=AUTH)).json()
        limited = await client.get("/accounts", params={"prefix": "acct", "limit": 2}, headers=AUTH)
        everything = await client.get("/accounts", headers=AUTH)
        wildcard = await client.get("/accounts", params={"prefix": "acct_%"}, headers=AUTH)
        too_many = await client.get("/accounts", params={"limit": 101}, headers=AUTH)
        anonymous = await client.get("/accounts")
        wrong = await client.get("/accounts", headers={"Authorization": "Bearer nope"})
    assert found == {
        "items": [
            {"account_id": "acct_a1", "balance": 20, "status": "active"},
            {"account_id": "acct_a2", "balance": 40, "status": "suspended"},
            {"account_id": "acct_a3", "balance": 30, "status": "active"},
        ]
    }
    assert [i["account_id"] for i in limited.json()["items"]] == ["acct_%", "acct__x"]
    assert len(everything.json()["items"]) == len(accounts)
    # The prefix is text, not a LIKE pattern.
    assert [i["account_id"] for i in wildcard.json()["items"]] == ["acct_%"]
    assert too_many.status_code == 422
    assert anonymous.status_code == 401
    assert wrong.status_code == 403


async def test_page_and_assets_are_served_without_auth(settings: Settings) -> None:
    async with asgi_ledger(settings) as client:
        page = await client.get("/ui")
        assets = {name: await client.get(f"/ui/static/{name}") for name in ui.ASSETS}
        unknown = await client.get("/ui/static/index.html.bak")
        traversal = await client.get("/ui/static/..%2Fui.py")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, response in assets.items():
        assert response.status_code == 200, name
        assert f"/ui/static/{name}" in page.text or name == "chart.js"
    # Offline: nothing is fetched from another origin.
    for text in [page.text, *(r.text for r in assets.values())]:
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
    assert unknown.status_code == 404
    assert traversal.status_code == 404


async def test_page_shows_an_account_like_the_api(settings: Settings, pool: asyncpg.Pool) -> None:
    account = "acct_ui_7"
    events = [*_history(account), recharge("acct_ui_other", 5)]
    app = ledger_with_ui(settings)
    with served(app) as url:
        await _ready(url)
        await produce(settings.kafka_bootstrap, settings.topic, events)
        await wait_for_position(pool, len(events))
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            path = f"/accounts/{account}/statement"
            pages = []
            params: dict[str, Any] = {"format": "json", "limit": TABLE_PAGE}
            while True:
                page = (await client.get(path, params=params)).json()
                pages.append(page)
                if page["next"] is None:
                    break
                params["cursor"] = page["next"]
            state = (await client.get(f"/accounts/{account}")).json()
            report = (await client.get("/audit/verify")).json()
        total = sum(len(page["entries"]) for page in pages)
        seen = await asyncio.to_thread(_browse, url, account, pages, total)

    assert total == len(events) - 1 and len(pages) == 2
    assert seen["stored_token"] == ADMIN_TOKEN
    assert seen["points"] >= total and seen["data_points"] == total
    assert set(seen["axis_labels"]) == {"Balance", "Entry (ledger position and event time)"}
    assert seen["state"]["balance"] == f"{state['balance']:,}"
    assert seen["state"]["status"] == "active"
    assert seen["state"]["position"] == str(state["position"])

    fields = ("position", "type", "amount", "balance", "event_id", "source")
    for shown, page in zip(seen["pages"], pages, strict=True):
        expected = [{k: e[k] for k in fields} for e in page["entries"]]
        assert [{k: r[k] for k in fields} for r in shown] == expected
        assert [r["time"] for r in shown] == [e["time"] for e in page["entries"]]
    assert seen["next_disabled"]
    assert seen["back"] == seen["pages"][-2]
    statuses = [row[2] for row in seen["status_changes"]]
    assert statuses == ["suspended", "reinstated"]

    assert report["ok"] is True
    assert seen["verify"]["state"] == "ok"
    assert seen["verify"]["ok"] == "ok"
    assert seen["verify"]["count"] == f"{report['events_checked']:,}"
    assert seen["verify"]["hash"] == report["head_hash"]
    assert seen["verify"]["differences"] == "none"
    assert seen["console"] == []
    assert SCREENSHOT.stat().st_size > 0


# --- keys and budgets -----------------------------------------------------------------------

KEY_1 = "sk-ui-limits-key-00000000000000000000a1b2c3"
KEY_2 = "sk-ui-limits-key-00000000000000000000d4e5f6"
#: Ids that would be markup if the page ever rendered data as HTML.
MARKUP_TOKEN = 'tok_<b id="injected-b">x</b>'
MARKUP_BUDGET = 'b_<img src="x" id="injected-img">'


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _limits_history(account: str, now: datetime) -> list[dict[str, Any]]:
    def timed(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "time": _text(now)}

    hold = {"reservation_id": "r_ui", "amount": 100, "actor": "tests", "token_id": "tok_ui_1",
            "model": "gpt-4o", "expires_at": _text(now + timedelta(hours=1))}  # fmt: skip
    return [
        recharge(account, 100_000),
        token_issued(
            account,
            "tok_ui_1",
            KEY_1,
            allowed_models=["gpt-4o", "o3"],
            allowed_cidrs=["10.0.0.0/8"],
            max_concurrent=2,
            expires_at=_text(now + timedelta(days=30)),
        ),
        token_issued(account, MARKUP_TOKEN, KEY_2),
        cloud_event("quota.token.revoked", account, {"token_id": MARKUP_TOKEN}),
        limits_set(account, 4),
        timed(budget_set(account, "b_day", 1_000, "day", timezone="Asia/Kolkata")),
        timed(
            budget_set(
                account,
                MARKUP_BUDGET,
                500,
                "week",
                scope="token",
                token_id="tok_ui_1",
                model="gpt-4o",
                timezone="Europe/Berlin",
            )
        ),
        timed(budget_set(account, "b_total", 100, "total")),
        timed(cloud_event("quota.reservation.held", account, hold)),
        timed(usage(account, 250, {"token_id": "tok_ui_1", "model": "gpt-4o"})),
        timed(cloud_event("quota.budget.removed", account, {"budget_id": "b_total"})),
        timed(budget_set(account, "b_total", 100, "total")),
    ]


def _open_account(driver: WebDriver, url: str, account: str) -> WebDriverWait[webdriver.Chrome]:
    wait = WebDriverWait(driver, 30)
    driver.get(f"{url}/ui")
    driver.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "search")))
    search = driver.find_element(By.ID, "search")
    search.send_keys(account)
    search.submit()
    wait.until(lambda d: _attr(d, "results", "data-prefix") == account)
    choice = (By.CSS_SELECTOR, f"#results button[data-account='{account}']")
    wait.until(expected_conditions.element_to_be_clickable(choice)).click()
    wait.until(lambda d: _attr(d, "account", "data-loaded") == "true")
    return cast(WebDriverWait[webdriver.Chrome], wait)


def _browse_limits(url: str, account: str) -> dict[str, Any]:
    """Open the account's page; return its keys, budgets and limit changes as shown."""
    seen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quota-ui-chromium-") as profile:
        driver = _chrome(profile)
        try:
            _open_account(driver, url, account)
            seen["keys"] = [
                [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                for row in driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
            ]
            seen["key_times"] = [
                [t.get_attribute("datetime") for t in row.find_elements(By.TAG_NAME, "time")]
                for row in driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
            ]
            budgets = []
            for item in driver.find_elements(By.CSS_SELECTOR, "#budgets li.budget"):
                figures = {
                    dd.get_attribute("data-field"): dd.text
                    for dd in item.find_elements(By.CSS_SELECTOR, "dd")
                }
                times = {
                    dd.get_attribute("data-field"): [
                        t.get_attribute("datetime") for t in dd.find_elements(By.TAG_NAME, "time")
                    ]
                    for dd in item.find_elements(By.CSS_SELECTOR, "dd")
                }
                bar = item.find_element(By.CSS_SELECTOR, "svg.bar")
                rects = {
                    rect.get_attribute("class"): float(rect.get_attribute("width") or 0)
                    for rect in bar.find_elements(By.TAG_NAME, "rect")
                }
                budgets.append(
                    {
                        "budget_id": item.get_attribute("data-budget"),
                        "head": item.find_element(By.CSS_SELECTOR, ".budget-head").text,
                        "figures": figures,
                        "times": times,
                        "bar": rects,
                        "over": "over" in (bar.get_attribute("class") or ""),
                        "limit_marks": len(bar.find_elements(By.CSS_SELECTOR, "line.limit")),
                    }
                )
            seen["budgets"] = budgets
            seen["limit_changes"] = [
                [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                for row in driver.find_elements(By.CSS_SELECTOR, "#limit-changes tbody tr")
            ]
            seen["injected"] = driver.find_elements(By.CSS_SELECTOR, "#injected-b, #injected-img")
            seen["source"] = driver.page_source
            seen["console"] = [
                entry
                for entry in cast(Any, driver).get_log("browser")
                if entry.get("level") == "SEVERE"
            ]
            driver.save_screenshot(str(SCREENSHOT.with_name("ui-limits.png")))
        finally:
            driver.quit()
    return seen


async def test_page_shows_keys_and_budgets_never_a_secret(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    account = "acct_ui_limits"
    events = _limits_history(account, datetime.now(UTC))
    app = ledger_with_ui(settings)
    with served(app) as url:
        await _ready(url)
        await produce(settings.kafka_bootstrap, settings.topic, events)
        await wait_for_position(pool, len(events))
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            keys = (await client.get(f"/accounts/{account}/keys")).json()
            budgets = (await client.get(f"/accounts/{account}/budgets")).json()
        seen = await asyncio.to_thread(_browse_limits, url, account)

    # Keys: every token, by token_id, with what an operator may see, and never a secret.
    assert [k["token_id"] for k in keys] == sorted(["tok_ui_1", MARKUP_TOKEN])
    by_token = {row[0]: row for row in seen["keys"]}
    assert set(by_token) == {"tok_ui_1", MARKUP_TOKEN}
    expires = next(k["expires_at"] for k in keys if k["token_id"] == "tok_ui_1")
    assert by_token["tok_ui_1"][1:] == [
        "…a1b2c3", expires, "active", "gpt-4o, o3", "10.0.0.0/8", "2", "–"
    ]  # fmt: skip
    assert by_token[MARKUP_TOKEN][1:] == ["…d4e5f6", "never", "revoked", "any", "any", "–", "–"]
    for secret in (KEY_1, KEY_2, *(hashlib.sha256(k.encode()).hexdigest() for k in (KEY_1, KEY_2))):
        assert secret not in seen["source"]
        assert secret[:-6] not in seen["source"]
    # Budgets: one bar per budget's current period, the figures of GET /accounts/{id}/budgets.
    assert [b["budget_id"] for b in seen["budgets"]] == [b["budget_id"] for b in budgets]
    assert [b["budget_id"] for b in seen["budgets"]] == ["b_day", "b_total", MARKUP_BUDGET]
    for shown, item in zip(seen["budgets"], budgets, strict=True):
        figures = shown["figures"]
        for field in ("spent", "held", "amount", "remaining"):
            assert figures[field] == f"{item[field]:,}", (item["budget_id"], field)
        for field in ("period_start", "resets_at"):
            assert shown["times"][field] == ([item[field]] if item[field] else []), field
        scale = max(item["amount"], item["spent"] + item["held"])
        assert shown["bar"]["spent"] == pytest.approx(1000 * item["spent"] / scale)
        assert shown["bar"]["held"] == pytest.approx(1000 * item["held"] / scale)
        assert shown["bar"]["amount"] == pytest.approx(1000 * item["amount"] / scale)
        over = item["spent"] + item["held"] > item["amount"]
        assert (shown["over"], shown["limit_marks"]) == (over, int(over))
    day, total, token = seen["budgets"]
    assert (day["figures"]["spent"], day["figures"]["held"]) == ("250", "100")
    assert "per day, Asia/Kolkata" in day["head"]
    assert day["times"]["resets_at"][0].endswith("T18:30:00Z")
    assert total["over"] and total["figures"]["remaining"] == "0"
    assert (total["figures"]["period_start"], total["figures"]["resets_at"]) == (
        "all time",
        "never",
    )
    assert token["head"].startswith(MARKUP_BUDGET)
    assert "key tok_ui_1 · model gpt-4o · per week, Europe/Berlin" in token["head"]
    # The statement's budget and limit changes, in order.
    assert [row[2] for row in seen["limit_changes"]] == [
        "account.limits_set", "budget.set", "budget.set", "budget.set", "budget.removed",
        "budget.set",
    ]  # fmt: skip
    # Nothing was rendered as markup, and the page broke no rule of its CSP.
    assert seen["injected"] == []
    assert seen["console"] == []
