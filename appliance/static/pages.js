// The admin pages: status (/api/status, power and model events), models (/api/models or /v1/models) and the
// request log (/api/logs with filters, one row, CSV and JSON Lines export). Only the documented REST API.
"use strict";

import { $, api, download, errorMessage, fillList, fillTable, fmt, getJSON, getKey, h, postJSON, setKey } from "./api.js";

export const role = { admin: false, logs: false };

// -- status ---------------------------------------------------------------------------------
export function showPower(status) {
  const badge = $("power");
  badge.textContent = status.state.replace("_", " ");
  badge.className = `badge ${status.state}`;
  badge.dataset.state = status.state;
}

export async function loadStatus() {
  try {
    const status = await getJSON("/api/status");
    showPower(status);
    $("page-status").dataset.state = status.state;
    fillList($("status-power"), [
      ["service up for", fmt.seconds(status.uptime_s)],
      ["state", status.state.replace("_", " ")],
      ["in this state for", fmt.seconds(status.seconds_in_state)],
      ["next", status.next_state ? `${status.next_state.replace("_", " ")} in ${fmt.seconds(status.seconds_to_next_state)}` : "–"],
      ["last wake", status.last_wake_ms ? `${Math.round(status.last_wake_ms)} ms` : "–"],
      ["profile", `${status.profile}${status.dry_run ? " (dry run)" : ""}`],
      ["requests in flight", status.requests_in_flight],
    ]);
    const sys = status.system || {};
    const pairs = [
      ["CPU (service)", sys.cpu_percent !== undefined ? `${fmt.num(sys.cpu_percent, 0)} %` : null],
      ["CPU (box)", sys.system_cpu_percent !== undefined ? `${fmt.num(sys.system_cpu_percent, 0)} %` : null],
      ["memory used", sys.total_memory ? `${fmt.bytes(sys.total_memory - sys.available_memory)} of ${fmt.bytes(sys.total_memory)}` : null],
      ["RSS (service + runners)", fmt.bytes(sys.rss)],
    ];
    for (const [name, value] of Object.entries(sys.temperatures_c || {})) pairs.push([`temperature ${name}`, `${fmt.num(value, 1)} °C`]);
    if (sys.gpu_percent !== undefined) pairs.push(["GPU", `${fmt.num(sys.gpu_percent, 0)} %`]);
    fillList($("status-system"), pairs);
    const q = status.queue || {};
    fillList($("status-queue"), [
      ["busy slots", `${q.busy_slots} of ${q.slots}`],
      ["waiting", q.queue_depth],
      ...Object.entries(q.queued_by_class || {}).map(([name, n]) => [`waiting: ${name}`, `${n}, expect ${fmt.num((q.expected_wait_s || {})[name], 1)} s`]),
      ["wait p50 / p99", q.wait_ms_p50 == null ? "no waits yet" : `${fmt.num(q.wait_ms_p50, 0)} / ${fmt.num(q.wait_ms_p99, 0)} ms`],
      ["last batch", q.batch_size],
    ]);
    const m = status.models || {};
    fillList($("status-models"), [
      ["loaded", (m.loaded || []).join(", ") || "none"],
      ["memory estimate", m.estimated_memory_mib !== undefined ? `${m.estimated_memory_mib} MiB of ${m.max_model_memory_mb} MiB` : null],
      ["at most loaded", m.max_loaded],
    ]);
    $("status-error").textContent = "";
    const [power, events] = await Promise.all([getJSON("/api/power/events?limit=15"), getJSON("/api/models/events?limit=15")]);
    fillTable($("power-events").tBodies[0], power.data.map((e) =>
      [fmt.time(e.time), e.from_state, e.to_state, e.reason, fmt.num(e.wake_ms, 0)]), "No power state changes yet.");
    showModelEvents($("status-model-events").tBodies[0], events.data);
    await loadCharts();
  } catch (err) {
    $("status-error").textContent = err.message;
  }
}

// -- charts (uPlot, vendored: appliance/static/vendor/MANIFEST.json) --------------------------------------
const CHARTS = {
  requests: [["requests", "requests", "#1f6feb"], ["errors", "5xx", "#b42318"]],
  latency: [["latency_p50_s", "p50", "#1f6feb"], ["latency_p95_s", "p95", "#e8590c"]],
  ttft: [["ttft_p50_s", "p50", "#1f6feb"], ["ttft_p95_s", "p95", "#e8590c"]],
  tps: [["tokens_per_s_p50", "tok/s", "#2b8a3e"]],
};
const charts = {};
let uPlot = null;

async function loadCharts() {
  const history = await getJSON("/api/status/history");
  uPlot = uPlot || (await import("./vendor/uplot/uPlot.esm.js")).default;
  $("charts").dataset.minutes = history.time.length;
  $("charts").dataset.requests = history.requests.reduce((a, b) => a + b, 0);
  for (const [name, series] of Object.entries(CHARTS)) {
    const data = [history.time, ...series.map(([key]) => history[key])];
    const holder = document.querySelector(`[data-chart=${name}]`);
    const width = Math.max(260, holder.clientWidth || 300);
    if (charts[name] && charts[name].width === width) {
      charts[name].setData(data);
      continue;
    }
    if (charts[name]) charts[name].destroy();
    charts[name] = new uPlot({
      width, height: 160, legend: { show: true }, cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      series: [{}, ...series.map(([, label, stroke]) => ({ label, stroke, width: 2, spanGaps: false, points: { size: 4 } }))],
      axes: [{}, { size: 50 }],
    }, data, holder);
  }
}

function showModelEvents(tbody, events) {
  fillTable(tbody, events.map((e) => [fmt.time(e.time), e.event, e.model, e.who, fmt.num(e.duration_ms, 0), e.outcome, e.detail]),
    "No model events yet.");
}

async function forcePower(state) {
  try {
    showPower(await postJSON("/api/power", { state }));
    await loadStatus();
  } catch (err) {
    $("status-error").textContent = err.message;
  }
}

// -- models ---------------------------------------------------------------------------------
export async function loadModels() {
  try {
    let models;
    if (role.admin) models = (await getJSON("/api/models")).data;
    else models = (await getJSON("/v1/models")).data.map((m) => ({ id: m.id, ...(m.appliance || {}) }));
    fillTable($("model-table").tBodies[0], models.map((m) => [
      m.id + (m.default ? " (default)" : "") + ((m.aliases || []).length ? ` · aka ${m.aliases.join(", ")}` : ""),
      m.kind, m.format, m.quantization, m.target, fmt.bytes(m.size_bytes), m.context_length, report(m.metrics),
      m.loaded ? `loaded${m.runner_pid ? ` (pid ${m.runner_pid})` : ""}${m.in_use ? `, ${m.in_use} in use` : ""}` : "not loaded",
      ...(role.admin ? [checksums[m.id] ? `${checksums[m.id].ok ? "ok" : "FAILED"}: ${checksums[m.id].detail}` : "not checked",
        modelActions(m)] : []),
    ]), "No models.");
    $("swap-name").replaceChildren(...models.map((m) => h("option", m.id, { value: m.id })));
    if (role.admin) showModelEvents($("model-events").tBodies[0], (await getJSON("/api/models/events?limit=30")).data);
    $("models-error").textContent = "";
  } catch (err) {
    $("models-error").textContent = err.message;
  }
}

const checksums = {};

/** A package's measured figures, as its report.json names them: "perplexity_ratio 1.05 · greedy_agreement 0.91". */
function report(metrics) {
  return Object.entries(metrics || {}).filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toPrecision(3)}`).join(" · ");
}

async function verifyModels() {
  $("verify-models").disabled = true;
  $("verify-models-result").textContent = "Reading every model file…";
  try {
    const { data, ok } = await getJSON("/api/models/verify");
    for (const r of data) checksums[r.name] = r;
    $("verify-models-result").textContent = ok ? "Every installed model matches its sha256." : "A model does not match its sha256: see the table.";
    $("verify-models-result").dataset.ok = ok;
  } catch (err) {
    $("verify-models-result").textContent = err.message;
  }
  $("verify-models").disabled = false;
  await loadModels();
}

function modelActions(model) {
  const span = h("span", null, { className: "row" });
  for (const action of model.loaded ? ["unload"] : ["load"]) {
    const b = h("button", action === "load" ? "Load" : "Unload", { type: "button" });
    b.dataset.action = action;
    b.dataset.model = model.id;
    b.setAttribute("aria-label", `${action} ${model.id}`);
    b.addEventListener("click", () => modelAction(model.id, action, b));
    span.appendChild(b);
  }
  return span;
}

async function modelAction(name, action, button) {
  button.disabled = true;
  $("models-result").textContent = `${action === "load" ? "Loading" : "Unloading"} ${name}…`;
  try {
    await postJSON(`/api/models/${encodeURIComponent(name)}/${action}`);
    $("models-result").textContent = `${name}: ${action === "load" ? "loaded" : "unloaded"}.`;
  } catch (err) {
    $("models-result").textContent = `${name}: ${err.message}`;
  }
  await loadModels();
}

async function swap(e) {
  e.preventDefault();
  const name = $("swap-name").value;
  const pkg = $("swap-package").value.trim();
  $("models-result").textContent = `Swapping ${name} to ${pkg}: loading it and running the warm-up probe…`;
  try {
    const result = await postJSON(`/api/models/${encodeURIComponent(name)}/swap`, { package: pkg });
    const t = result.swap || {};
    $("models-result").textContent = `${name} now serves ${result.id}. ` +
      Object.entries(t).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(2) : v}`).join(", ");
  } catch (err) {
    $("models-result").textContent = `Swap refused: ${err.message}`;
  }
  await loadModels();
}

async function importPackage(e) {
  e.preventDefault();
  const body = { path: $("import-path").value.trim() };
  if ($("import-key").value.trim()) body.public_key = $("import-key").value.trim();
  $("models-result").textContent = `Importing ${body.path}: checking every file…`;
  try {
    const model = await postJSON("/api/models/import", body);
    $("models-result").textContent = `Imported ${model.id}: its checksums${body.public_key ? " and signature" : ""} hold.`;
    $("import-form").reset();
  } catch (err) {
    $("models-result").textContent = `Import refused: ${err.message}`;
  }
  await loadModels();
}

// -- logs -----------------------------------------------------------------------------------
const PAGE = 25;
let logOffset = 0;

/** The filter form as query arguments; datetime-local is the viewer's local time, sent as UTC. */
export function logQuery() {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("log-filters"))) {
    if (!String(value).trim()) continue;
    params.set(name, name === "since" || name === "until" ? new Date(value).toISOString() : String(value).trim());
  }
  return params;
}

export async function loadLogs() {
  const params = logQuery();
  params.set("limit", PAGE);
  params.set("offset", logOffset);
  try {
    const { data, has_more } = await getJSON(`/api/logs?${params}`);
    $("log-rows").replaceChildren(...data.map(logRow));
    $("logs-empty").hidden = data.length > 0;
    $("logs-older").disabled = !has_more;
    $("logs-newer").disabled = logOffset === 0;
    $("logs-page").textContent = data.length ? `rows ${logOffset + 1}–${logOffset + data.length}` : "";
    $("logs-error").textContent = "";
  } catch (err) {
    $("logs-error").textContent = err.message;
  }
}

function logRow(r) {
  const tr = h("tr", null, { className: r.status >= 400 ? "failed" : "" });
  tr.dataset.id = r.id;
  const open = h("button", r.id, { type: "button", className: "link" });
  open.setAttribute("aria-label", `details of request ${r.id}`);
  open.addEventListener("click", () => showDetail(r.id));
  const first = h("td");
  first.appendChild(open);
  tr.appendChild(first);
  for (const value of [fmt.time(r.started), r.endpoint, r.model, r.key_id, r.priority, r.status ?? "running", r.prompt_tokens,
    r.completion_tokens, fmt.num(r.ttft_ms, 0), fmt.num(r.tokens_per_s, 1), r.error]) tr.appendChild(h("td", value ?? ""));
  return tr;
}

async function showDetail(id) {
  const panel = $("log-detail");
  let row;
  try {
    row = await getJSON(`/api/logs/${id}?text=true`);
  } catch (err) {
    $("logs-error").textContent = err.message;
    return;
  }
  $("log-detail-title").textContent = `Request ${row.id}`;
  fillList($("log-detail-fields"), Object.entries(row).filter(([k]) => k !== "prompt" && k !== "response")
    .map(([k, v]) => [k, v === null ? "–" : String(v)]));
  $("log-detail-prompt").textContent = row.prompt ?? "(not stored: only its sha256 is kept)";
  $("log-detail-response").textContent = row.response ?? "(not stored: only its sha256 is kept)";
  panel.hidden = false;
  panel.focus();
}

async function exportLogs(format) {
  const params = logQuery();
  params.set("format", format);
  params.set("text", "true");
  const response = await api(`/api/logs/export?${params}`);
  if (!response.ok) {
    $("logs-error").textContent = await errorMessage(response);
    return;
  }
  const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  download(name ? name[1] : `requests.${format}`, await response.text(), response.headers.get("Content-Type"));
}

async function verifyLog() {
  $("verify-result").textContent = "Checking every row and signed checkpoint…";
  $("verify-problems").replaceChildren();
  try {
    const r = await getJSON("/api/logs/verify");
    $("verify-result").dataset.ok = r.ok;
    $("verify-result").textContent = `${r.ok ? "OK" : "FAILED"}: ${r.rows} chained row(s)` +
      (r.rows ? ` (seq ${r.first_seq} to ${r.last_seq})` : "") + `, signed through seq ${r.signed_through || 0}; ` +
      `${r.unsigned_tail} not yet signed, ${r.open_rows} still open. Checked ${fmt.time(r.checked)} UTC.`;
    $("verify-problems").replaceChildren(...r.problems.map((p) => h("li", p)));
  } catch (err) {
    $("verify-result").textContent = err.message;
  }
}

async function loadLogModels() {
  try {
    const { data } = await getJSON("/v1/models", { quiet: true });
    const select = $("filter-model");
    const chosen = select.value;
    select.replaceChildren(h("option", "any", { value: "" }), ...data.map((m) => h("option", m.id, { value: m.id })));
    select.value = chosen;
  } catch {
    // an auditor key may not list models: the filter stays "any"
  }
  try {
    const status = await getJSON("/api/status", { quiet: true });
    $("priority-classes").replaceChildren(...Object.keys(status.queue.queued_by_class).map((c) => h("option", "", { value: c })));
  } catch {
    // only admins see the classes; others type one
  }
}

// -- keys -----------------------------------------------------------------------------------
export async function loadKeys() {
  try {
    const [{ data }, status] = await Promise.all([getJSON("/api/keys"), getJSON("/api/status")]);
    fillTable($("key-table").tBodies[0], data.map((k) => [
      k.id, k.name, k.role, k.state, k.priority || "default", `${k.rpm ?? "box"} / ${k.tpm ?? "box"}`,
      k.expires ? fmt.time(k.expires) : "never", fmt.time(k.created), k.state === "active" ? revokeButton(k) : "",
    ]), "No keys: anyone who reaches the box on loopback may call everything.");
    const select = $("new-key-priority");
    if (select.options.length === 1) {
      for (const name of Object.keys((status.queue || {}).queued_by_class || {})) select.appendChild(h("option", name, { value: name }));
    }
    $("keys-error").textContent = "";
  } catch (err) {
    $("keys-error").textContent = err.message;
  }
}

function revokeButton(key) {
  const b = h("button", "Revoke", { type: "button" });
  b.dataset.revoke = key.id;
  b.setAttribute("aria-label", `revoke key ${key.id}${key.name ? ` (${key.name})` : ""}`);
  b.addEventListener("click", async () => {
    if (!confirm(`Revoke key ${key.id}${key.name ? ` (${key.name})` : ""}? Its next request is refused.`)) return;
    try {
      await postJSON(`/api/keys/${encodeURIComponent(key.id)}/revoke`);
    } catch (err) {
      $("keys-error").textContent = err.message;
    }
    await loadKeys();
  });
  return b;
}

async function createKey(e) {
  e.preventDefault();
  const body = { role: $("new-key-role").value };
  for (const [field, id] of [["name", "new-key-name"], ["expires", "new-key-expires"], ["priority", "new-key-priority"]]) {
    if ($(id).value.trim()) body[field] = $(id).value.trim();
  }
  for (const [field, id] of [["rpm", "new-key-rpm"], ["tpm", "new-key-tpm"]]) if ($(id).value !== "") body[field] = Number($(id).value);
  const first = !getKey() && !document.querySelector("#key-table button[data-revoke]");
  if (first && body.role !== "admin") {
    $("keys-error").textContent = "Create an admin key first: the first key makes this box require keys from everyone, this page included.";
    return;
  }
  try {
    const created = await postJSON("/api/keys", body);
    if (first) setKey(created.key); // keys are on from now: this tab goes on with the admin key it just made
    $("new-key-value").textContent = created.key;
    $("new-key-note").textContent = `Key ${created.id} (${created.role}). Send it as "Authorization: Bearer <key>".`;
    $("new-key").hidden = false;
    $("key-create").reset();
    $("keys-error").textContent = "";
  } catch (err) {
    $("keys-error").textContent = err.message;
  }
  await loadKeys();
}

// -- settings -------------------------------------------------------------------------------
export async function loadSettings() {
  try {
    const { config_file, data } = await getJSON("/api/settings");
    $("settings-file").textContent = config_file ?? "none read";
    fillTable($("settings-table").tBodies[0], data.map((s) =>
      [s.name, typeof s.value === "object" ? JSON.stringify(s.value) : String(s.value), s.source, s.environment, s.help]));
    $("settings-error").textContent = "";
  } catch (err) {
    $("settings-error").textContent = err.message;
  }
}

// -- wiring ---------------------------------------------------------------------------------
export function initPages() {
  document.querySelectorAll("button[data-power]").forEach((b) => b.addEventListener("click", () => forcePower(b.dataset.power)));
  $("swap-form").addEventListener("submit", swap);
  $("import-form").addEventListener("submit", importPackage);
  $("verify-models").addEventListener("click", verifyModels);
  $("log-filters").addEventListener("submit", (e) => { e.preventDefault(); logOffset = 0; loadLogs(); });
  $("log-filters").addEventListener("reset", () => setTimeout(() => { logOffset = 0; loadLogs(); }));
  $("logs-older").addEventListener("click", () => { logOffset += PAGE; loadLogs(); });
  $("logs-newer").addEventListener("click", () => { logOffset = Math.max(0, logOffset - PAGE); loadLogs(); });
  $("export-csv").addEventListener("click", () => exportLogs("csv"));
  $("export-jsonl").addEventListener("click", () => exportLogs("jsonl"));
  $("log-detail-close").addEventListener("click", () => { $("log-detail").hidden = true; });
  $("verify-log").addEventListener("click", verifyLog);
  $("key-create").addEventListener("submit", createKey);
  $("copy-new-key").addEventListener("click", async () => {
    const text = $("new-key-value").textContent;
    try { await navigator.clipboard.writeText(text); } catch {
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      document.execCommand("copy");
    }
    $("copy-new-key").textContent = "Copied";
  });
}

export const pages = {
  status: loadStatus,
  models: loadModels,
  logs: () => { loadLogModels(); return loadLogs(); },
  keys: loadKeys,
  settings: loadSettings,
};
