// The collector's dashboard: redraws the server-rendered page from the JSON API every 2 s.
// Plain browser JavaScript, no build step, nothing loaded from elsewhere. Charts are inline
// SVG drawn from /api/devices/{id}'s telemetry series.
"use strict";

(function () {
  const POLL_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";
  const page = document.body.dataset.page;
  const params = JSON.parse(document.body.dataset.params || "{}");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function num(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toPrecision(digits);
  }

  function pct(value) {
    return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%";
  }

  function ago(t) {
    if (t === null || t === undefined) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  function updated(error) {
    const node = document.getElementById("updated");
    if (!node) return;
    node.textContent = error ? "not updated: " + error.message : "updated " + clock(Date.now() / 1000);
    node.className = error ? "error" : "";
  }

  function alertItems(list, alerts) {
    list.replaceChildren();
    if (!alerts.length) list.append(el("li", { class: "none" }, "none"));
    for (const a of alerts) {
      list.append(
        el("li", { class: "alert " + a.severity }, el("b", {}, a.rule), " " + a.summary + " ",
          el("small", {}, "since " + ago(a.started_at))),
      );
    }
  }

  // A badge after the model when the last remote deploy rolled back or failed (web.py's twin).
  function deployMarker(dep) {
    if (!dep || (dep.state !== "rolled_back" && dep.state !== "failed")) return "";
    const tip = "deploy " + dep.id + " -> " + dep.to_version + ": " + (dep.reason || "no reason given");
    return el("span", { class: "deploy " + dep.state, title: tip },
      dep.state === "rolled_back" ? "rolled back" : "deploy failed");
  }

  // --- the fleet page ---

  const ROLLOUTS = 10; // web.py's DASHBOARD_ROLLOUTS
  const ROLLOUT_DEVICE_STATES =
    ["pending", "deploying", "applied", "rolled_back", "failed", "reverted", "unreachable",
     "skipped"];

  // "2 applied, 1 rolled back, 3 pending" (web.py's _rollout_devices).
  function rolloutDevices(counts) {
    const parts = ROLLOUT_DEVICE_STATES.filter((s) => counts[s])
      .map((s) => counts[s] + " " + s.replace("_", " "));
    return parts.length ? parts.join(", ") : "–";
  }

  function rolloutRows(list) {
    if (!list.length) return [el("tr", {}, el("td", { colspan: 7, class: "none" }, "none"))];
    return list.map((r) => {
      const href = "/api/rollouts/" + encodeURIComponent(r.fleet) + "/" + encodeURIComponent(r.id);
      const model = (r.model || "–") + (r.model_version ? "@" + r.model_version : "");
      return el("tr", { "data-rollout": r.id, "data-fleet": r.fleet },
        el("td", {}, el("a", { href }, r.id)),
        el("td", {}, model),
        el("td", {}, el("span", { class: "state " + r.state }, r.state)),
        el("td", {}, Math.min(r.wave + 1, r.waves_total) + " of " + r.waves_total),
        el("td", {}, rolloutDevices(r.counts)),
        el("td", { class: "reason" }, r.reason || "–"),
        el("td", {}, ago(r.received_at)),
      );
    });
  }

  async function refreshFleet() {
    const [fleet, alerts, drift, rollouts] = await Promise.all([
      getJSON("/api/devices"),
      getJSON("/api/alerts").catch(() => ({ firing: [] })),
      getJSON("/api/drift").catch(() => ({ devices: [] })),
      getJSON("/api/rollouts?limit=" + ROLLOUTS), // the API's own route: always there
    ]);
    const rules = new Map();
    for (const a of alerts.firing) {
      const key = a.fleet + "/" + a.device;
      rules.set(key, (rules.get(key) || []).concat([a.rule]));
    }
    const psi = new Map(drift.devices.map((r) => [r.fleet + "/" + r.device, r]));
    const rows = fleet.devices.map((d) => {
      const key = d.fleet + "/" + d.device;
      const r = psi.get(key);
      const href = "/devices/" + encodeURIComponent(d.device) + "?fleet=" + encodeURIComponent(d.fleet);
      const model = (d.model || "–") + (d.model_version ? "@" + d.model_version : "");
      const fired = rules.get(key) || [];
      return el("tr", { "data-device": d.device, "data-fleet": d.fleet },
        el("td", {}, el("a", { href }, d.device)),
        el("td", {}, el("span", { class: "state " + d.status, title: d.reason }, d.status)),
        el("td", {}, model, " ", deployMarker(d.deploy)),
        el("td", { class: "num" }, num(d.latency_ms.p95, 3)),
        el("td", { class: "num" }, pct(d.outlier_rate)),
        el("td", { class: "num" }, d.temperature_c === null ? "–" : d.temperature_c.toFixed(1)),
        el("td", { class: "num psi " + (r ? r.level : "") }, r && r.psi !== null ? r.psi.toFixed(3) : "–"),
        el("td", { class: "alerts" }, fired.length ? fired.join(", ") : "–"),
        el("td", {}, ago(d.last_seen)),
      );
    });
    document.querySelector("#fleet tbody").replaceChildren(...rows);
    const s = fleet.summary;
    document.getElementById("summary").textContent =
      `${s.devices} devices: ${s.online} online, ${s.stale} stale, ${s.offline} offline; ` +
      `${alerts.firing.length} alerts firing`;
    alertItems(document.getElementById("alerts"), alerts.firing);
    document.querySelector("#rollouts tbody").replaceChildren(...rolloutRows(rollouts.rollouts));
  }

  // --- the device page ---

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
    return 10 * step;
  }

  // lines: [{name, color, points: [[t, y], ...]}]; y may be null (a gap in the line).
  function chart(container, lines, unit, fixedMax) {
    const W = 860, H = 220, L = 56, R = 120, T = 12, B = 28;
    const xs = lines.flatMap((l) => l.points.map((p) => p[0]));
    const ys = lines.flatMap((l) => l.points.map((p) => p[1]).filter((y) => y !== null));
    container.replaceChildren();
    if (!xs.length) {
      container.append(el("p", { class: "none" }, "no telemetry yet"));
      return;
    }
    const x0 = Math.min(...xs), x1 = Math.max(...xs) > x0 ? Math.max(...xs) : x0 + 1;
    const yMax = fixedMax || niceMax(Math.max(0, ...ys));
    const X = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
    const Y = (v) => T + (1 - v / yMax) * (H - T - B);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg" });
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      root.append(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
      const label = unit === "%" ? (100 * v).toFixed(0) + "%" : String(+v.toPrecision(3));
      root.append(svg("text", { x: L - 6, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, label));
    }
    for (let i = 0; i <= 4; i++) {
      const t = x0 + ((x1 - x0) * i) / 4;
      root.append(svg("text", { x: X(t), y: H - 8, class: "tick", "text-anchor": "middle" }, clock(t)));
    }
    lines.forEach((line, n) => {
      let d = "";
      let pen = false;
      for (const [t, y] of line.points) {
        if (y === null) { pen = false; continue; }
        d += (pen ? " L" : " M") + X(t).toFixed(1) + " " + Y(Math.min(y, yMax)).toFixed(1);
        pen = true;
      }
      root.append(svg("path", { d: d.trim() || "M0 0", class: "series", stroke: line.color, "data-series": line.name }));
      root.append(svg("rect", { x: W - R + 12, y: T + 4 + n * 18, width: 10, height: 10, fill: line.color }));
      root.append(svg("text", { x: W - R + 28, y: T + 13 + n * 18, class: "legend" }, line.name));
    });
    container.append(root);
  }

  async function refreshDevice() {
    const q = "?series=120&events=20&fleet=" + encodeURIComponent(params.fleet);
    const [d, alerts] = await Promise.all([
      getJSON("/api/devices/" + encodeURIComponent(params.device) + q),
      getJSON("/api/alerts?state=firing").catch(() => ({ firing: [] })),
    ]);
    const series = d.series;
    const at = (w) => w.received_at;
    chart(document.getElementById("latency-chart"), [
      { name: "p50", color: "#2b8a3e", points: series.map((w) => [at(w), w.p50]) },
      { name: "p95", color: "#e8590c", points: series.map((w) => [at(w), w.p95]) },
      { name: "max", color: "#868e96", points: series.map((w) => [at(w), w.max]) },
    ], "ms");
    chart(document.getElementById("outlier-chart"), [
      { name: "outlier rate", color: "#c2255c",
        points: series.map((w) => [at(w), w.inferences ? w.outliers / w.inferences : null]) },
    ], "%", Math.max(0.1, niceMax(Math.max(0, ...series.map((w) => (w.inferences ? w.outliers / w.inferences : 0))))));
    const mine = alerts.firing.filter((a) => a.device === d.device && a.fleet === d.fleet);
    alertItems(document.getElementById("alerts"), mine);
    const rows = d.events.map((e) => {
      const m = e.message;
      const what = e.kind === "status" ? m.state + " (agent " + m.agent_version + ")"
        : e.kind === "outliers" ? "score " + num(m.score, 3) + " > " + num(m.threshold, 3) + ", predicted " + m.prediction
        : JSON.stringify(m.result !== undefined ? m.result : m).slice(0, 120);
      return el("tr", {}, el("td", {}, clock(e.received_at)), el("td", {}, e.kind), el("td", { class: "num" }, e.seq), el("td", {}, what));
    });
    document.querySelector("#events tbody").replaceChildren(...rows);
  }

  const refresh = page === "fleet" ? refreshFleet : page === "device" ? refreshDevice : null;
  if (!refresh) return;

  async function loop() {
    try {
      await refresh();
      updated(null);
    } catch (error) {
      updated(error);
    }
    setTimeout(loop, POLL_MS);
  }
  loop();
})();
