// The flasma-ws dashboard: polls GET /stats once a second (only the new seconds, ?since=),
// draws the last five minutes with uPlot, and queries /ws through the project's JS client.
// Every server-supplied value is written with textContent, never as HTML.
import { FlasmaClient, FlasmaServerError } from "./client.js";

const TOKEN_KEY = "flasma-ws.token"; // sessionStorage: gone when the tab closes
const POLL_MS = 1000;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
// chart element id -> [stats column, legend label] per line
const CHARTS = {
  "chart-qps": [["qps", "q/s"]],
  "chart-latency": [["p50_ms", "p50"], ["p99_ms", "p99"]],
  "chart-batch": [["mean_batch", "rows per batch"]],
  "chart-engine": [["engine_ms", "ms per batch"]],
  "chart-queue": [["queue_depth", "queued rows"], ["active_flows", "active flows"]],
  "chart-connections": [["open_connections", "WebSocket"], ["tcp_connections", "TCP"]],
  "chart-errors": [["errors_per_s", "errors/s"]],
};

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

// Exposed for tests and for the curious (window.flasmaDashboard in the browser console).
const dashboard = {
  token: sessionStorage.getItem(TOKEN_KEY),
  info: null,
  columns: null, // stats column -> values, the last window_s seconds
  lastT: null,
  charts: {},
  client: null,
  lastResult: null,
  timer: null,
  polling: false,
};
window.flasmaDashboard = dashboard;

async function getJson(path) {
  const headers = dashboard.token ? { Authorization: `Bearer ${dashboard.token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized("The token was refused.");
  const body = await response.json();
  if (!response.ok) {
    const error = body.error ?? { code: response.status, message: "request failed" };
    throw new Error(`${error.code}: ${error.message}`);
  }
  return body;
}

function showProblem(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

function askForToken(refused) {
  clearInterval(dashboard.timer);
  dashboard.timer = null;
  if (refused) sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("token-form").hidden = false;
  $("token-error").hidden = !refused;
  $("state").textContent = "token needed";
  $("token").focus();
}

async function open() {
  try {
    dashboard.info = await getJson("/info");
  } catch (error) {
    if (error instanceof Unauthorized) {
      askForToken(dashboard.token !== null);
    } else {
      showProblem("feed-error", `Cannot reach the server (${error.message}); retrying.`);
      setTimeout(open, 2000);
    }
    return;
  }
  $("token-form").hidden = true;
  $("main").hidden = false;
  setUpConsole(dashboard.info);
  await poll();
  if (dashboard.timer === null) dashboard.timer = setInterval(poll, POLL_MS);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  dashboard.token = $("token").value;
  sessionStorage.setItem(TOKEN_KEY, dashboard.token);
  dashboard.client?.close();
  dashboard.client = null;
  open();
});

// -- the feed -------------------------------------------------------------------------------
async function poll() {
  if (dashboard.polling) return; // a slow answer: skip a beat rather than pile up requests
  dashboard.polling = true;
  try {
    const since = dashboard.lastT === null ? "" : `?since=${dashboard.lastT}`;
    const feed = await getJson(`/stats${since}`);
    append(feed);
    render(feed);
    showProblem("feed-error", "");
    if (feed.state === "ready" && dashboard.info.dim === undefined) {
      dashboard.info = await getJson("/info"); // it was still loading when the page opened
      setUpConsole(dashboard.info);
    }
  } catch (error) {
    if (error instanceof Unauthorized) askForToken(true);
    else showProblem("feed-error", `The feed stopped (${error.message}); retrying.`);
  } finally {
    dashboard.polling = false;
  }
}

function append(feed) {
  const series = feed.series;
  if (dashboard.columns === null) {
    dashboard.columns = Object.fromEntries(Object.keys(series).map((name) => [name, []]));
  }
  const columns = dashboard.columns;
  for (const [name, values] of Object.entries(series)) columns[name].push(...values);
  const oldest = feed.t - feed.window_s;
  let drop = 0;
  while (drop < columns.t.length && columns.t[drop] <= oldest - 1e-6) drop++;
  if (drop > 0) for (const values of Object.values(columns)) values.splice(0, drop);
  if (columns.t.length > 0) dashboard.lastT = columns.t[columns.t.length - 1];
}

function render(feed) {
  $("state").textContent = feed.state;
  $("state").className = `badge ${feed.state}`;
  $("uptime").textContent = duration(feed.uptime_s);
  const qps = dashboard.columns.qps;
  $("qps-now").textContent = qps.length ? Math.round(qps[qps.length - 1] ?? 0) : "–";
  const m = feed.matrix;
  fill("matrix", [
    ["rows (N)", m.n],
    ["dim", m.dim],
    ["dtype", m.dtype],
    ["device", m.device],
    [m.gpu ? "GPU" : "CPU", m.gpu ?? m.cpu?.model],
    ["source", m.source],
  ]);
  const now = feed.now;
  fill("now", [
    ["queued rows", now.queue_depth],
    ["active flows", now.active_flows],
    ["WebSockets", now.open_connections],
    ...Object.entries(now.tcp_connections).map(([state, n]) => [`TCP ${state}`, n]),
    ["queries (total)", feed.totals.queries],
    ["auth", feed.auth ? "token" : "none"],
  ]);
  fill("limits", Object.entries(feed.limits).map(([name, value]) => [name, value ?? "default"]));
  $("window").textContent = duration(feed.window_s);
  histogram(feed.window.batch_size);
  errors(feed.window.errors, feed.totals.errors);
  charts();
}

function fill(id, pairs) {
  const list = $(id);
  list.replaceChildren();
  for (const [name, value] of pairs) {
    const term = document.createElement("dt");
    const detail = document.createElement("dd");
    term.textContent = name;
    detail.textContent = value ?? "–";
    list.append(term, detail);
  }
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function histogram(buckets) {
  const most = Math.max(1, ...buckets.map(([, count]) => count));
  const rows = buckets.map(([bound, count]) => {
    const row = document.createElement("div");
    const label = document.createElement("span");
    const bar = document.createElement("span");
    const value = document.createElement("span");
    label.textContent = bound === null ? "more" : `≤ ${bound}`;
    bar.className = "bar";
    bar.style.width = `${(100 * count) / most}%`;
    value.textContent = count;
    row.append(label, bar, value);
    return row;
  });
  $("histogram").replaceChildren(...rows);
}

function errors(inWindow, total) {
  const rows = Object.keys(total).map((code) => {
    const row = document.createElement("tr");
    for (const text of [code, inWindow[code] ?? 0, total[code]]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  });
  $("errors").replaceChildren(...rows);
}

function charts() {
  const columns = dashboard.columns;
  for (const [id, lines] of Object.entries(CHARTS)) {
    const data = [columns.t, ...lines.map(([name]) => columns[name])];
    const chart = dashboard.charts[id];
    if (chart) {
      chart.setData(data);
      continue;
    }
    const element = $(id);
    dashboard.charts[id] = new uPlot(
      {
        width: element.clientWidth || 400,
        height: 150,
        series: [
          {},
          ...lines.map(([, label], i) => ({ label, stroke: COLORS[i], width: 1.5 })),
        ],
        axes: [{}, { size: 56 }],
        scales: { y: { range: (_u, min, max) => [0, Math.max(1, max * 1.1)] } },
      },
      data,
      element,
    );
  }
}

// A hidden tab neither polls nor draws; when shown again, ?since= fetches the seconds missed.
document.addEventListener("visibilitychange", () => {
  if (dashboard.timer === null && !document.hidden && !$("main").hidden) {
    poll();
    dashboard.timer = setInterval(poll, POLL_MS);
  } else if (document.hidden && dashboard.timer !== null) {
    clearInterval(dashboard.timer);
    dashboard.timer = null;
  }
});

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(dashboard.charts)) {
    chart.setSize({ width: $(id).clientWidth, height: 150 });
  }
});

// -- the query console ----------------------------------------------------------------------
function socketUrl() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

function client() {
  if (dashboard.client === null) {
    dashboard.client = new FlasmaClient(socketUrl(), {
      token: dashboard.token ?? undefined,
      connectAttempts: 2,
    });
  }
  return dashboard.client;
}

function parseVector(text, dim) {
  const trimmed = text.trim();
  const values = trimmed.startsWith("[")
    ? JSON.parse(trimmed)
    : trimmed.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!Array.isArray(values) || values.some((v) => typeof v !== "number" || !isFinite(v))) {
    throw new Error("The vector must be numbers: a JSON array, or numbers separated by commas.");
  }
  if (dim !== undefined && values.length !== dim) {
    throw new Error(`The vector has ${values.length} numbers; this server's vectors have ${dim}.`);
  }
  return values;
}

function parseKey(text) {
  const raw = text.trim();
  if (!raw) throw new Error("Give a key.");
  if (dashboard.info.key_type === "str") return raw;
  const key = Number(raw);
  if (!Number.isSafeInteger(key) || key < 0) throw new Error("Keys here are integers ≥ 0.");
  return key;
}

async function guarded(action) {
  showProblem("console-error", "");
  try {
    await action();
  } catch (error) {
    const code = error instanceof FlasmaServerError ? `${error.code}: ` : "";
    showProblem("console-error", code + (error.message ?? String(error)));
  }
}

async function search() {
  const vector = parseVector($("vector").value, dashboard.info.dim);
  const k = Number($("k").value);
  const started = performance.now();
  const hits = await client().query(vector, { k });
  const ms = performance.now() - started;
  dashboard.lastResult = hits;
  $("latency").textContent = `${hits.length} hits in ${ms.toFixed(1)} ms`;
  $("results").replaceChildren(
    ...hits.map(([row, score], rank) => {
      const tr = document.createElement("tr");
      for (const text of [rank + 1, row, score.toFixed(6)]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        tr.append(cell);
      }
      return tr;
    }),
  );
}

function randomVector() {
  const dim = dashboard.info.dim ?? 0;
  const values = Array.from({ length: dim }, () => (Math.random() * 2 - 1).toFixed(4));
  $("vector").value = `[${values.join(", ")}]`;
}

async function useKey() {
  const key = parseKey($("key").value);
  const answer = await client().get([key]);
  const item = answer.items?.[0];
  if (!item) throw new Error(`No row has the key ${key}.`);
  $("vector").value = JSON.stringify(item.embedding);
  await search();
}

async function upsert() {
  const key = parseKey($("write-key").value);
  const embedding = parseVector($("vector").value, dashboard.info.dim);
  const answer = await client().upsert([{ key, embedding }]);
  $("write-result").textContent = `upserted ${answer.upserted}`;
}

async function remove() {
  const key = parseKey($("write-key").value);
  const answer = await client().delete([key]);
  $("write-result").textContent = `deleted ${answer.deleted}`;
}

let consoleWired = false;

function setUpConsole(info) {
  // Every server answers "get" (keys are row numbers unless it holds a live collection);
  // writes exist where it says so (/info "writable": true).
  $("writes").hidden = !info.writable;
  $("result-key").textContent = info.writable ? "key" : "row";
  $("key").placeholder = info.writable ? "key" : "row number";
  if (consoleWired) return;
  consoleWired = true;
  $("search").addEventListener("click", () => guarded(search));
  $("random").addEventListener("click", () => guarded(async () => randomVector()));
  $("use-key").addEventListener("click", () => guarded(useKey));
  $("upsert").addEventListener("click", () => guarded(upsert));
  $("delete").addEventListener("click", () => guarded(remove));
}

open();
