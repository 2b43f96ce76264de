// The appliance's web UI: chat over the same OpenAI-compatible API any client uses,
// plus the request log and the power state. Plain JavaScript, no network beyond this box.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];
let controller = null;

// -- API key ----------------------------------------------------------------
// Where the box requires keys, the UI asks for one when the API answers 401 and keeps it for this
// tab only (sessionStorage). Every call goes through api(): JSON bodies with their Content-Type, and
// the key as a Bearer header; the browser adds the Origin the box checks on POSTs.
const KEY = "appliance.api_key";

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) askForKey(await errorMessage(response.clone()));
  return response;
}

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  refreshPower();
});

// -- tabs -------------------------------------------------------------------
document.querySelectorAll("button.tab").forEach((tab) => {
  tab.addEventListener("click", () => {
    document.querySelectorAll("button.tab, .panel").forEach((el) => el.classList.remove("active"));
    tab.classList.add("active");
    $(tab.dataset.tab).classList.add("active");
    if (tab.dataset.tab === "logs") loadLogs();
    if (tab.dataset.tab === "power-panel") loadStatus();
  });
});

// -- chat -------------------------------------------------------------------
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  return div;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Yields the JSON payload of every "data:" event of a server-sent-event stream.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  $("error").textContent = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  let finish = null;
  let usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      body: JSON.stringify({
        messages: conversation,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices) {
        reply += choice.delta.content || "";
        finish = choice.finish_reason || finish;
      }
      bubble.textContent = reply;
    }
    conversation.push({ role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else {
      $("error").textContent = err.message;
      conversation.pop();
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.finish = finish || "";
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = [finish && `finish: ${finish}`, usage && `${usage.completion_tokens} tokens`].filter(Boolean).join(" · ");
    bubble.appendChild(meta);
    setBusy(false);
    controller = null;
    refreshPower();
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  conversation.length = 0;
  $("messages").replaceChildren();
});

// -- logs -------------------------------------------------------------------
async function loadLogs() {
  const response = await api("/api/logs?limit=50");
  if (!response.ok) return;
  const { data } = await response.json();
  $("log-rows").replaceChildren(
    ...data.map((r) => {
      const tr = document.createElement("tr");
      const cells = [r.id, r.started.slice(0, 19).replace("T", " "), r.endpoint, r.status, r.prompt_tokens,
        r.completion_tokens, r.ttft_ms && r.ttft_ms.toFixed(0), r.tokens_per_s && r.tokens_per_s.toFixed(1), r.error];
      for (const value of cells) {
        const td = document.createElement("td");
        td.textContent = value ?? "";
        tr.appendChild(td);
      }
      return tr;
    }),
  );
}
$("refresh-logs").addEventListener("click", loadLogs);

// -- power ------------------------------------------------------------------
function showPower(status) {
  const badge = $("power");
  badge.textContent = status.state.replace("_", " ");
  badge.className = `badge ${status.state}`;
  badge.dataset.state = status.state;
}

async function loadStatus() {
  const response = await api("/api/status");
  if (!response.ok) return;
  const status = await response.json();
  showPower(status);
  $("status-detail").textContent = JSON.stringify(status, null, 2);
}

async function refreshPower() {
  try {
    const response = await api("/api/status");
    if (response.ok) showPower(await response.json());
  } catch {
    $("power").textContent = "offline";
  }
}

document.querySelectorAll("button[data-power]").forEach((button) => {
  button.addEventListener("click", async () => {
    const response = await api("/api/power", {
      method: "POST",
      body: JSON.stringify({ state: button.dataset.power }),
    });
    if (response.ok) loadStatus();
  });
});

refreshPower();
setInterval(refreshPower, 10000);
