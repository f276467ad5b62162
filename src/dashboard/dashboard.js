// The training dashboard's page script: draws everything from the JSON in
// <script id="rlhf-data" type="application/json">, written by rlhf-bot (live or static).
// Text from the data (model ids, versions, gate details) only ever goes into the page through
// textContent and attribute setters, never as markup, so hostile feedback fields stay text.
"use strict";

const data = JSON.parse(document.getElementById("rlhf-data").textContent);
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}
function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 0.001 || a >= 1e5)) return x.toExponential(2);
  return (Math.round(x * 1000) / 1000).toString();
}
function pct(x) { return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%"; }
function section(id, title) {
  const s = el("section", { id, "aria-labelledby": id + "-h" }, el("h2", { id: id + "-h" }, title));
  document.getElementById("main").append(s);
  return s;
}

// A line chart: series = [{name, color, points: [[x, y]], band: [[x, lo, hi]]?}].
function chart(series, { width = 560, height = 220, yLabel = "", xLabel = "step", xIsDay = false } = {}) {
  const pad = { l: 56, r: 12, t: 12, b: 34 };
  const all = series.flatMap((s) => s.points.concat((s.band || []).flatMap(([x, lo, hi]) => [[x, lo], [x, hi]])));
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart" });
  const title = svgEl("title");
  title.textContent = `${yLabel} by ${xLabel}`;
  svg.append(title);
  if (all.length === 0) return svg;
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 0.5; y0 -= d; y1 += d; }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const sy = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  const axis = svgEl("g", { class: "axis" });
  axis.append(svgEl("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b }));
  axis.append(svgEl("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    const t = svgEl("text", { x: pad.l - 6, y: sy(y) + 4, "text-anchor": "end" });
    t.textContent = fmt(y);
    axis.append(t);
  }
  for (const x of [x0, x1]) {
    const t = svgEl("text", { x: sx(x), y: height - pad.b + 16, "text-anchor": x === x0 ? "start" : "end" });
    t.textContent = xIsDay ? new Date(x).toISOString().slice(0, 10) : fmt(x);
    axis.append(t);
  }
  const label = svgEl("text", { x: pad.l, y: height - 4 });
  label.textContent = yLabel;
  axis.append(label);
  svg.append(axis);
  for (const s of series) {
    if (s.band && s.band.length) {
      const upper = s.band.map(([x, , hi]) => `${sx(x)},${sy(hi)}`);
      const lower = s.band.slice().reverse().map(([x, lo]) => `${sx(x)},${sy(lo)}`);
      svg.append(svgEl("polygon", { points: upper.concat(lower).join(" "), fill: s.color, "fill-opacity": 0.15, stroke: "none" }));
    }
    const d = s.points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2 }));
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      svg.append(svgEl("circle", { cx: sx(x), cy: sy(y), r: 3, fill: s.color }));
    }
  }
  return svg;
}
function legend(series) {
  const ul = el("ul", { class: "legend" });
  for (const s of series) {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = s.color;
    ul.append(el("li", {}, swatch, s.name));
  }
  return ul;
}
function table(headers, rows, caption) {
  const t = el("table");
  if (caption) t.append(el("caption", {}, caption));
  t.append(el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h)))));
  const body = el("tbody");
  for (const r of rows) body.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  t.append(body);
  return t;
}
function badge(status) { return el("span", { class: "badge " + status }, status); }

// Header: when, and "Retrain now".
function header() {
  const h = document.getElementById("meta");
  h.append(el("span", {}, (data.live ? "live, " : "snapshot, ") + "generated " + data.generated_at));
  const r = data.retrain;
  if (r.button) {
    const b = el("button", { type: "button", id: "retrain" }, "Retrain now");
    const out = el("span", { id: "retrain-result", role: "status" });
    b.addEventListener("click", async () => {
      b.disabled = true;
      out.textContent = "dispatching…";
      try {
        // location.origin carries no user:password even when the address bar did.
        const resp = await fetch(location.origin + location.pathname.replace(/\/$/, "") + "/retrain", { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
        const body = await resp.json().catch(() => ({}));
        out.textContent = resp.ok ? "workflow dispatched" : "failed: " + (body.message || resp.status);
      } catch (e) {
        out.textContent = "failed: " + e;
      }
      b.disabled = false;
    });
    h.append(b, out);
  }
  if (r.workflow_url) {
    h.append(el("a", { href: r.workflow_url, id: "retrain-link", rel: "noopener" }, r.button ? "workflow runs" : "Retrain now (Run workflow on GitHub)"));
  }
  for (const n of data.notes) document.getElementById("notes").append(el("li", {}, n));
}

function deployedSection() {
  const s = section("deployed", "Deployed");
  const rows = Object.entries(data.deployed).map(([kind, live]) => [kind, live.id, live.deployed_at, (live.formats || []).join(", "), live.status || "not recorded"]);
  s.append(rows.length ? table(["kind", "model", "since", "formats", "record"], rows) : el("p", {}, "Nothing deployed yet (rlhf-bot deploy publishes the production models)."));
}

const KEY_METRICS = ["eval_accuracy", "win_rate", "kl", "eval_loss", "mean_reward"];
function versionsSection() {
  const s = section("versions", "Model versions");
  const rows = data.versions.map((v) => {
    const metrics = Object.entries(v.metrics).filter(([k]) => KEY_METRICS.some((m) => k.includes(m))).slice(0, 3).map(([k, x]) => `${k} ${fmt(x)}`).join(", ");
    const gates = v.gates ? v.gates.map((g) => `${g.status === "pass" ? "✓" : g.status === "fail" ? "✗" : "–"} ${g.name}`).join("; ") : "no report";
    const examples = Object.entries(v.examples).filter(([k]) => !k.startsWith("eval")).map(([k, n]) => `${k} ${n}`).slice(0, 3).join(", ");
    return [v.id, v.kind, badge(v.status), v.created_at, v.algorithm, v.parent || "–", examples || "–", metrics || "–", gates];
  });
  s.append(table(["id", "kind", "status", "created", "algorithm", "parent", "trained on", "metrics", "gates"], rows));
}

function compareSection() {
  const s = section("compare", "Compare two versions");
  if (data.versions.length === 0) { s.append(el("p", {}, "No versions yet.")); return; }
  const pick = (id, label, index) => {
    const sel = el("select", { id });
    data.versions.forEach((v, i) => {
      const o = el("option", { value: String(i) }, v.id);
      if (i === index) o.selected = true;
      sel.append(o);
    });
    return [el("label", { for: id }, label), sel];
  };
  // B: the newest version; A: the one before it of the same kind (what a reviewer compares).
  const sameKind = data.versions.findIndex((v, i) => i > 0 && v.kind === data.versions[0].kind);
  const [la, a] = pick("compare-a", "A", sameKind > 0 ? sameKind : 0);
  const [lb, b] = pick("compare-b", "B", 0);
  const out = el("div", { id: "compare-out" });
  s.append(el("div", { class: "controls" }, la, a, lb, b), out);
  const draw = () => {
    const va = data.versions[Number(a.value)], vb = data.versions[Number(b.value)];
    const keys = [...new Set(Object.keys(va.metrics).concat(Object.keys(vb.metrics)))].sort();
    const rows = [["kind", va.kind, vb.kind, ""], ["status", va.status, vb.status, ""], ["algorithm", va.algorithm, vb.algorithm, ""], ["base model", va.base_model, vb.base_model, ""], ["parent", va.parent || "–", vb.parent || "–", ""]];
    for (const k of keys) {
      const x = va.metrics[k], y = vb.metrics[k];
      rows.push([k, fmt(x), fmt(y), x !== undefined && y !== undefined ? fmt(y - x) : ""]);
    }
    out.replaceChildren(table(["", va.id, vb.id, "B − A"], rows));
    const ca = data.curves[va.id] || {}, cb = data.curves[vb.id] || {};
    const shared = ["loss", "accuracy", "rewards/margins"].filter((k) => k in ca && k in cb);
    for (const k of shared) {
      const series = [{ name: va.id, color: PALETTE[0], points: ca[k] }, { name: vb.id, color: PALETTE[1], points: cb[k] }];
      out.append(el("figure", {}, chart(series, { yLabel: k }), legend(series)));
    }
  };
  a.addEventListener("change", draw);
  b.addEventListener("change", draw);
  draw();
}

function kpiSection() {
  const s = section("kpis", "KPIs per model version (95% intervals)");
  if (data.kpis.length === 0) { s.append(el("p", {}, "No feedback in the period yet.")); return; }
  const versions = [...new Set(data.kpis.map((k) => k.model_version))].sort();
  const color = (v) => PALETTE[versions.indexOf(v) % PALETTE.length];
  for (const [field, label] of [["positive_rate", "positive thumbs"], ["mean_rating", "mean rating (1–5)"]]) {
    const series = versions.map((v) => {
      const rows = data.kpis.filter((k) => k.model_version === v && k[field]);
      const x = (k) => Date.parse(k.day + "T00:00:00Z");
      return { name: v, color: color(v), points: rows.map((k) => [x(k), k[field].estimate]), band: rows.map((k) => [x(k), k[field].low, k[field].high]) };
    }).filter((s) => s.points.length);
    if (series.length) s.append(el("figure", {}, chart(series, { yLabel: label, xLabel: "day", xIsDay: true }), legend(series)));
  }
  const rows = data.kpis.map((k) => [k.day, k.model_version, String(k.count), k.positive_rate ? `${pct(k.positive_rate.estimate)} [${pct(k.positive_rate.low)}, ${pct(k.positive_rate.high)}]` : "–", k.mean_rating ? `${fmt(k.mean_rating.estimate)} [${fmt(k.mean_rating.low)}, ${fmt(k.mean_rating.high)}]` : "–"]);
  const details = el("details", {}, el("summary", {}, "KPI table"), table(["day", "model version", "records", "positive thumbs", "mean rating"], rows));
  s.append(details);
}

function curvesSection() {
  const s = section("curves", "Training curves");
  const ids = data.versions.map((v) => v.id).filter((id) => data.curves[id]);
  if (ids.length === 0) { s.append(el("p", {}, "No run logs here (they live in the bot's store, store.dir/runs).")); return; }
  const sel = el("select", { id: "curves-version" }, ...ids.map((id) => el("option", { value: id }, id)));
  const out = el("div", { class: "grid" });
  s.append(el("div", { class: "controls" }, el("label", { for: "curves-version" }, "version"), sel), out);
  const draw = () => {
    const curves = data.curves[sel.value];
    const preferred = ["loss", "accuracy", "rewards/margins", "objective/kl", "objective/rlhf_reward", "mean_reward", "learning_rate", "grad_norm"];
    const keys = preferred.filter((k) => k in curves).concat(Object.keys(curves).filter((k) => !preferred.includes(k))).slice(0, 6);
    out.replaceChildren(...keys.map((k) => el("figure", {}, chart([{ name: k, color: PALETTE[0], points: curves[k] }], { width: 360, height: 180, yLabel: k }))));
  };
  sel.addEventListener("change", draw);
  draw();
}

header();
deployedSection();
versionsSection();
compareSection();
kpiSection();
curvesSection();
document.body.dataset.ready = "true";
