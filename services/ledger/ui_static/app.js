// The ledger admin page. Every request carries the admin token from sessionStorage as a bearer
// token; nothing is rendered with innerHTML, so ledger data can never become markup.
import { drawChart } from "./chart.js";

const TOKEN_KEY = "quota-ledger-admin-token";
const TABLE_PAGE = 25;
const CHART_PAGE = 500;
const CHART_MAX_PAGES = 40;
const RESERVATION_PREFIX = "quota.reservation.";
const STATUS_TYPES = new Set([
  "quota.account.suspended", "quota.account.blacklisted", "quota.account.reinstated",
]);
const LIMIT_TYPES = new Set([
  "quota.budget.set", "quota.budget.removed", "quota.account.limits_set",
  "quota.account.rate_limit_set",
]);
const SVG_NS = "http://www.w3.org/2000/svg";
const BAR_WIDTH = 1000;
const BAR_HEIGHT = 16;

const $ = (id) => document.getElementById(id);
const number = new Intl.NumberFormat("en-US");
const state = { account: null, cursors: [null], page: 0, searchSeq: 0, accountSeq: 0 };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(key, String(value));
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const response = await fetch(url, {
    headers: { Authorization: `Bearer ${token()}`, Accept: "application/json" },
    cache: "no-store",
  });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    throw new ApiError(response.status, `${response.status}: ${detail}`);
  }
  return response.json();
}

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function failed(error, what) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
    signOut();
    say(`The admin token was refused (${error.message}). Sign in again.`, true);
    return;
  }
  say(`Could not load ${what}: ${error.message}`, true);
}

function node(tag, text, className) {
  const element = document.createElement(tag);
  if (text !== undefined && text !== null) element.textContent = String(text);
  if (className) element.className = className;
  return element;
}

function signedAmount(amount) {
  const value = Number(amount);
  return `${value > 0 ? "+" : ""}${number.format(value)}`;
}

function timeCell(iso) {
  const cell = node("td");
  const time = node("time", iso);
  time.setAttribute("datetime", iso);
  cell.appendChild(time);
  return cell;
}

function optionalTime(iso, none) {
  if (iso === null || iso === undefined) return node("span", none, "muted");
  const time = node("time", iso);
  time.setAttribute("datetime", iso);
  return time;
}

function cell(child, className) {
  const td = node("td", undefined, className);
  td.appendChild(child);
  return td;
}

function svgNode(name, attrs) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, String(value));
  return element;
}

function emptyRow(tbody, columns, text) {
  const row = node("tr");
  const cell = node("td", text, "empty");
  cell.colSpan = columns;
  row.appendChild(cell);
  tbody.appendChild(row);
}

// ---- session ---------------------------------------------------------------------------

function showSignedIn(signedIn) {
  $("workspace").hidden = !signedIn;
  $("logout").hidden = !signedIn;
  $("token").value = "";
  $("token").placeholder = signedIn ? "signed in" : "";
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.account = null;
  $("account").hidden = true;
  showSignedIn(false);
}

async function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  say("Checking the token…");
  try {
    await api("/accounts", { prefix: "", limit: 1 });
  } catch (error) {
    failed(error, "the accounts");
    return;
  }
  showSignedIn(true);
  say("Signed in.");
  await Promise.all([search(""), runVerify()]);
}

// ---- search ----------------------------------------------------------------------------

async function search(prefix) {
  const seq = ++state.searchSeq;
  let body;
  try {
    body = await api("/accounts", { prefix, limit: 100 });
  } catch (error) {
    failed(error, "the accounts");
    return;
  }
  if (seq !== state.searchSeq) return; // a newer search answered first
  const list = $("results");
  list.replaceChildren();
  list.dataset.prefix = prefix;
  if (body.items.length === 0) {
    list.appendChild(node("li", "No account matches.", "none"));
    return;
  }
  for (const item of body.items) {
    const button = node("button");
    button.type = "button";
    button.dataset.account = item.account_id;
    button.appendChild(node("span", item.account_id, "mono"));
    button.appendChild(node("span", `${number.format(item.balance)} · ${item.status}`, "meta"));
    button.setAttribute("aria-current", String(item.account_id === state.account));
    button.addEventListener("click", () => selectAccount(item.account_id));
    const li = node("li");
    li.appendChild(button);
    list.appendChild(li);
  }
}

// ---- one account -----------------------------------------------------------------------

async function selectAccount(accountId) {
  const seq = ++state.accountSeq;
  state.account = accountId;
  state.cursors = [null];
  state.page = 0;
  for (const button of $("results").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.account === accountId));
  }
  $("account").hidden = false;
  $("account-title").textContent = `Account ${accountId}`;
  $("account").dataset.loaded = "false";
  say(`Loading ${accountId}…`);
  try {
    const [account] = await Promise.all([
      api(`/accounts/${encodeURIComponent(accountId)}`),
      loadStatementPage(seq),
      loadHistory(seq),
      loadBudgets(seq),
      loadKeys(seq),
    ]);
    if (seq !== state.accountSeq) return;
    renderAccount(account);
    $("account").dataset.loaded = "true";
    say(`Showing ${accountId}.`);
  } catch (error) {
    if (seq === state.accountSeq) failed(error, `account ${accountId}`);
  }
}

function renderAccount(account) {
  const facts = $("account-state");
  facts.replaceChildren();
  const rows = [
    ["Balance", number.format(account.balance)],
    ["Held", number.format(account.held)],
    ["Available", number.format(account.available)],
    ["Status", account.status],
    ["Role", account.role],
    ["Group", account.group],
    ["Position", account.position],
  ];
  for (const [label, value] of rows) {
    facts.appendChild(node("dt", label));
    const dd = node("dd", value);
    dd.dataset.field = label.toLowerCase();
    facts.appendChild(dd);
  }
}

function statementParams(cursor, limit) {
  return { format: "json", limit, cursor };
}

async function loadStatementPage(seq) {
  const accountId = state.account;
  const cursor = state.cursors[state.page];
  const body = await api(`/accounts/${encodeURIComponent(accountId)}/statement`,
    statementParams(cursor, TABLE_PAGE));
  if (seq !== state.accountSeq) return;
  const tbody = $("statement").tBodies[0];
  tbody.replaceChildren();
  if (body.entries.length === 0) emptyRow(tbody, 7, "No entries.");
  for (const entry of body.entries) {
    const row = node("tr");
    row.dataset.position = entry.position;
    row.appendChild(node("td", entry.position, "num"));
    row.appendChild(timeCell(entry.time));
    row.appendChild(node("td", entry.type, "mono"));
    const amount = Number(entry.amount);
    row.appendChild(node("td", signedAmount(amount), `num ${amount < 0 ? "neg" : amount > 0 ? "pos" : ""}`));
    row.appendChild(node("td", number.format(entry.balance), "num"));
    row.appendChild(node("td", entry.event_id, "mono wrap"));
    row.appendChild(node("td", entry.source, "wrap"));
    tbody.appendChild(row);
  }
  state.cursors.length = state.page + 1;
  if (body.next !== null && body.next !== undefined) state.cursors.push(body.next);
  $("page-prev").disabled = state.page === 0;
  $("page-next").disabled = state.cursors.length <= state.page + 1;
  const opening = `opening balance ${number.format(body.opening_balance)}`;
  $("page-info").textContent = `Page ${state.page + 1} · ${opening}`;
  $("statement").dataset.page = String(state.page + 1);
}

async function turnPage(delta) {
  state.page += delta;
  try {
    await loadStatementPage(state.accountSeq);
  } catch (error) {
    state.page -= delta;
    failed(error, "the statement");
  }
}

// The whole statement (every page, up to a cap) feeds the chart and the two event lists.
async function loadHistory(seq) {
  const accountId = state.account;
  const entries = [];
  let opening = 0;
  let cursor = null;
  let truncated = false;
  for (let page = 0; ; page += 1) {
    if (page === CHART_MAX_PAGES) { truncated = true; break; }
    const body = await api(`/accounts/${encodeURIComponent(accountId)}/statement`,
      statementParams(cursor, CHART_PAGE));
    if (seq !== state.accountSeq) return;
    if (page === 0) opening = body.opening_balance;
    entries.push(...body.entries);
    cursor = body.next;
    if (cursor === null || cursor === undefined) break;
  }
  drawChart($("balance-chart"), opening, entries);
  $("chart-title").textContent = truncated
    ? `Balance after each of the first ${entries.length} statement entries`
    : `Balance after each of the ${entries.length} statement entries`;
  renderReservations(entries.filter((e) => e.type.startsWith(RESERVATION_PREFIX)));
  renderStatusChanges(entries.filter((e) => STATUS_TYPES.has(e.type)));
  renderLimitChanges(entries.filter((e) => LIMIT_TYPES.has(e.type)));
}

function renderReservations(entries) {
  const tbody = $("reservations").tBodies[0];
  tbody.replaceChildren();
  if (entries.length === 0) emptyRow(tbody, 4, "No reservations.");
  for (const entry of entries) {
    const row = node("tr");
    row.appendChild(node("td", entry.position, "num"));
    row.appendChild(timeCell(entry.time));
    row.appendChild(node("td", entry.type.slice(RESERVATION_PREFIX.length)));
    row.appendChild(node("td", signedAmount(entry.amount), "num"));
    tbody.appendChild(row);
  }
}

function renderStatusChanges(entries) {
  const tbody = $("status-changes").tBodies[0];
  tbody.replaceChildren();
  if (entries.length === 0) emptyRow(tbody, 4, "No status changes.");
  for (const entry of entries) {
    const row = node("tr");
    row.appendChild(node("td", entry.position, "num"));
    row.appendChild(timeCell(entry.time));
    row.appendChild(node("td", entry.type.slice("quota.account.".length)));
    row.appendChild(node("td", entry.source, "wrap"));
    tbody.appendChild(row);
  }
}

function renderLimitChanges(entries) {
  const tbody = $("limit-changes").tBodies[0];
  tbody.replaceChildren();
  if (entries.length === 0) emptyRow(tbody, 4, "No budget or limit changes.");
  for (const entry of entries) {
    const row = node("tr");
    row.appendChild(node("td", entry.position, "num"));
    row.appendChild(timeCell(entry.time));
    row.appendChild(node("td", entry.type.slice("quota.".length), "mono"));
    row.appendChild(node("td", entry.source, "wrap"));
    tbody.appendChild(row);
  }
}

// ---- budgets and keys -------------------------------------------------------------------

async function loadBudgets(seq) {
  const body = await api(`/accounts/${encodeURIComponent(state.account)}/budgets`);
  if (seq !== state.accountSeq) return;
  renderBudgets(body);
}

// One bar per budget's current period: spent, then held, on the budget's amount; past the
// amount (usage is never refused) the bar is scaled to spent + held and the amount is marked.
function budgetBar(budget) {
  const amount = Number(budget.amount);
  const spent = Number(budget.spent);
  const held = Number(budget.held);
  const scale = Math.max(amount, spent + held, 1);
  const width = (value) => (Math.max(value, 0) / scale) * BAR_WIDTH;
  const svg = svgNode("svg", {
    class: spent + held > amount ? "bar over" : "bar",
    viewBox: `0 0 ${BAR_WIDTH} ${BAR_HEIGHT}`,
    preserveAspectRatio: "none",
    role: "img",
    "aria-label": `${number.format(spent)} spent and ${number.format(held)} held `
      + `of ${number.format(amount)}`,
  });
  const spentWidth = Math.min(width(spent), BAR_WIDTH);
  const heldWidth = Math.min(width(held), BAR_WIDTH - spentWidth);
  svg.appendChild(svgNode("rect", { class: "amount", x: 0, y: 0, width: width(amount), height: BAR_HEIGHT }));
  svg.appendChild(svgNode("rect", { class: "spent", x: 0, y: 0, width: spentWidth, height: BAR_HEIGHT }));
  svg.appendChild(svgNode("rect", { class: "held", x: spentWidth, y: 0, width: heldWidth, height: BAR_HEIGHT }));
  if (spent + held > amount) {
    const x = width(amount);
    svg.appendChild(svgNode("line", { class: "limit", x1: x, x2: x, y1: 0, y2: BAR_HEIGHT }));
  }
  return svg;
}

function renderBudgets(budgets) {
  const list = $("budgets");
  list.replaceChildren();
  if (budgets.length === 0) list.appendChild(node("li", "No budgets.", "none"));
  for (const budget of budgets) {
    const item = node("li", undefined, "budget");
    item.dataset.budget = budget.budget_id;
    const head = node("div", undefined, "budget-head");
    head.appendChild(node("span", budget.budget_id, "mono wrap"));
    const what = [
      budget.scope === "token" ? `key ${budget.token_id}` : "account",
      budget.model === null || budget.model === undefined ? "every model" : `model ${budget.model}`,
      budget.period === "total" ? "total, never resets" : `per ${budget.period}, ${budget.timezone}`,
    ];
    head.appendChild(node("span", what.join(" · "), "meta wrap"));
    item.appendChild(head);
    item.appendChild(budgetBar(budget));
    const facts = node("dl", undefined, "facts figures");
    const rows = [
      ["spent", "Spent", node("span", number.format(budget.spent))],
      ["held", "Held", node("span", number.format(budget.held))],
      ["amount", "Amount", node("span", number.format(budget.amount))],
      ["remaining", "Remaining", node("span", number.format(budget.remaining))],
      ["period_start", "Period since", optionalTime(budget.period_start, "all time")],
      ["resets_at", "Resets at", optionalTime(budget.resets_at, "never")],
    ];
    for (const [field, label, value] of rows) {
      facts.appendChild(node("dt", label));
      const dd = node("dd");
      dd.dataset.field = field;
      dd.appendChild(value);
      facts.appendChild(dd);
    }
    item.appendChild(facts);
    list.appendChild(item);
  }
}

async function loadKeys(seq) {
  const body = await api(`/accounts/${encodeURIComponent(state.account)}/keys`);
  if (seq !== state.accountSeq) return;
  renderKeys(body);
}

function keyState(key, now) {
  if (key.revoked) return "revoked";
  if (key.expires_at && Date.parse(key.expires_at) <= now) return "expired";
  return "active";
}

// Only the fields named here are shown: the route gives no key and no hash, and a field it
// might grow would not be rendered either.
function renderKeys(keys) {
  const tbody = $("keys").tBodies[0];
  tbody.replaceChildren();
  if (keys.length === 0) emptyRow(tbody, 8, "No keys.");
  const now = Date.now();
  for (const key of keys) {
    const row = node("tr");
    row.dataset.token = key.token_id;
    row.appendChild(node("td", key.token_id, "mono wrap"));
    row.appendChild(node("td", `…${key.key_last6}`, "mono"));
    row.appendChild(cell(optionalTime(key.expires_at, "never")));
    const status = keyState(key, now);
    row.appendChild(node("td", status, `key-${status}`));
    const models = key.allowed_models.length ? key.allowed_models.join(", ") : "any";
    row.appendChild(node("td", models, "wrap"));
    const cidrs = key.allowed_cidrs.length ? key.allowed_cidrs.join(", ") : "any";
    row.appendChild(node("td", cidrs, "mono wrap"));
    row.appendChild(node("td", key.max_concurrent ?? "–", "num"));
    row.appendChild(cell(optionalTime(key.previous_valid_until, "–")));
    tbody.appendChild(row);
  }
}

// ---- verify ----------------------------------------------------------------------------

async function runVerify() {
  const panel = $("verify");
  panel.dataset.state = "running";
  $("verify-ok").textContent = "running…";
  $("verify-ok").className = "";
  $("verify-run").disabled = true;
  try {
    const report = await api("/audit/verify");
    $("verify-ok").textContent = report.ok ? "ok" : "NOT ok";
    $("verify-ok").className = report.ok ? "ok" : "bad";
    $("verify-count").textContent = number.format(report.events_checked);
    $("verify-hash").textContent = report.head_hash;
    const list = $("verify-differences");
    list.replaceChildren();
    if (report.differences.length === 0) list.appendChild(node("li", "none", "none"));
    for (const d of report.differences) {
      const text = `${d.what} at ${d.row}: expected ${JSON.stringify(d.expected)}, `
        + `found ${JSON.stringify(d.found)}`;
      list.appendChild(node("li", text, "mono wrap"));
    }
    panel.dataset.state = report.ok ? "ok" : "failed";
  } catch (error) {
    panel.dataset.state = "error";
    $("verify-ok").textContent = "error";
    failed(error, "the verify report");
  } finally {
    $("verify-run").disabled = false;
  }
}

// ---- wiring ----------------------------------------------------------------------------

function debounce(fn, ms) {
  let timer;
  const run = (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
  run.cancel = () => clearTimeout(timer);
  return run;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) signIn(value);
  });
  $("logout").addEventListener("click", () => { signOut(); say("Signed out."); });
  const searchAsTyped = debounce(() => search($("search").value.trim()), 250);
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchAsTyped.cancel();
    search($("search").value.trim());
  });
  $("search").addEventListener("input", searchAsTyped);
  $("page-prev").addEventListener("click", () => turnPage(-1));
  $("page-next").addEventListener("click", () => turnPage(1));
  $("verify-run").addEventListener("click", runVerify);
  if (token()) signIn(token());
  else showSignedIn(false);
});
