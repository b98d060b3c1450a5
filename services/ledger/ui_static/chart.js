// The balance chart: plain SVG, one circle per statement entry, stepped line between them.
// x is the entry's order in the ledger (positions are increasing; event times may repeat or
// arrive out of order), labelled with the entry's time; y is the running balance.

const SVG = "http://www.w3.org/2000/svg";
const W = 800;
const H = 300;
const M = { left: 78, right: 18, top: 16, bottom: 58 };

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Round tick steps (1, 2, 5 × 10^n) covering [lo, hi] with about `count` ticks.
function niceTicks(lo, hi, count) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || power * 10;
  const first = Math.floor(lo / step) * step;
  const ticks = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) ticks.push(v);
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

const number = new Intl.NumberFormat("en-US");

function shortTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toISOString().replace("T", " ").slice(0, 19);
}

export function drawChart(svg, openingBalance, entries) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("data-points", "0");
  const desc = el("desc", { id: "chart-desc" });
  svg.appendChild(desc);
  if (entries.length === 0) {
    desc.textContent = "No entries.";
    svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "tick" },
      "No statement entries"));
    return;
  }
  const balances = entries.map((e) => Number(e.balance));
  const lowest = Math.min(0, Number(openingBalance), ...balances);
  const highest = Math.max(Number(openingBalance), ...balances);
  const yTicks = niceTicks(lowest, highest, 5);
  const yMin = yTicks[0];
  const yMax = yTicks[yTicks.length - 1];
  const plotW = W - M.left - M.right;
  const plotH = H - M.top - M.bottom;
  // Slot 0 is the opening balance; entry i sits at slot i + 1.
  const slots = entries.length;
  const x = (slot) => M.left + (slot / slots) * plotW;
  const y = (v) => M.top + plotH - ((v - yMin) / (yMax - yMin)) * plotH;

  for (const tick of yTicks) {
    svg.appendChild(el("line", { class: "grid", x1: M.left, x2: W - M.right, y1: y(tick), y2: y(tick) }));
    svg.appendChild(el("text", { class: "tick", x: M.left - 6, y: y(tick) + 4, "text-anchor": "end" },
      number.format(tick)));
  }
  svg.appendChild(el("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: M.top + plotH }));
  svg.appendChild(el("line", { class: "axis", x1: M.left, x2: W - M.right, y1: M.top + plotH, y2: M.top + plotH }));

  // At most six x labels, always the first and the last entry.
  const labelCount = Math.min(6, entries.length);
  const labelled = new Set();
  for (let k = 0; k < labelCount; k += 1) {
    labelled.add(labelCount === 1 ? 0 : Math.round((k * (entries.length - 1)) / (labelCount - 1)));
  }
  for (const i of [...labelled].sort((a, b) => a - b)) {
    const px = x(i + 1);
    svg.appendChild(el("line", { class: "axis", x1: px, x2: px, y1: M.top + plotH, y2: M.top + plotH + 4 }));
    const text = el("text", { class: "tick", x: px, y: M.top + plotH + 16, "text-anchor": "middle" });
    text.appendChild(el("tspan", { x: px, dy: 0 }, `#${entries[i].position}`));
    text.appendChild(el("tspan", { x: px, dy: 13 }, shortTime(entries[i].time)));
    svg.appendChild(text);
  }
  svg.appendChild(el("text", { class: "label", x: M.left + plotW / 2, y: H - 6, "text-anchor": "middle" },
    "Entry (ledger position and event time)"));
  svg.appendChild(el("text", {
    class: "label", x: 14, y: M.top + plotH / 2, "text-anchor": "middle",
    transform: `rotate(-90 14 ${M.top + plotH / 2})`,
  }, "Balance"));

  // A stepped line: the balance holds until the next entry moves it.
  let path = `M ${x(0)} ${y(Number(openingBalance))}`;
  entries.forEach((e, i) => {
    path += ` H ${x(i + 1)} V ${y(Number(e.balance))}`;
  });
  svg.appendChild(el("path", { class: "line", d: path }));

  const points = el("g", { class: "points" });
  entries.forEach((e, i) => {
    const amount = Number(e.amount);
    const kind = amount > 0 ? "up" : amount < 0 ? "down" : "flat";
    const dot = el("circle", {
      class: `point ${kind}`, cx: x(i + 1), cy: y(Number(e.balance)), r: entries.length > 200 ? 2 : 4,
      "data-position": e.position,
    });
    dot.appendChild(el("title", {},
      `#${e.position} ${shortTime(e.time)} ${e.type}: ${amount > 0 ? "+" : ""}${number.format(amount)}`
      + ` → ${number.format(Number(e.balance))}`));
    points.appendChild(dot);
  });
  svg.appendChild(points);
  svg.setAttribute("data-points", String(entries.length));
  const last = entries[entries.length - 1];
  desc.textContent = `${entries.length} entries from ${shortTime(entries[0].time)} to `
    + `${shortTime(last.time)}; balance from ${number.format(Number(openingBalance))} `
    + `to ${number.format(Number(last.balance))}.`;
}
