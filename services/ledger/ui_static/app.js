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
