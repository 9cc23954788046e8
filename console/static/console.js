// sendscript console: live views over Server-Sent Events and the operator's actions.
// No framework, no build step; every request goes to this console's own API.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function flash(text, bad) {
  const box = $("#flash");
  box.textContent = text;
  box.className = bad ? "bad" : "ok";
}

async function post(url, body) {
  const res = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body || {}),
  });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const detail = data && data.detail;
    const why = typeof detail === "string" ? detail : JSON.stringify(detail || res.statusText);
    throw new Error(`${res.status}: ${why}`);
  }
  return data;
}

// -- one-click actions: <button data-action="/api/..." data-body='{...}'> --------------------
function wireActions() {
  for (const button of $$("button[data-action]")) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const body = button.dataset.body ? JSON.parse(button.dataset.body) : {};
        const out = await post(button.dataset.action, body);
        flash(`done: ${JSON.stringify(out)}`, false);
      } catch (err) {
        flash(err.message, true);
      } finally {
        button.disabled = false;
      }
    });
  }
}

// -- bulk actions on the Tasks page: preview (count + confirmation), then run ------------------
function currentFilter() {
  const filter = {};
  for (const [key, value] of new URLSearchParams(window.location.search)) {
    if (value && key !== "before" && key !== "limit") filter[key] = value;
  }
  return filter;
}

function wireBulk() {
  const preview = $("#bulk-preview");
  if (!preview) return;
  let pending = null;
  const panel = $("#bulk-confirm");
  preview.addEventListener("click", async () => {
    const action = $("#bulk-action").value;
    const filter = currentFilter();
    try {
      const out = await post("/api/bulk/preview", {action, filter});
      pending = {action, filter, confirm: out.confirm};
      $("#bulk-count").textContent = `${action} ${out.count} task(s)?`;
      panel.hidden = false;
    } catch (err) {
      flash(err.message, true);
    }
  });
  $("#bulk-abort").addEventListener("click", () => { panel.hidden = true; pending = null; });
  $("#bulk-run").addEventListener("click", async () => {
    if (!pending) return;
    try {
      const out = await post("/api/bulk", pending);
      flash(`${out.action}: ${out.done} of ${out.confirmed} confirmed task(s) done` +
            (out.skipped ? `, ${out.skipped} skipped` : ""), false);
    } catch (err) {
      flash(err.message, true);
    }
    panel.hidden = true;
    pending = null;
  });
}

// -- pause / resume form on the Overview ------------------------------------------------------
function wirePause() {
  const form = $("#pause-form");
  if (!form) return;
  for (const button of $$("button[data-pause]", form)) {
    button.addEventListener("click", async () => {
      const body = {kind: form.kind.value};
      if (form.name.value) body.name = form.name.value;
      const url = button.dataset.pause === "pause" ? "/api/pauses" : "/api/pauses/resume";
      if (button.dataset.pause === "pause") body.reason = form.reason.value;
      try {
        flash(`${button.dataset.pause}: ${JSON.stringify(await post(url, body))}`, false);
      } catch (err) {
        flash(err.message, true);
      }
    });
  }
}

// -- agents' API tokens on the Agents page: list, add (secret shown once), remove ---------------
function listOf(text) {
  return text.split(/[\s,]+/).filter((x) => x);
}

function shortTime(value) {
  return value ? String(value).replace("T", " ").slice(0, 19) : "";
}

function scopeText(t) {
  const parts = t.prefixes.map((p) => `${p}*`).concat(t.groups.map((g) => `group:${g}`));
  return parts.length ? parts.join(", ") : "all devices";
}

function cell(row, text, tag = "td") {
  const td = document.createElement(tag);
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function drawTokens(tokens) {
  const body = $("#token-table tbody");
  body.replaceChildren();
  for (const t of tokens) {
    const row = document.createElement("tr");
    row.dataset.token = t.id;
    row.dataset.name = t.name;
    cell(row, t.name);
    const id = document.createElement("code");
    id.textContent = t.id;
    cell(row, "").appendChild(id);
    cell(row, scopeText(t));
    cell(row, shortTime(t.created_at));
    cell(row, shortTime(t.last_used) || "—");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "act danger token-remove";
    button.dataset.token = t.id;
    button.textContent = "Remove";
    cell(row, "").appendChild(button);
    body.appendChild(row);
  }
  if (!tokens.length) {
    const row = document.createElement("tr");
    row.className = "none";
    cell(row, "none").colSpan = 6;
    body.appendChild(row);
  }
}

async function reloadTokens() {
  const res = await fetch("/api/agent-tokens", {credentials: "same-origin"});
  if (!res.ok) throw new Error(`${res.status}: could not list the agent tokens`);
  drawTokens(await res.json());
}

function wireTokens() {
  const form = $("#token-form");
  if (!form) return;
  const made = $("#token-made");
  const confirm = $("#token-confirm");
  let pending = null;  // {id, name}: the token Confirm removes

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {name: form.name.value.trim(), prefixes: listOf(form.prefixes.value),
                  groups: listOf(form.groups.value)};
    $("#token-add").disabled = true;
    try {
      const out = await post("/api/agent-tokens", body);
      $("#token-made-name").textContent = out.name;
      $("#token-secret").textContent = out.token;
      made.hidden = false;
      form.reset();
      flash(`agent token ${out.name} made: copy it now, it is shown once`, false);
      await reloadTokens();
    } catch (err) {
      flash(err.message, true);
    } finally {
      $("#token-add").disabled = false;
    }
  });
  // The secret leaves the page once its holder says it is copied.
  $("#token-done").addEventListener("click", () => {
    $("#token-secret").textContent = "";
    made.hidden = true;
  });

  // Remove asks first (its agents stop); the buttons are redrawn, so listen on the table.
  $("#token-table").addEventListener("click", (ev) => {
    const button = ev.target.closest("button.token-remove");
    if (!button) return;
    const row = button.closest("tr");
    pending = {id: button.dataset.token, name: row.dataset.name};
    $("#token-confirm-text").textContent =
      `Remove agent token ${pending.name} (${pending.id})? Its agents are refused ` +
      "within a second and asked to stop.";
    confirm.hidden = false;
  });
  $("#token-remove-abort").addEventListener("click", () => { confirm.hidden = true; pending = null; });
  $("#token-remove-run").addEventListener("click", async () => {
    if (!pending) return;
    const {id, name} = pending;
    confirm.hidden = true;
    pending = null;
    try {
      // by its short id: a same-named token elsewhere in the list stays
      await post(`/api/agent-tokens/${encodeURIComponent(id)}/remove`);
      flash(`agent token ${name} (${id}) removed`, false);
      await reloadTokens();
    } catch (err) {
      flash(err.message, true);
    }
  });
}

// -- live overview ----------------------------------------------------------------------------
function pick(obj, path) {
  return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
}

function render(snap) {
  for (const cell of $$("[data-k]")) {
    const value = pick(snap, cell.dataset.k);
    if (cell.dataset.fmt === "keys") {
      const names = Object.keys(value || {});
      cell.textContent = names.length ? names.join(", ") : "none";
    } else if (cell.dataset.fmt === "limits") {
      const shown = (value || []).map((l) => l.shown);
      cell.textContent = shown.length ? shown.join("; ") : "none";
    } else if (cell.dataset.fmt === "backpressure") {
      const parts = (value || []).filter((m) => m.backpressure)
        .map((m) => `${m.master_id}: ${m.backpressure.state}`);
      cell.textContent = parts.length ? parts.join(" ") : "—";
    } else if (cell.dataset.k.startsWith("tasks.")) {
      cell.textContent = value == null ? 0 : value;
    } else {
      cell.textContent = value == null ? "–" : value;
    }
  }
  const body = $("#incidents tbody");
  if (body) {
    body.replaceChildren();
    for (const i of snap.incidents || []) {
      const row = document.createElement("tr");
      for (const v of [i.incident, i.key, i.on ? "on" : "ended", i.by]) {
        const td = document.createElement("td");
        td.textContent = v;
        row.appendChild(td);
      }
      body.appendChild(row);
    }
    if (!body.children.length) {
      const row = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 4;
      td.textContent = "none";
      row.appendChild(td);
      body.appendChild(row);
    }
  }
}

function drawChart(points) {
  const svg = $("#chart");
  if (!svg) return;
  const w = 600, h = 160;
  const now = points.length ? points[points.length - 1][0] : Date.now() / 1000;
  // The last hour once an hour is known; until then the span seen so far (at least 1 min).
  const span = Math.min(3600, Math.max(60, points.length ? now - points[0][0] : 60));
  const max = Math.max(1, ...points.map((p) => Math.max(p[1], p[2])));
  const line = (i) => points
    .map((p) => `${(w - ((now - p[0]) / span) * w).toFixed(1)},${(h - (p[i] / max) * (h - 8)).toFixed(1)}`)
    .join(" ");
  $("#chart-sends").setAttribute("points", line(1));
  $("#chart-results").setAttribute("points", line(2));
  const minutes = span >= 120 ? `${Math.round(span / 60)} min` : `${Math.round(span)} s`;
  $("#chart-max").textContent = `last ${minutes}, scale 0–${max.toFixed(1)}/s`;
}

function liveOverview() {
  if (!$("#overview")) return;
  let points = [];
  const source = new EventSource("/api/stream/overview");
  source.addEventListener("series", (ev) => { points = JSON.parse(ev.data); drawChart(points); });
  source.addEventListener("overview", (ev) => {
    const snap = JSON.parse(ev.data);
    render(snap);
    if (snap.rate) {
      points.push(snap.rate);
      const cut = snap.rate[0] - 3600;
      while (points.length && points[0][0] < cut) points.shift();
    }
    drawChart(points);
    $("#live").className = "live-dot on";
  });
  source.onerror = () => { $("#live").className = "live-dot off"; };
}

// -- live task --------------------------------------------------------------------------------
function liveTask() {
  const box = $("#task");
  if (!box) return;
  const source = new EventSource(`/api/stream/tasks/${encodeURIComponent(box.dataset.taskId)}`);
  source.addEventListener("task", (ev) => {
    const t = JSON.parse(ev.data);
    if (t.gone) { flash("this task is gone (retention)", true); return; }
    const status = $("#task-status");
    status.textContent = t.status;
    status.className = `st st-${t.status}`;
    $("#task-attempt").textContent = t.attempt;
    $("#task-error").textContent = t.last_error || "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.canAct !== "yes") {
    for (const b of $$("button.act")) b.title = "viewers cannot act";
  }
  wireActions();
  wireBulk();
  wirePause();
  wireTokens();
  liveOverview();
  liveTask();
});
