"""The live status page served at ``/``: one self-contained HTML file (no script or font from elsewhere: the page
must work on a machine without the internet). It polls ``/api/state`` every second and draws

* the tree: supervisor → dp groups → ranks, each rank a card coloured by state, with pid, RSS, CPU, heartbeat age
  and the call in progress (every card carries ``data-rank`` / ``data-pid`` / ``data-state`` for tests and scripts);
* restart history on a time axis: one lane per group, a mark per exit, restart and READY;
* RPC latency over time: p50 and p99 per second.
"""
from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rankvisor</title>
<style>
 body{font:14px system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
 h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:18px 0 6px}
 .meta{color:#555} .badge{padding:1px 8px;border-radius:9px;color:#fff;font-weight:600}
 .ok{background:#2e7d32} .bad{background:#c62828}
 .group{border:1px solid #bbb;border-radius:6px;padding:8px;margin:8px 0;background:#fff}
 .group h3{margin:0 0 6px;font-size:14px}
 .ranks{display:flex;flex-wrap:wrap;gap:6px}
 .rank{border-radius:5px;padding:6px 8px;min-width:150px;color:#fff;font-size:12px;line-height:1.4}
 .s-running,.s-ready{background:#2e7d32} .s-starting{background:#f9a825;color:#222}
 .s-stopping{background:#6d4c41} .s-stopped{background:#757575} .s-failed{background:#c62828}
 svg{background:#fff;border:1px solid #ddd} .axis{stroke:#999} text{font-size:11px;fill:#444}
 ul.events{font:12px monospace;max-height:160px;overflow:auto;background:#fff;border:1px solid #ddd;padding:6px 20px}
</style></head>
<body>
<h1>rankvisor <span id="badge" class="badge bad">…</span></h1>
<div class="meta" id="meta">loading…</div>
<h2>Tree</h2><div id="tree"></div>
<h2>Restart history</h2><svg id="history" width="900" height="120"></svg>
<ul class="events" id="events"></ul>
<h2>RPC latency (p50, p99 per second)</h2><svg id="latency" width="900" height="160"></svg>
<script>
const NS = "http://www.w3.org/2000/svg";
const COLORS = {exited: "#c62828", hung: "#8e24aa", restarting: "#ef6c00", recycled: "#0277bd",
                rolling_restart: "#00838f", group_ready: "#2e7d32", gave_up: "#000", forced_stop: "#000"};
function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v, unit) {
  return v === null || v === undefined ? "-" : (typeof v === "number" ? v.toFixed(1) : v) + (unit || "");
}
function drawTree(st) {
  const tree = document.getElementById("tree"); tree.replaceChildren();
  for (const g of st.groups) {
    const box = el("div", {class: "group", id: "group-" + g.group, "data-serving": g.serving});
    const why = g.serving ? "serving" : (g.closed || g.state);
    box.appendChild(el("h3", {}, `group ${g.group} · ${g.state} · ${why} · restarts ${g.restarts}`));
    const ranks = el("div", {class: "ranks"});
    for (const w of st.workers.filter(w => w.group === g.group)) {
      const card = el("div", {class: "rank s-" + w.state, id: "rank-" + w.rank, "data-rank": w.rank,
                              "data-pid": w.pid, "data-state": w.state, "data-restarts": w.restarts});
      const call = w.call ? `${w.call} ${w.call_s.toFixed(1)} s` : "idle";  // text only: a method name is user data
      const gpu = w.gpu_mib ? ` · gpu ${fmt(w.gpu_mib, " MiB")}` : "";
      card.appendChild(el("b", {}, `rank ${w.rank} `));
      card.appendChild(document.createTextNode(w.name));
      const lines = [`pid ${w.pid} · ${w.state}`, `rss ${fmt(w.rss_mib, " MiB")} · cpu ${fmt(w.cpu_pct, "%")}${gpu}`,
                     `beat ${fmt(w.heartbeat_age_s, " s")} · ${call}`];
      for (const line of lines) card.appendChild(el("div", {}, line));
      ranks.appendChild(card);
    }
    box.appendChild(ranks); tree.appendChild(box);
  }
}
function axis(svg, x0, x1, y, t0, t1) {
  svg.appendChild(el("svg:line", {x1: x0, x2: x1, y1: y, y2: y, class: "axis"}));
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4, t = new Date((t0 + (t1 - t0) * i / 4) * 1000);
    svg.appendChild(el("svg:text", {x: x - 20, y: y + 14}, t.toLocaleTimeString()));
  }
}
function drawHistory(st, events) {
  const svg = document.getElementById("history"); svg.replaceChildren();
  const W = 900, left = 70, right = W - 10, now = st.time, t0 = Math.max(now - 300, now - st.uptime_s - 1);
  const lane = g => 14 + 18 * g, x = t => left + (right - left) * (t - t0) / Math.max(1, now - t0);
  const ng = Math.max(1, st.groups.length); svg.setAttribute("height", lane(ng) + 24);
  for (const g of st.groups) svg.appendChild(el("svg:text", {x: 4, y: lane(g.group) + 4}, "group " + g.group));
  for (const e of events) {
    if (e.group === undefined || e.time < t0) continue;
    const c = el("svg:circle", {cx: x(e.time), cy: lane(e.group), r: 5, fill: COLORS[e.kind] || "#999",
                                class: "mark-" + e.kind});
    c.appendChild(el("svg:title", {}, `${e.iso} ${e.kind} ${e.reason || e.why || ""}`)); svg.appendChild(c);
  }
  axis(svg, left, right, lane(ng), t0, now);
  const list = document.getElementById("events"); list.replaceChildren();
  for (const e of events.slice(-50).reverse()) {
    if (e.kind === "group_ready" && e.attempt === 0) continue;
    const what = e.kind === "exited" ? `rank ${e.rank} ${e.reason}${e.meaning ? ": " + e.meaning : ""}` :
                 e.kind === "restarting" ? `backoff ${e.backoff_s} s: ${e.reason}` :
                 e.kind === "hung" ? `rank ${e.rank} ${e.why}` : (e.reason || "");
    list.appendChild(el("li", {class: "event", "data-kind": e.kind},
                        `${e.iso.slice(11, 23)} ${e.kind} group ${e.group ?? "-"} ${what}`));
  }
}
function drawLatency(points) {
  const svg = document.getElementById("latency"); svg.replaceChildren();
  const W = 900, H = 160, left = 70, right = W - 10, top = 10, bottom = H - 24;
  if (!points.length) { svg.appendChild(el("svg:text", {x: left, y: 40}, "no calls yet")); return; }
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  const ymax = Math.max(...points.map(p => p.p99)) * 1.1 || 1e-3;
  const x = t => left + (right - left) * (t - t0) / (t1 - t0), y = v => bottom - (bottom - top) * v / ymax;
  for (const [key, color] of [["p99", "#ef6c00"], ["p50", "#1565c0"]]) {
    svg.appendChild(el("svg:polyline", {fill: "none", stroke: color, "stroke-width": 1.5, class: "line-" + key,
      points: points.map(p => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ")}));
  }
  svg.appendChild(el("svg:text", {x: 4, y: top + 8}, (ymax * 1e3).toFixed(2) + " ms"));
  svg.appendChild(el("svg:text", {x: 4, y: bottom}, "0"));
  svg.appendChild(el("svg:text", {x: right - 120, y: top + 8, fill: "#ef6c00"}, "p99"));
  svg.appendChild(el("svg:text", {x: right - 80, y: top + 8, fill: "#1565c0"}, "p50"));
  axis(svg, left, right, bottom, t0, t1);
}
async function refresh() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"}); const s = await r.json();
    const st = s.status, badge = document.getElementById("badge");
    badge.textContent = st.serving ? "serving" : st.state; badge.className = "badge " + (st.serving ? "ok" : "bad");
    document.getElementById("meta").textContent =
      `run ${st.run} · ${st.run_dir} · supervisor pid ${st.pid} · ${st.state} · ` +
      `up ${st.uptime_s.toFixed(0)} s · ` +
      `${st.workers.length} ranks in ${st.groups.length} groups · ` +
      `updated ${new Date(st.time * 1000).toLocaleTimeString()}`;
    drawTree(st); drawHistory(st, s.history.events); drawLatency(s.history.latency);
  } catch (err) {
    document.getElementById("meta").textContent = "supervisor not answering: " + err;
    document.getElementById("badge").textContent = "gone"; document.getElementById("badge").className = "badge bad";
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
