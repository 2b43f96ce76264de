// Everything the pages share: calls to the box's documented REST API, the key for this tab, small DOM helpers.
// Every call goes through api(): JSON bodies with their Content-Type (else 415), the key as a Bearer header;
// the browser adds the Origin that the box checks on POSTs. Nothing here reaches beyond this box.
"use strict";

const KEY = "appliance.api_key";
const listeners = { unauthorized: [] };

export const $ = (id) => document.getElementById(id);

export function getKey() { return sessionStorage.getItem(KEY); }
export function setKey(key) { key ? sessionStorage.setItem(KEY, key) : sessionStorage.removeItem(KEY); }
export function onUnauthorized(fn) { listeners.unauthorized.push(fn); }

/** fetch() of a path on this box, with the key; a 401 asks for a key (unless quiet). */
export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers, credentials: "omit" });
  if (response.status === 401 && !options.quiet) {
    const message = await errorMessage(response.clone());
    listeners.unauthorized.forEach((fn) => fn(message));
  }
  return response;
}

/** GET a JSON document; throws an Error carrying the API's own message and status. */
export async function getJSON(path, options = {}) {
  const response = await api(path, options);
  if (!response.ok) throw apiError(response.status, await errorMessage(response));
  return response.json();
}

export async function postJSON(path, body = {}, options = {}) {
  const response = await api(path, { ...options, method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw apiError(response.status, await errorMessage(response));
  return response.json();
}

function apiError(status, message) {
  const err = new Error(message);
  err.status = status;
  return err;
}

/** The OpenAI-shaped error's message, shown as the API wrote it. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${body.error.message}${body.error.code ? ` (${body.error.code})` : ""}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText || ""}`.trim();
  }
}

/** An element with text content (never HTML) and attributes. */
export function h(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "className") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  return node;
}

/** Rows of a table body from arrays of cell values. */
export function fillTable(tbody, rows, emptyText = "Nothing yet.") {
  const columns = tbody.parentElement.querySelectorAll("thead th").length || 1;
  if (!rows.length) {
    const td = h("td", emptyText, { className: "empty" });
    td.colSpan = columns;
    const tr = h("tr");
    tr.appendChild(td);
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = h("tr");
    for (const value of cells) tr.appendChild(value instanceof Node ? wrap(value) : h("td", value ?? ""));
    return tr;
  }));
}

function wrap(node) {
  const td = h("td");
  td.appendChild(node);
  return td;
}

/** A <dl> from [term, value] pairs. */
export function fillList(dl, pairs) {
  dl.replaceChildren(...pairs.flatMap(([term, value]) => [h("dt", term), h("dd", value ?? "–")]));
}

export const fmt = {
  time: (iso) => (iso ? iso.slice(0, 19).replace("T", " ") : ""),
  num: (v, digits = 0) => (v === null || v === undefined || Number.isNaN(v) ? "" : Number(v).toFixed(digits)),
  bytes: (n) => {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  seconds: (s) => {
    if (s === null || s === undefined) return "";
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
};

/** Save a text as a file the browser downloads (made here, from what the API answered). */
export function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", "", { href: url, download: name });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
