// The appliance's web UI: pages over the same documented REST API any client uses. Plain JavaScript modules,
// no build step, nothing fetched beyond this box. This file: sign-in, which pages the key's role may open,
// the page router, the readiness banner and the power badge.
"use strict";

import { $, api, errorMessage, getKey, onUnauthorized, setKey } from "./api.js";
import { initChat, loadChatModels } from "./chat.js";
import { initPages, loadStatus, pages, role, showPower } from "./pages.js";

const can = { chat: false, admin: false, logs: false, models: false };
let signedIn = false;

// -- sign-in and roles ----------------------------------------------------------------------
// The key's role is read from what the API lets it do (the same rules as auth.py's): a user key may call
// /v1/*, an auditor key /api/logs, an admin key both and the rest of /api/*. No private endpoint is needed.
async function allowed(path) {
  const response = await api(path, { quiet: true });
  return { ok: response.ok, status: response.status };
}

async function probeRoles() {
  const [chat, admin, logs] = await Promise.all([allowed("/v1/models"), allowed("/api/status"), allowed("/api/logs?limit=1")]);
  if ([chat, admin, logs].every((r) => r.status === 401)) {
    const hadKey = Boolean(getKey());
    setKey(null);
    askForKey(hadKey ? "That key was refused (wrong, expired or revoked). Sign in with another." :
      "This box needs an API key.");
    return false;
  }
  can.chat = chat.ok;
  can.admin = admin.ok;
  can.logs = logs.ok;
  can.models = chat.ok || admin.ok;
  role.admin = can.admin;
  role.logs = can.logs;
  document.querySelectorAll("[data-needs]").forEach((el) => { el.hidden = !can[el.dataset.needs]; });
  document.querySelectorAll(".admin-only").forEach((el) => { el.hidden = !can.admin; });
  const who = can.admin ? "admin" : can.chat ? "user" : can.logs ? "auditor" : "no access";
  $("whoami").textContent = getKey() ? `signed in: ${who}` : "no key needed here";
  $("whoami").dataset.role = who;
  $("sign-out").hidden = !getKey();
  $("key-form").hidden = true;
  $("main").hidden = false;
  signedIn = true;
  return true;
}

function askForKey(message) {
  signedIn = false;
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("main").hidden = true;
  $("api-key").focus();
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  $("api-key").value = "";
  if (!key) return;
  setKey(key);
  if (await probeRoles()) start();
});

$("sign-out").addEventListener("click", () => {
  setKey(null);
  location.hash = "";
  location.reload();
});

onUnauthorized((message) => askForKey(message));

// -- pages ----------------------------------------------------------------------------------
const PAGE_NEEDS = { chat: "chat", status: "admin", models: "models", logs: "logs", keys: "admin", settings: "admin" };

function route() {
  if (!signedIn) return;
  let page = location.hash.slice(1);
  if (!(page in PAGE_NEEDS)) page = Object.keys(PAGE_NEEDS).find((p) => can[PAGE_NEEDS[p]]) || "chat";
  document.querySelectorAll(".page").forEach((section) => { section.hidden = section.id !== `page-${page}`; });
  document.querySelectorAll("nav .tab").forEach((tab) => {
    if (tab.dataset.page === page) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  });
  const section = $(`page-${page}`);
  let refusal = section.querySelector(".refused");
  if (!can[PAGE_NEEDS[page]]) {
    if (!refusal) {
      refusal = document.createElement("p");
      refusal.className = "refused";
      refusal.setAttribute("role", "alert");
      section.prepend(refusal);
    }
    refusal.textContent = "This page needs a key with another role; sign in with one that has it.";
    section.querySelectorAll(":scope > :not(.refused):not(h2)").forEach((el) => { el.hidden = true; });
    return;
  }
  if (refusal) refusal.remove();
  if (page === "chat") loadChatModels();
  else pages[page]();
}

window.addEventListener("hashchange", route);

// -- banner and power badge -----------------------------------------------------------------
async function refresh() {
  try {
    const ready = await fetch("/readyz", { credentials: "omit" });
    const banner = $("banner");
    if (ready.ok) banner.hidden = true;
    else {
      banner.textContent = `Not ready: ${await errorMessage(ready)}`;
      banner.hidden = false;
    }
    if (ready.ok) {
      const body = await ready.json();
      if (!can.admin) showPower({ state: body.power_state });
    }
    if (can.admin) {
      if (location.hash === "#status") await loadStatus();
      else {
        const response = await api("/api/status", { quiet: true });
        if (response.ok) showPower(await response.json());
      }
    }
  } catch {
    $("banner").textContent = "The box does not answer: it may be restarting or off the network.";
    $("banner").hidden = false;
    $("power").textContent = "offline";
  }
}

let started = false;
function start() {
  route();
  refresh();
  if (!started) {
    started = true;
    setInterval(refresh, 5000);
  }
}

initChat();
initPages();
if (await probeRoles()) start();
