// The dashboard: polls /api/status and draws the curves as inline SVG. No library, no external
// asset. The job token (when the coordinator wants one) comes from the URL fragment
// `#token=...` (never sent to the server, removed from the address bar at once) or from the
// form, and is kept in this tab's sessionStorage.
"use strict";

const POLL_MS = 2000;
const TASKS = [
  ["cls", "classification", ["accuracy", "F1", "mAP"]],
  ["det", "detection", ["AP", "AP50", "AP75"]],
  ["seg", "segmentation", ["mIoU", "pixel_accuracy"]],
];
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#57606a"];
const SVG_NS = "http://www.w3.org/2000/svg";

// Every metrics point so far (train reports and merged evaluations), oldest first.
const points = [];
let token = sessionStorage.getItem("mtl-token") || "";

(function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem("mtl-token", token);
    window.history.replaceState(null, "", location.pathname + location.search);
  }
})();

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  const text = v.toPrecision(digits || 4);
  return text.length > 8 ? v.toExponential(Math.min((digits || 4) - 1, 3)) : text;
}

// One chart: series = [{name, points: [[step, value], ...]}].
function chart(title, key, series) {
  const box = el("div", { class: "chart", "data-chart": key }, el("h3", {}, title));
  const drawn = series.filter((s) => s.points.length > 0);
  if (drawn.length === 0) {
    box.append(el("div", { class: "empty" }, "no points yet"));
    return box;
  }
  const W = 400, H = 170, L = 52, R = 8, T = 8, B = 22;
  const all = drawn.flatMap((s) => s.points);
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(el("svg:rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#d8dee4" }));
  // Enough digits that the three labels differ, however narrow the range.
  const ticks = [y0 + pad, (y0 + y1) / 2, y1 - pad];
  const scale = Math.max(...ticks.map(Math.abs)) / (y1 - y0 - 2 * pad || 1);
  const digits = Math.min(8, Math.max(3, Math.ceil(Math.log10(scale)) + 2));
  for (const y of ticks) {
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eaeef2" }));
    svg.append(el("svg:text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" }, fmt(y, digits)));
  }
  svg.append(el("svg:text", { x: L, y: H - 6 }, `step ${x0}`));
  svg.append(el("svg:text", { x: W - R, y: H - 6, "text-anchor": "end" }, `${x1}`));
  const legend = el("div", { class: "legend" });
  drawn.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(el("svg:polyline", {
      points: pts, fill: "none", stroke: color, "stroke-width": 1.6,
      "data-series": s.name, "data-points": s.points.length,
    }));
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      svg.append(el("svg:circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color }));
    }
    const last = s.points[s.points.length - 1][1];
    legend.append(el("span", {}, el("i", { style: `background:${color}` }), `${s.name} ${fmt(last)}`));
  });
  box.append(svg, legend);
  return box;
}

function series(kind, key) {
  const xy = [];
  for (const p of points) {
    const v = p.values[key];
    if (p.kind === kind && typeof v === "number" && v >= 0) xy.push([p.step, v]);
  }
  return { name: key, points: xy };
}

function drawCharts() {
  const charts = document.getElementById("charts");
  const boxes = [];
  const seen = new Set(points.flatMap((p) => Object.keys(p.values)));
  for (const [short, name, metrics] of TASKS) {
    if (!seen.has(`loss/${short}`) && !metrics.some((m) => seen.has(m))) continue;
    boxes.push(chart(`${name}: training loss`, `loss/${short}`, [series("train", `loss/${short}`)]));
    boxes.push(chart(`${name}: validation`, `eval/${short}`,
      metrics.filter((m) => seen.has(m)).map((m) => series("eval", m))));
  }
  if (seen.has("images_per_s")) boxes.push(chart("images/s (all ranks)", "images_per_s", [series("train", "images_per_s")]));
  if (seen.has("lr")) boxes.push(chart("learning rate", "lr", [series("train", "lr")]));
  charts.replaceChildren(...boxes);
}

function fillTable(id, rows) {
  document.querySelector(`#${id} tbody`).replaceChildren(...rows);
}

function cells(values, numeric) {
  return values.map((v, i) => el("td", numeric && numeric[i] ? { class: "num" } : {}, String(v)));
}

function draw(s) {
  document.title = `${s.job_name}: ${s.state}`;
  document.getElementById("title").textContent = `job ${s.job_name}`;
  const step = Math.max(0, ...s.workers.map((w) => w.last_step));
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    el("span", { class: `state state-${s.state}`, "data-state": s.state }, s.state),
    ` · generation ${s.generation} · ${s.world_size} workers · epoch ${s.epoch} · step ${step}` +
      ` · config ${s.config_hash}`,
  );
  document.getElementById("message").textContent = s.message;

  fillTable("workers", s.workers.map((w) => {
    const row = el("tr", { "data-worker-id": w.worker_id });
    row.append(...cells([
      w.rank === null ? "–" : w.rank, w.worker_id, w.host, w.device, w.state, w.phase || "–",
      w.last_step, `${(w.heartbeat_age_ms / 1000).toFixed(1)} s`, w.collective_seq,
    ], [1, 0, 0, 0, 0, 0, 1, 1, 1]));
    return row;
  }));

  const kept = s.checkpoints.filter((c) => !c.pruned);
  document.getElementById("checkpoints-title").textContent =
    `Checkpoints (${s.checkpoints.length} committed, ${kept.length} kept)`;
  fillTable("checkpoints", kept.slice().reverse().map((c) =>
    el("tr", { "data-checkpoint-step": c.step }, ...cells([c.step, c.epoch, c.generation, c.path], [1, 1, 1, 0]))));

  fillTable("events", s.events.slice(-10).reverse().map((e) => {
    const t = new Date(e.at_unix_ms).toISOString().slice(11, 19);
    return el("tr", {}, ...cells([t, e.generation, e.kind, e.detail], [0, 1, 0, 0]));
  }));

  const evals = points.filter((p) => p.kind === "eval");
  const last = evals[evals.length - 1];
  const rows = [];
  if (last) {
    document.getElementById("eval-title").textContent = `Latest evaluation (step ${last.step}, all ranks merged)`;
    for (const [, name, metrics] of TASKS) {
      for (const m of metrics) {
        if (m in last.values) rows.push(el("tr", { "data-metric": m }, ...cells([name, m, fmt(last.values[m])], [0, 0, 1])));
      }
    }
  }
  fillTable("evaluation", rows);
  drawCharts();
}

async function poll() {
  const form = document.getElementById("token-form");
  const error = document.getElementById("error");
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const r = await fetch(`api/status?since=${points.length}`, { headers, cache: "no-store" });
    if (r.status === 401) {
      form.style.display = "block";
      error.textContent = token ? "the token was refused" : "";
      return;
    }
    if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
    form.style.display = "none";
    const s = await r.json();
    if (s.history_len < points.length) {
      points.length = 0; // another job (or a fresh state database) on this address
    } else {
      points.push(...s.history);
    }
    error.textContent = "";
    draw(s);
  } catch (e) {
    error.textContent = `cannot reach the coordinator (${e.message}); the job may have ended`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem("mtl-token", token);
});

poll();
