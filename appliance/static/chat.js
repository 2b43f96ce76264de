// The chat page: conversations kept in this browser (localStorage), answers streamed from /v1/chat/completions
// and rendered as Markdown by markdown.js (text nodes only), Stop aborting the fetch (the box then cancels).
"use strict";

import { $, api, download, errorMessage, getJSON, h } from "./api.js";
import { renderMarkdown } from "./markdown.js";

const STORE = "appliance.conversations";
const CURRENT = "appliance.conversation";
const ROLES = new Set(["system", "user", "assistant"]);
let conversations = [];
let current = null;
let controller = null;
let models = [];

// -- the store ------------------------------------------------------------------------------
function load() {
  try {
    conversations = JSON.parse(localStorage.getItem(STORE) || "[]").filter(valid);
  } catch {
    conversations = [];
  }
  current = conversations.find((c) => c.id === localStorage.getItem(CURRENT)) || null;
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  if (current) localStorage.setItem(CURRENT, current.id);
}

function valid(c) {
  return c && typeof c.id === "string" && typeof c.title === "string" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && ROLES.has(m.role) && typeof m.content === "string");
}

function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

function startConversation() {
  current = { id: newId(), title: "New chat", created: new Date().toISOString(), messages: [] };
  conversations.unshift(current);
  save();
  showConversations();
  showMessages();
}

/** Conversations from an exported file: a list, or {conversations: [...]}; each checked, ids kept unique. */
export function importConversations(text) {
  const parsed = JSON.parse(text);
  const list = Array.isArray(parsed) ? parsed : parsed && parsed.conversations;
  if (!Array.isArray(list)) throw new Error("not a conversations file: expected a list of conversations");
  const good = list.filter(valid).map((c) => ({
    id: conversations.some((o) => o.id === c.id) ? newId() : c.id,
    title: c.title.slice(0, 200), created: c.created || new Date().toISOString(), model: c.model,
    messages: c.messages.map((m) => ({ role: m.role, content: m.content, stats: m.stats })),
  }));
  if (!good.length) throw new Error("no valid conversation in the file (each needs id, title and messages)");
  conversations.unshift(...good);
  current = good[0];
  save();
  showConversations();
  showMessages();
  return good.length;
}

// -- the view -------------------------------------------------------------------------------
function showConversations() {
  $("conversation-list").replaceChildren(...conversations.map((c) => {
    const b = h("button", c.title, { type: "button", className: "conversation" });
    b.dataset.id = c.id;
    if (current && c.id === current.id) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => {
      if (controller) return;
      current = c;
      save();
      showConversations();
      showMessages();
    });
    const li = h("li");
    li.appendChild(b);
    return li;
  }));
}

function showMessages() {
  const shown = current ? current.messages.filter((m) => m.role !== "system") : [];
  $("messages").replaceChildren(...shown.map((m) => messageNode(m)));
  $("empty-chat").hidden = shown.length > 0;
  if (current && current.model && models.includes(current.model)) $("chat-model").value = current.model;
  $("system-prompt").value = current ? current.system || "" : "";
}

function messageNode(message) {
  const div = h("div", null, { className: `message ${message.role}` });
  const body = h("div", null, { className: "body" });
  div.appendChild(body);
  if (message.role === "assistant") {
    body.appendChild(renderMarkdown(message.content));
    finishNode(div, message);
  } else body.textContent = message.content;
  return div;
}

/** The footer of an answer: finish, tokens, TTFT, speed and a copy button. */
function finishNode(div, message) {
  const stats = message.stats || {};
  div.dataset.finish = stats.finish || "";
  const meta = h("div", null, { className: "meta" });
  const parts = [
    stats.finish && `finish: ${stats.finish}`,
    stats.prompt_tokens !== undefined && `prompt ${stats.prompt_tokens} tokens`,
    stats.completion_tokens !== undefined && `answer ${stats.completion_tokens} tokens`,
    stats.ttft_ms !== undefined && `TTFT ${Math.round(stats.ttft_ms)} ms`,
    stats.tokens_per_s && `${stats.tokens_per_s.toFixed(1)} tok/s`,
    stats.model,
  ].filter(Boolean);
  meta.appendChild(h("span", parts.join(" · "), { className: "stats" }));
  for (const [name, value] of Object.entries(stats)) if (typeof value !== "object") meta.dataset[camel(name)] = value;
  const copy = h("button", "Copy", { type: "button", className: "copy" });
  copy.setAttribute("aria-label", "copy this answer");
  copy.addEventListener("click", () => copyText(message.content, copy));
  meta.appendChild(copy);
  div.appendChild(meta);
}

function camel(name) { return name.replace(/_(\w)/g, (_, c) => c.toUpperCase()); }

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Plain http on a LAN address is not a secure context: no clipboard API, so select-and-copy instead.
    const area = h("textarea", null, { value: text });
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// -- sending --------------------------------------------------------------------------------
/** The request's sampling options: only those the user set, so the model's own defaults apply to the rest. */
function samplingOptions() {
  const options = {};
  const temperature = $("temperature").value;
  if (temperature !== "") options.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") options.max_tokens = Number(maxTokens);
  document.querySelectorAll("[data-option]").forEach((input) => {
    const value = input.value.trim();
    if (value === "") return;
    const name = input.dataset.option;
    options[name] = name === "stop" ? value.split("\n").filter(Boolean) : Number(value);
  });
  return options;
}

// Yields the JSON payload of every "data:" event of a server-sent-event stream.
export async function* sseEvents(response) {
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
  if (!current) startConversation();
  $("error").textContent = "";
  const model = $("chat-model").value || undefined;
  current.model = model;
  current.system = $("system-prompt").value;
  const history = current.messages.map(({ role, content }) => ({ role, content }));
  const messages = (current.system.trim() ? [{ role: "system", content: current.system }] : []).concat(
    history, [{ role: "user", content: text }]);
  current.messages.push({ role: "user", content: text });
  if (current.title === "New chat") current.title = text.slice(0, 60);
  save();
  showConversations();
  $("messages").appendChild(messageNode({ role: "user", content: text }));
  $("empty-chat").hidden = true;
  const div = h("div", null, { className: "message assistant streaming" });
  const body = h("div", null, { className: "body" });
  div.appendChild(body);
  $("messages").appendChild(div);
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let reply = "", finish = null, usage = null, first = null, pending = false;
  const draw = () => { pending = false; body.replaceChildren(renderMarkdown(reply)); };
  const option = $("chat-model").selectedOptions[0];
  if (option && option.dataset.loaded === "false") {
    body.appendChild(h("span", `Loading ${model} on the box first…`, { className: "muted loading" }));
  }
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...samplingOptions() }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece && first === null) first = performance.now();
        reply += piece;
        finish = choice.finish_reason || finish;
      }
      if (!pending) { pending = true; requestAnimationFrame(draw); }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else {
      finish = "error";
      $("error").textContent = err.message;
    }
  } finally {
    const ended = performance.now();
    draw();
    div.classList.remove("streaming");
    const stats = { finish, model: model || "" };
    if (usage) Object.assign(stats, { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens });
    if (first !== null) stats.ttft_ms = first - started;
    if (usage && first !== null && ended > first && usage.completion_tokens > 1) {
      stats.tokens_per_s = (usage.completion_tokens - 1) / ((ended - first) / 1000);
    }
    const message = { role: "assistant", content: reply, stats };
    if (reply || finish !== "error") current.messages.push(message);
    else current.messages.pop(); // nothing came back: the question can be asked again
    save();
    finishNode(div, message);
    setBusy(false);
    controller = null;
    loadChatModels(); // a model this answer loaded is labelled loaded now
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -- models ---------------------------------------------------------------------------------
export async function loadChatModels() {
  const select = $("chat-model");
  try {
    const { data } = await getJSON("/v1/models");
    const chat = data.filter((m) => (m.appliance || {}).kind !== "embedding");
    models = chat.map((m) => m.id);
    const previous = select.value || (current && current.model);
    select.replaceChildren(...chat.map((m) => {
      const info = m.appliance || {};
      const option = h("option", `${m.id}${info.default ? " (default)" : ""}${info.loaded ? "" : " · not loaded"}`,
        { value: m.id });
      option.dataset.defaults = JSON.stringify(info.sampling_defaults || {});
      option.dataset.loaded = Boolean(info.loaded);
      return option;
    }));
    const preferred = models.includes(previous) ? previous : (chat.find((m) => (m.appliance || {}).default) || chat[0] || {}).id;
    if (preferred) select.value = preferred;
    showDefaults();
  } catch (err) {
    $("error").textContent = err.message;
  }
}

function showDefaults() {
  const option = $("chat-model").selectedOptions[0];
  const defaults = option ? JSON.parse(option.dataset.defaults || "{}") : {};
  const text = Object.entries(defaults).map(([k, v]) => `${k} ${v}`).join(", ");
  $("sampling-defaults").textContent = text ? `Left empty, an option takes the model's default: ${text}.` : "";
  $("temperature").placeholder = defaults.temperature !== undefined ? `${defaults.temperature}` : "model's";
}

// -- wiring ---------------------------------------------------------------------------------
export function initChat() {
  load();
  showConversations();
  showMessages();
  $("chat-model").addEventListener("change", showDefaults);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", () => { if (!controller) startConversation(); });
  $("rename-chat").addEventListener("click", () => {
    if (!current) return;
    const title = prompt("Name of this conversation", current.title);
    if (title && title.trim()) {
      current.title = title.trim().slice(0, 200);
      save();
      showConversations();
    }
  });
  $("delete-chat").addEventListener("click", () => {
    if (!current || controller || !confirm(`Delete the conversation "${current.title}"?`)) return;
    conversations = conversations.filter((c) => c !== current);
    current = conversations[0] || null;
    save();
    if (!current) localStorage.removeItem(CURRENT);
    showConversations();
    showMessages();
  });
  $("export-chats").addEventListener("click", () => {
    const stamp = new Date().toISOString().slice(0, 19).replace(/:/g, "");
    download(`conversations-${stamp}.json`, JSON.stringify({ conversations }, null, 2), "application/json");
  });
  $("import-chats").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      importConversations(await file.text());
      $("error").textContent = "";
    } catch (err) {
      $("error").textContent = `Import failed: ${err.message}`;
    }
  });
}
