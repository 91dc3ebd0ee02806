// ensync-kafka dashboard: polls the JSON API of the server that serves this page.
"use strict";

const REFRESH_MS = 3000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
    two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds()) + "." +
    String(d.getMilliseconds()).padStart(3, "0");
}

function span(seconds) {
  const s = Math.abs(seconds);
  const sign = seconds < 0 ? "-" : "";
  if (s < 1) return sign + Math.round(s * 1000) + " ms";
  if (s < 120) return sign + s.toFixed(1) + " s";
  if (s < 7200) return sign + (s / 60).toFixed(1) + " min";
  if (s < 172800) return sign + (s / 3600).toFixed(1) + " h";
  return sign + (s / 86400).toFixed(1) + " d";
}

function fill(id, rows, columns, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  if (!rows.length) {
    const tr = el("tr", undefined, "empty");
    const td = el("td", emptyText);
    td.colSpan = columns.length;
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  for (const row of rows) {
    const tr = el("tr");
    for (const column of columns) {
      const [value, cls] = column(row);
      tr.appendChild(el("td", value, cls));
    }
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

async function get(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function renderStatus(status) {
  fill("tiers", status.tiers, [
    (t) => [t.tier],
    (t) => [(t.held_exact ? "" : "~") + t.held, "num"],
    (t) => [when(t.next_due)],
    (t) => [t.oldest_overdue_s > 0 ? span(t.oldest_overdue_s) : "—", t.oldest_overdue_s > 5 ? "bad" : ""],
    (t) => [t.lag, "num"],
    (t) => [t.covered + "/" + t.partitions + (t.restoring.length ? " (restoring " + t.restoring.join(",") + ")" : ""),
            t.covered < t.partitions ? "bad" : "ok"],
    (t) => [t.workers.join(", ") || "—"],
  ], "no tiers");
  fill("workers", status.workers, [
    (w) => [w.worker_id],
    (w) => [w.url],
    (w) => [w.reachable ? (w.ready ? "ready" : "not ready") : "unreachable", w.reachable && w.ready ? "ok" : "bad"],
    (w) => [Object.entries(w.tiers).map(([t, ps]) => t + ":" + ps.join(",")).join("  ")],
    (w) => [when(w.announced_at)],
  ], "no worker has announced itself on {prefix}.workers");
}

function renderUpcoming(page) {
  const now = Date.now();
  fill("upcoming", page.items, [
    (i) => [when(i.due_at)],
    (i) => [span((i.due_ms - now) / 1000), "num"],
    (i) => [i.defer_id],
    (i) => [i.name],
    (i) => [i.queue],
    (i) => [i.priority, "num p" + i.priority],
    (i) => [i.tier],
    (i) => [i.reason, "wrap"],
  ], "nothing is deferred");
}

function renderAudit(records) {
  fill("audit", records, [
    (a) => [when(a.at)],
    (a) => [a.event],
    (a) => [a.defer_id],
    (a) => [a.tier || "—"],
    (a) => [a.reason, "wrap"],
  ], "no audit records");
}

function renderDead(records) {
  fill("dead", records, [
    (d) => [when(d.dead_at)],
    (d) => [d.defer_id],
    (d) => [d.name],
    (d) => [d.queue],
    (d) => [d.attempt, "num"],
    (d) => [d.error, "wrap bad"],
  ], "no dead letters");
}

async function refresh() {
  const errors = [];
  const jobs = [
    get("/api/v1/status").then(renderStatus),
    get("/api/v1/upcoming?limit=50").then(renderUpcoming),
    get("/api/v1/audit?limit=30").then(renderAudit),
    get("/api/v1/dead?limit=20").then(renderDead),
  ].map((job) => job.catch((err) => errors.push(err.message)));
  await Promise.all(jobs);
  const error = document.getElementById("error");
  error.hidden = errors.length === 0;
  error.textContent = errors.join("; ");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString(undefined, { hour12: false });
  document.body.dataset.loaded = "true";
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

loop();
