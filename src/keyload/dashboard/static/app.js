// keyload dashboard: polls /api/state (same origin) and fills the page. No other source.
"use strict";

const POLL_MS = 1000;
const fmt = (v) => (v === null || v === undefined) ? "–" :
  (typeof v === "number" ? v.toLocaleString("en-US", {maximumFractionDigits: 1}) : String(v));

function setK(root, key, value) {
  const el = root.querySelector(`[data-k="${key}"]`);
  if (el) el.textContent = fmt(value);
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = fmt(c);
      tr.append(td);
    }
    return tr;
  }));
}

function eta(s) {
  if (s === null) return "–";
  if (s === 0) return "done";
  const m = Math.floor(s / 60);
  return m ? `${m} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`;
}

function chart(svg, series) {
  const ns = "http://www.w3.org/2000/svg";
  const W = 600, H = 160, P = 32;
  svg.replaceChildren();
  const line = (x1, y1, x2, y2) => {
    const l = document.createElementNS(ns, "line");
    for (const [k, v] of Object.entries({x1, y1, x2, y2, stroke: "#444"})) l.setAttribute(k, v);
    svg.append(l);
  };
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor); t.textContent = s; svg.append(t);
  };
  line(P, H - P, W - P, H - P); line(P, P, P, H - P);
  if (!series.length) { text(W / 2, H / 2, "no samples yet", "middle"); return; }
  const tmax = Math.max(...series.map((p) => p.t)) || 1;
  const rmax = Math.max(...series.map((p) => p.rate)) || 1;
  const pl = document.createElementNS(ns, "polyline");
  pl.setAttribute("fill", "none"); pl.setAttribute("stroke", "#1f6feb");
  pl.setAttribute("stroke-width", "2");
  pl.setAttribute("points", series.map((p) =>
    `${(P + (W - 2 * P) * p.t / tmax).toFixed(1)},${(H - P - (H - 2 * P) * p.rate / rmax).toFixed(1)}`).join(" "));
  svg.append(pl);
  text(P, P - 6, `${fmt(rmax)} loads/s`, "start");
  text(W - P, H - P + 14, `${fmt(tmax)} s`, "end");
}

function campaign(c) {
  const list = document.querySelector("#campaigns .list");
  let art = list.querySelector(`[data-campaign="${CSS.escape(c.campaign)}"]`);
  if (!art) {
    art = document.getElementById("campaign").content.firstElementChild.cloneNode(true);
    art.dataset.campaign = c.campaign;
    art.querySelector(".name").textContent = `Campaign ${c.campaign} (set ${c.set_id})`;
    list.append(art);
  }
  const done = c.states.imported + c.states.failed;
  const bar = art.querySelector("progress");
  bar.max = Math.max(c.loads, 1); bar.value = done;
  bar.textContent = `${done} of ${c.loads}`;
  setK(art, "units", c.units); setK(art, "loads", c.loads);
  setK(art, "imported", c.states.imported); setK(art, "failed", c.states.failed);
  setK(art, "remaining", c.remaining); setK(art, "rate", c.rate);
  art.querySelector('[data-k="eta"]').textContent = eta(c.eta_s);
  chart(art.querySelector(".chart"), c.throughput);
  fillRows(art.querySelector(".by-sw tbody"), c.failures_by_sw.map((f) => [f.sw, f.step, f.count]));
  fillRows(art.querySelector(".by-station tbody"), Object.entries(c.failures_by_station));
  fillRows(art.querySelector(".failing tbody"), c.failures.map((f) => [f.sn, f.ref2, f.ref1, f.sw, f.reason]));
}

function render(s) {
  const names = new Set(s.campaigns.map((c) => c.campaign));
  for (const art of document.querySelectorAll("#campaigns [data-campaign]")) {
    if (!names.has(art.dataset.campaign)) art.remove();
  }
  document.querySelector("#campaigns .empty").hidden = s.campaigns.length > 0;
  s.campaigns.forEach(campaign);

  const svc = document.getElementById("service");
  svc.querySelector(".none").hidden = s.service !== null;
  svc.querySelector("dl").hidden = s.service === null;
  if (s.service) {
    for (const k of ["url", "health", "requests_per_s", "refusals_per_s", "error"]) setK(svc, k, s.service[k]);
    const h = svc.querySelector('[data-k="health"]');
    h.className = s.service.health === "ok" ? "good" : "bad";
  }

  const led = document.getElementById("ledger");
  for (const k of ["receipts_verified", "receipts_invalid", "not_checked_without_authority",
                   "reconciled_without_receipt"]) setK(led, k, s.ledger[k]);
  const ws = s.ledger.service;
  led.querySelector(".svc-none").hidden = ws !== null;
  led.querySelector(".by-age").hidden = ws === null;
  if (ws) fillRows(led.querySelector(".by-age tbody"), Object.entries(ws.by_age));

  const a = document.querySelector('#audit [data-k="audit"]');
  a.textContent = s.audit.state === "verified" ? `verified (${fmt(s.audit.records)} records)` :
    s.audit.state === "broken" ? `broken at record ${s.audit.broken_at}` : "no audit log yet";
  a.className = s.audit.state === "broken" ? "bad" : (s.audit.state === "verified" ? "good" : "");
  document.getElementById("updated").textContent =
    `updated ${new Date(s.time * 1000).toISOString().replace(/\.\d+Z$/, "Z")}`;
}

async function poll() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"});
    if (r.ok) render(await r.json());
    else document.getElementById("updated").textContent = `HTTP ${r.status}`;
  } catch (e) {
    document.getElementById("updated").textContent = "dashboard unreachable";
  }
  setTimeout(poll, POLL_MS);
}

poll();
