// The tinkerd console: polls the JSON API every POLL_MS and draws what it answers.
// Everything the server sends is put in the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const MAX_RUNS = 100; // the newest runs shown
const MAX_POINTS = 10000; // loss points kept per run
const EVENT_TYPES = "forward_backward,optim_step";
const KEY_STORE = "tinkerd-api-key";
const SVG_NS = "http://www.w3.org/2000/svg";
// Served at <prefix>/console: the API is at <prefix>/api/v1.
const BASE = location.pathname.replace(/\/console\/?$/, "");

const state = {
  runs: [], // the last list, newest first
  runsTotal: 0,
  curves: new Map(), // run id -> curve (see newCurve)
  selected: null,
  checkpoints: [],
  checkpointsOf: null, // the run they belong to, null for all runs
  queue: [], // recent total queue depths
  autoSelected: false,
};

// -- the API key -----------------------------------------------------------------------------

class AuthError extends Error {}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

/** A `#key=tml-...` fragment goes to sessionStorage and out of the address bar. */
function takeKeyFromFragment() {
  const parts = location.hash.slice(1).split("&").filter(Boolean);
  const found = parts.find((p) => p.startsWith("key="));
  if (!found) return;
  let key = found.slice(4);
  try {
    key = decodeURIComponent(key).trim();
  } catch {
    // not %-encoded after all: take it as it is
  }
  if (key) sessionStorage.setItem(KEY_STORE, key);
  const rest = parts.filter((p) => p !== found).join("&");
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
}

function setupKeyForm() {
  const input = document.getElementById("key-input");
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    input.value = "";
    showKeyState();
    refreshNow();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    showKeyState();
    refreshNow();
  });
  showKeyState();
}

function showKeyState() {
  const key = apiKey();
  const input = document.getElementById("key-input");
  input.placeholder = key ? "key set (" + key.slice(0, 8) + "…)" : "tml-…";
  document.getElementById("key-forget").hidden = !key;
}

// -- fetching --------------------------------------------------------------------------------

async function api(path) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  const response = await fetch(BASE + path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    throw new AuthError(response.status + ": " + (await errorText(response)));
  }
  if (!response.ok) {
    const why = await errorText(response);
    throw new Error(path.split("?")[0] + " answered " + response.status + ": " + why);
  }
  return response.json();
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && typeof body.error === "object" ? body.error.message : String(body.error);
  } catch {
    return response.statusText;
  }
}

/** The newest MAX_RUNS runs (the API lists the oldest first), newest first. */
async function fetchRuns() {
  const offset = Math.max(0, state.runsTotal - MAX_RUNS);
  let page = await api("/api/v1/training_runs?limit=" + MAX_RUNS + "&offset=" + offset);
  const total = page.cursor.total_count;
  if (total > offset + page.training_runs.length || (total <= offset && total > 0)) {
    const last = Math.max(0, total - MAX_RUNS);
    page = await api("/api/v1/training_runs?limit=" + MAX_RUNS + "&offset=" + last);
  }
  state.runsTotal = page.cursor.total_count;
  return page.training_runs.slice().reverse();
}

// -- loss curves -----------------------------------------------------------------------------
// One point per optimizer step: the summed loss (`loss:sum`) of the forward_backward calls
// since the step before, so a batch the SDK sent in chunks, or accumulated over several calls,
// is one point. Events come in seq_id order; polling asks for those since the last one's time
// (a second early, in case of equal times) and skips seq_ids already seen.

function newCurve() {
  return { points: [], steps: 0, lastSeq: -1, lastTime: null, pending: null, loaded: false };
}

function absorb(curve, event) {
  if (typeof event.seq_id === "number") {
    if (event.seq_id <= curve.lastSeq) return;
    curve.lastSeq = event.seq_id;
  }
  curve.lastTime = event.time;
  if (event.type === "forward_backward") {
    if (typeof event.loss !== "number") return;
    curve.pending = curve.pending || { loss: 0, calls: 0, tokens: 0 };
    curve.pending.loss += event.loss;
    curve.pending.calls += 1;
    curve.pending.tokens += event.tokens || 0;
  } else if (event.type === "optim_step") {
    curve.steps += 1;
    if (curve.pending) {
      curve.points.push({ step: curve.steps, time: event.time, ...curve.pending });
      if (curve.points.length > MAX_POINTS) curve.points.shift();
    }
    curve.pending = null;
  }
}

async function pollCurve(runId) {
  const curve = state.curves.get(runId) || newCurve();
  state.curves.set(runId, curve);
  const path = "/api/v1/training_runs/" + encodeURIComponent(runId) + "/events";
  let offset = 0;
  for (;;) {
    const query = new URLSearchParams({ type: EVENT_TYPES, limit: "1000", offset: String(offset) });
    if (curve.lastTime !== null) query.set("since", String(curve.lastTime - 1));
    const page = await api(path + "?" + query);
    page.events.forEach((e) => absorb(curve, e));
    offset += page.events.length;
    if (page.events.length === 0 || offset >= page.cursor.total_count) break;
  }
  curve.loaded = true;
}

/** Runs whose curves may change (active ones and the selected one), and any not read yet. */
async function pollCurves(runs) {
  const due = runs
    .filter((r) => {
      const id = r.training_run_id;
      return r.status === "active" || id === state.selected || !state.curves.get(id)?.loaded;
    })
    .map((r) => r.training_run_id);
  const workers = Array.from({ length: 4 }, async () => {
    while (due.length) {
      const id = due.shift();
      try {
        await pollCurve(id);
      } catch (e) {
        if (e instanceof AuthError) throw e;
        // one run's events failing (a run just deleted) must not stop the others
      }
    }
  });
  await Promise.all(workers);
}

// -- drawing helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}

function formatDuration(seconds) {
  const s = Math.round(seconds);
  if (s < 90) return s + " s";
  const m = Math.round(s / 60);
  if (m < 90) return m + " min";
  if (m < 48 * 60) return Math.floor(m / 60) + " h " + (m % 60) + " min";
  const h = Math.round(m / 60);
  return Math.floor(h / 24) + " d " + (h % 24) + " h";
}

function formatLoss(x) {
  if (typeof x !== "number") return "–";
  const odd = Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 0.001);
  return odd ? x.toExponential(3) : x.toPrecision(5);
}

function formatTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

/** A polyline of `values` scaled into a w x h box; `data-points` says how many. */
function polyline(values, w, h, pad = 2) {
  const line = el("svg:polyline", { "data-points": String(values.length) });
  if (values.length === 0) return line;
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const span = hi - lo || 1;
  const dx = values.length > 1 ? (w - 2 * pad) / (values.length - 1) : 0;
  const xy = values.map((v, i) => {
    const x = values.length > 1 ? pad + i * dx : w / 2;
    const y = h - pad - ((v - lo) / span) * (h - 2 * pad);
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  line.setAttribute("points", xy.join(" "));
  return line;
}

function sparkline(values, cls = "spark") {
  const svg = el("svg:svg", { class: cls, viewBox: "0 0 120 28", preserveAspectRatio: "none" });
  svg.append(polyline(values, 120, 28));
  return svg;
}

/** Rows keyed by `key`, updated in place (so a row being clicked survives a refresh). */
function syncRows(table, rows, emptyId) {
  const tbody = table.tBodies[0];
  const old = new Map(Array.from(tbody.rows, (tr) => [tr.dataset.key, tr]));
  rows.forEach((row, i) => {
    let tr = old.get(row.key);
    old.delete(row.key);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = row.key;
    }
    if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
    while (tr.cells.length < row.cells.length) tr.insertCell();
    row.cells.forEach((cell, j) => fillCell(tr.cells[j], cell));
    tr.className = row.cls || "";
    if (row.onclick) tr.onclick = row.onclick;
  });
  old.forEach((tr) => tr.remove());
  document.getElementById(emptyId).hidden = rows.length > 0;
}

// A cell: text, a Node, or {text | node, cls, title, data: {name: value}}.
function fillCell(td, cell) {
  const plain = cell instanceof Node || typeof cell !== "object" || cell === null;
  const spec = plain ? { value: cell } : cell;
  const value = spec.value ?? spec.node ?? spec.text;
  if (value instanceof Node) {
    td.replaceChildren(value);
  } else {
    const text = value === undefined || value === null ? "" : String(value);
    if (td.textContent !== text || td.children.length) td.textContent = text;
  }
  td.className = spec.cls || "";
  td.title = spec.title || "";
  for (const [k, v] of Object.entries(spec.data || {})) td.dataset[k] = String(v);
}

// -- sections --------------------------------------------------------------------------------

function renderRuns() {
  const table = document.getElementById("runs");
  const rows = state.runs.map((run) => {
    const id = run.training_run_id;
    const curve = state.curves.get(id) || newCurve();
    const last = curve.points[curve.points.length - 1];
    const status = run.status || "?";
    const where = status === "active" && run.worker ? status + " (" + run.worker + ")" : status;
    return {
      key: id,
      cls: id === state.selected ? "selected" : "",
      onclick: () => select(id),
      cells: [
        { text: id, cls: "id", title: id },
        { text: run.base_model, cls: "base", title: run.base_model },
        { text: where, cls: "status status-" + status, title: run.lost_reason || "" },
        { text: curve.steps, cls: "num steps" },
        {
          text: last ? formatLoss(last.loss) : "–",
          cls: "num loss",
          title: last ? String(last.loss) : "",
        },
        { node: sparkline(curve.points.map((p) => p.loss)), cls: "curve" },
      ],
    };
  });
  syncRows(table, rows, "runs-empty");
  const shown = state.runs.length;
  document.getElementById("runs-count").textContent =
    state.runsTotal > shown
      ? "(newest " + shown + " of " + state.runsTotal + ")"
      : "(" + shown + ")";
}

function renderChart() {
  const svg = document.getElementById("chart");
  const title = document.getElementById("chart-title");
  const readout = document.getElementById("chart-readout");
  const id = state.selected;
  const curve = id ? state.curves.get(id) || newCurve() : null;
  const w = Math.max(200, Math.round(svg.clientWidth || 800));
  const h = 260;
  const left = 64;
  const bottom = 22;
  const top = 10;
  const right = 12;
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  svg.replaceChildren();
  if (!curve) {
    title.textContent = "select a run";
    readout.textContent = "";
    return;
  }
  const points = curve.points;
  title.textContent = id + " — " + points.length + " step" + (points.length === 1 ? "" : "s");
  const values = points.map((p) => p.loss);
  const lo = values.length ? Math.min(...values) : 0;
  const hi = values.length ? Math.max(...values) : 1;
  for (const [frac, value] of [[0, hi], [0.5, (lo + hi) / 2], [1, lo]]) {
    const y = top + frac * (h - top - bottom);
    svg.append(el("svg:line", { class: "grid", x1: left, x2: w - right, y1: y, y2: y }));
    svg.append(el("svg:text", { x: left - 6, y: y + 4, "text-anchor": "end" }, formatLoss(value)));
  }
  if (points.length) {
    const first = points[0].step;
    const lastStep = points[points.length - 1].step;
    svg.append(el("svg:text", { x: left, y: h - 6 }, "step " + first));
    const end = { x: w - right, y: h - 6, "text-anchor": "end" };
    svg.append(el("svg:text", end, "step " + lastStep));
  }
  const box = { x: left, y: top, width: w - left - right, height: h - top - bottom };
  const plot = el("svg:svg", box);
  const line = polyline(values, w - left - right, h - top - bottom, 4);
  plot.append(line);
  svg.append(plot);
  const last = points[points.length - 1];
  readout.textContent = last ? "last: " + describe(last) : "no optimizer steps yet";
  svg.onmousemove = (e) => {
    if (!points.length) return;
    const box = svg.getBoundingClientRect();
    const x = ((e.clientX - box.left) / box.width) * w - left;
    const i = Math.round((x / (w - left - right)) * (points.length - 1));
    const p = points[Math.min(points.length - 1, Math.max(0, i))];
    readout.textContent = describe(p);
  };
}

function describe(point) {
  const calls = point.calls + " forward_backward" + (point.calls === 1 ? "" : "s");
  return "step " + point.step + ", loss " + formatLoss(point.loss) + " (" + calls + ", " +
    point.tokens + " tokens)";
}

function renderWorkers(status) {
  const rows = status.workers.map((w) => {
    const total = w.memory_total || 0;
    const used = total - (w.memory_free || 0);
    const bar = el("span", { class: "bar" });
    const fill = el("span");
    fill.style.width = total ? Math.round((100 * used) / total) + "%" : "0";
    bar.append(fill);
    const memory = el("span");
    memory.append(bar, formatBytes(used) + " / " + formatBytes(total));
    const gpu = w.gpu_utilization !== undefined ? " · GPU " + w.gpu_utilization + "%" : "";
    const models = w.models || [];
    const age = w.heartbeat_age_seconds;
    return {
      key: w.name,
      cells: [
        { text: w.name, cls: "name", title: w.host || "" },
        {
          text: (w.device || "?") + (w.gpu_name ? " (" + w.gpu_name + ")" : "") + gpu,
          cls: "device",
        },
        { node: memory, cls: "memory", data: { used: used, total: total } },
        {
          text: w.models_held ?? models.length,
          cls: "num models",
          title: models.concat(w.base_models || []).join("\n"),
        },
        { text: w.queue_depth ?? "–", cls: "num queue" },
        { text: typeof age === "number" ? age.toFixed(1) + " s" : "–", cls: "num heartbeat" },
      ],
    };
  });
  syncRows(document.getElementById("workers"), rows, "workers-empty");
  const host = status.host || {};
  const load = host.load_average ? " · load " + host.load_average.join(" ") : "";
  const ram = host.memory_total
    ? " · RAM " + formatBytes(host.memory_total - (host.memory_available || 0)) + " / " +
      formatBytes(host.memory_total) + " used"
    : "";
  document.getElementById("host").textContent =
    "API host " + (host.hostname || "?") + ": " + (host.cpu_count || "?") + " CPUs" + load + ram +
    " · " + status.models + " live models";
  const lost = document.getElementById("lost");
  lost.hidden = !status.lost_models.length;
  lost.textContent =
    "Lost models: " + status.lost_models.map((m) => m.model_id + " (" + m.reason + ")").join("; ");
  document.getElementById("mode").textContent = status.mode;
}

function renderQueue(depth) {
  document.getElementById("queue-depth").textContent = String(depth);
  state.queue.push(depth);
  if (state.queue.length > 120) state.queue.shift();
  const svg = document.getElementById("queue-chart");
  svg.replaceChildren(polyline(state.queue, 240, 40));
}

function renderCheckpoints() {
  const now = Date.now();
  const rows = state.checkpoints.map((c) => {
    const path = c.tinker_path;
    const run = path.replace(/^tinker:\/\//, "").split("/")[0];
    const name = c.checkpoint_id.split("/").slice(1).join("/");
    let expires = "never";
    if (c.expires_at) {
      // Any value renders: one the browser cannot read is shown as it came.
      const left = (Date.parse(c.expires_at) - now) / 1000;
      if (isNaN(left)) expires = String(c.expires_at);
      else expires = left > 0 ? "in " + formatDuration(left) : "expired";
    }
    return {
      key: path,
      cells: [
        { text: run, cls: "id run", title: run },
        { text: name, cls: "name", title: path },
        { text: c.checkpoint_type, cls: "kind" },
        { text: formatBytes(c.size_bytes), cls: "num size", data: { bytes: c.size_bytes ?? "" } },
        { text: formatTime(c.time), cls: "saved", title: c.time || "" },
        {
          text: expires,
          cls: "ttl",
          title: c.expires_at ? "expires at " + formatTime(c.expires_at) : "no TTL",
          data: { expiresAt: c.expires_at || "never" },
        },
      ],
    };
  });
  syncRows(document.getElementById("checkpoints"), rows, "checkpoints-empty");
  document.getElementById("checkpoints-scope").textContent =
    state.checkpointsOf ? "of " + state.checkpointsOf : "of all runs";
  document.getElementById("show-all").hidden = !state.selected;
}

async function fetchCheckpoints() {
  const of = state.selected;
  const body = of
    ? await api("/api/v1/training_runs/" + encodeURIComponent(of) + "/checkpoints")
    : await api("/api/v1/checkpoints?limit=100");
  state.checkpoints = body.checkpoints;
  state.checkpointsOf = of;
}

function select(id) {
  state.selected = id;
  renderRuns();
  renderChart();
  refreshNow();
}

// -- status line and messages ----------------------------------------------------------------

function showBanner(text, cls = "") {
  const banner = document.getElementById("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
  banner.className = cls;
}

function showHealth(ok, text) {
  const health = document.getElementById("health");
  health.textContent = text;
  health.className = "badge " + (ok ? "ok" : "bad");
}

// -- the loop --------------------------------------------------------------------------------

async function refresh() {
  try {
    const [health, status, runs] = await Promise.all([
      api("/api/v1/healthz"),
      api("/api/v1/system/status"),
      fetchRuns(),
    ]);
    state.runs = runs;
    if (!runs.some((r) => r.training_run_id === state.selected)) state.selected = null;
    if (!state.autoSelected && runs.length) {
      state.autoSelected = true; // the newest run, once; the user may then pick another, or none
      state.selected = state.selected || runs[0].training_run_id;
    }
    await Promise.all([pollCurves(runs), fetchCheckpoints()]);
    showHealth(health.status === "ok", health.status);
    renderWorkers(status);
    renderQueue(health.queue_depth);
    renderRuns();
    renderChart();
    renderCheckpoints();
    showBanner(null);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof AuthError) {
      const why = apiKey()
        ? "The API key was refused (" + e.message + "): enter your API key."
        : "This server needs an API key: enter your API key (tml-…) above.";
      showBanner(why, "auth");
      showHealth(false, "needs a key");
      document.getElementById("key-input").focus();
    } else {
      showBanner("Cannot refresh: " + e.message + " (retrying every " + POLL_MS / 1000 + " s)");
      showHealth(false, "unavailable");
    }
  }
}

let timer = null;
let running = null;
let again = false;

/** Refresh now, then every POLL_MS; never two refreshes at once. */
function refreshNow() {
  if (running) {
    again = true;
    return;
  }
  clearTimeout(timer);
  running = refresh().finally(() => {
    running = null;
    if (again) {
      again = false;
      refreshNow();
    } else {
      timer = setTimeout(refreshNow, POLL_MS);
    }
  });
}

takeKeyFromFragment();
setupKeyForm();
document.getElementById("show-all").addEventListener("click", () => select(null));
window.addEventListener("resize", renderChart);
refreshNow();
