// The annotator page. All text from the server goes into the page through textContent /
// value, never an HTML-parsing API: a response may contain markup (even <script>) and must show as text.
"use strict";

const $ = (id) => document.getElementById(id);
let token = null;
let item = null;
let renewTimer = null;
let pollTimer = null;
let renewEveryMs = 30000;

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const init = { method: body === undefined ? "GET" : "POST",
                 headers: { "Authorization": "Bearer " + token } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CRL-Request"] = "1";  // the server refuses state changes without it (CSRF)
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(data.error || ("HTTP " + res.status));
    err.status = res.status;
    throw err;
  }
  return data;
}

function showProgress(p) {
  if (p) $("progress").textContent = "done by you: " + p.done_by_you + " · done: " + p.done + " · open: " + p.open;
}

// Word-level diff (longest common subsequence over words and whitespace runs).
function tokens(s) { return s.match(/\s+|[^\s]+/g) || []; }
function diff(a, b) {
  const x = tokens(a), y = tokens(b), n = x.length, m = y.length;
  if (n * m > 4000000) return [["del", a], ["ins", b]];
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--)
    for (let j = m - 1; j >= 0; j--)
      L[i][j] = x[i] === y[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  const push = (kind, t) => {
    if (out.length && out[out.length - 1][0] === kind) out[out.length - 1][1] += t; else out.push([kind, t]);
  };
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (x[i] === y[j]) { push("same", x[i]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) push("del", x[i++]);
    else push("ins", y[j++]);
  }
  while (i < n) push("del", x[i++]);
  while (j < m) push("ins", y[j++]);
  return out;
}

function renderDiff() {
  const box = $("diff");
  box.replaceChildren();
  if (!item) return;
  for (const [kind, text] of diff(item.response, $("edit").value)) {
    const span = document.createElement("span");
    if (kind !== "same") span.className = kind;
    span.textContent = text;
    box.appendChild(span);
  }
  if ($("edit").value === item.response) box.appendChild(document.createTextNode("  (unchanged)"));
}

// A chat prompt is the whole conversation (system, user and assistant turns, in order), not
// only its last user message: the response answers all of it. Each turn is a list item whose
// role label and text are set with textContent (the role goes into a data attribute for CSS).
function showPrompt(it) {
  const turns = Array.isArray(it.messages) ? it.messages : null;
  $("prompt-heading").textContent = turns ? "Conversation" : "Prompt";
  $("prompt").hidden = !!turns;
  $("prompt").textContent = turns ? "" : it.prompt;
  const list = $("conversation");
  list.replaceChildren();
  list.hidden = !turns;
  for (const turn of turns || []) {
    const li = document.createElement("li");
    li.dataset.role = String(turn.role);
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = String(turn.role);
    const text = document.createElement("pre");
    text.textContent = String(turn.content);
    li.append(role, text);
    list.appendChild(li);
  }
}

function show(next) {
  item = next;
  document.body.dataset.item = item ? item.item_id : "";  // which item is on screen (for tests, tools)
  clearInterval(renewTimer);
  clearTimeout(pollTimer);
  $("work").hidden = !item;
  $("empty").hidden = !!item;
  if (!item) {
    pollTimer = setTimeout(loadNext, 3000);
    return;
  }
  $("task").textContent = item.task ? "task: " + item.task : "";
  showPrompt(item);
  $("edit").value = item.response;
  renderDiff();
  $("edit").focus();
  // Keep the lease while the page is open; a closed tab lets it expire and the item moves on.
  renewTimer = setInterval(() => {
    if (item) api("/api/renew", { item_id: item.item_id }).catch((e) => status("lease lost: " + e.message, true));
  }, renewEveryMs);
}

async function loadNext() {
  try {
    const data = await api("/api/next", {});
    showProgress(data.progress);
    show(data.item);
  } catch (e) {
    status(e.message, true);
    if (e.status === 401) signOut();
    // The app may be moving to another process (Ray modes): a page without an item keeps asking.
    else if (!item) show(null);
  }
}

async function send(kind) {
  if (!item) return;
  const current = item;
  try {
    let data;
    if (kind === "skip") data = await api("/api/skip", { item_id: current.item_id });
    else data = await api("/api/submit", { item_id: current.item_id,
                                            corrected_text: kind === "asis" ? current.response : $("edit").value });
    showProgress(data.progress);
    status(kind === "skip" ? "skipped" : "saved (edit distance " + data.edit_distance + ")", false);
    await loadNext();
  } catch (e) {
    status("not saved: " + e.message, true);
    if (e.status === 409) await loadNext();
  }
}

function signOut() {
  token = null;
  sessionStorage.removeItem("crl-token");
  $("work").hidden = true;
  $("login").hidden = false;
}

async function signIn(t) {
  token = t;
  try {
    const me = await api("/api/me");
    sessionStorage.setItem("crl-token", t);
    renewEveryMs = Math.max(1000, Math.min(30000, me.lease_timeout_s * 1000 / 3));
    $("login").hidden = true;
    $("who").textContent = "annotator: " + me.annotator;
    showProgress(me.progress);
    await loadNext();
  } catch (e) {
    status("sign-in failed: " + e.message, true);
    signOut();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("edit").addEventListener("input", renderDiff);
  $("submit").addEventListener("click", () => send("submit"));
  $("asis").addEventListener("click", () => send("asis"));
  $("skip").addEventListener("click", () => send("skip"));
  $("reset").addEventListener("click", () => { if (item) { $("edit").value = item.response; renderDiff(); } });
  $("login-btn").addEventListener("click", () => signIn($("token").value.trim()));
  document.addEventListener("keydown", (ev) => {
    if (!item) return;
    if (ev.ctrlKey && ev.key === "Enter") { ev.preventDefault(); send("submit"); }
    else if (ev.altKey && (ev.key === "a" || ev.key === "A")) { ev.preventDefault(); send("asis"); }
    else if (ev.altKey && (ev.key === "s" || ev.key === "S")) { ev.preventDefault(); send("skip"); }
    else if (ev.key === "Escape") { $("edit").value = item.response; renderDiff(); }
  });
  // The token comes in the URL fragment (never sent to the server) and is then removed from it.
  const m = location.hash.match(/token=([^&]+)/);
  if (m) history.replaceState(null, "", location.pathname);
  const t = m ? decodeURIComponent(m[1]) : sessionStorage.getItem("crl-token");
  if (t) signIn(t); else signOut();
});
