/* headwater console: plain JS over the admin API (same origin, session cookie). */
"use strict";

(function () {
  // ---------------------------------------------------------------- helpers
  const $ = (sel, root) => (root || document).querySelector(sel);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f6feb", "#e8590c", "#2f9e44", "#ae3ec9", "#f59f00", "#0c8599",
    "#e03131", "#5c7cfa", "#74b816", "#868e96"];
  const LIVE_MAX = 500;

  /** Build an element; children are nodes or text (never parsed as HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) el.setAttribute(k, String(v));
    }
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "style") el.setAttribute("style", v);
      else if (k in el && typeof v !== "string") el[k] = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  function fmtPct(x, digits) {
    if (x === null || x === undefined) return "–";
    return (x * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function fmtTime(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDateTime(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtTime(ms)}`;
  }

  function json(value) {
    return JSON.stringify(value, null, 2);
  }

  function prettyBody(text) {
    try { return json(JSON.parse(text)); } catch (e) { return text; }
  }

  async function copyText(text, button) {
    let done = false;
    if (navigator.clipboard && window.isSecureContext) {
      try { await navigator.clipboard.writeText(text); done = true; } catch (e) { done = false; }
    }
    if (!done) {
      const area = h("textarea", { style: "position:fixed;left:-9999px;top:0" }, text);
      document.body.appendChild(area);
      area.select();
      try { done = document.execCommand("copy"); } catch (e) { done = false; }
      area.remove();
    }
    if (button) {
      const label = button.textContent;
      button.textContent = done ? "Copied" : "Copy failed";
      setTimeout(() => { button.textContent = label; }, 1200);
    }
  }

  function copyButton(getText) {
    const b = h("button", { type: "button", class: "small" }, "Copy");
    b.addEventListener("click", (e) => { e.stopPropagation(); copyText(getText(), b); });
    return b;
  }

  // Only the newest request of each kind may draw: an auto-refresh that answers
  // after a newer, user-made request must not overwrite it.
  const tickets = {};
  function ticket(kind) {
    const n = (tickets[kind] || 0) + 1;
    tickets[kind] = n;
    return () => tickets[kind] === n;
  }

  function notice(el, text, bad) {
    el.textContent = text;
    el.classList.toggle("bad", !!bad);
    el.hidden = !text;
  }

  function errorBox(err) {
    return h("p", { class: "notice bad" }, String(err && err.message ? err.message : err));
  }

  // ---------------------------------------------------------------- API
  class Unauthorised extends Error {}

  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (opts.body !== undefined && typeof opts.body !== "string") {
      opts.body = JSON.stringify(opts.body);
      opts.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, opts);
    let data = null;
    const text = await response.text();
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
    if (response.status === 401 && path !== "/api/login") {
      showLogin("Your session has ended; sign in again.");
      throw new Unauthorised("admin token required");
    }
    if (!response.ok) {
      throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
    }
    return data;
  }

  function qs(params) {
    const parts = [];
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== "") {
        parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
      }
    }
    return parts.length ? "?" + parts.join("&") : "";
  }

  // ---------------------------------------------------------------- shared state
  const state = {
    sources: [],
    events: [],
    tab: null,
    timer: null,
    signedIn: false,
  };

  async function loadSources() {
    const data = await api("/api/sources");
    state.sources = data.sources || [];
    for (const id of ["live-source", "volumes-source"]) {
      const select = $("#" + id);
      const current = select.value;
      clear(select).appendChild(h("option", { value: "" }, "all sources"));
      for (const src of state.sources) select.appendChild(h("option", { value: src.name }, src.name));
      select.value = state.sources.some((x) => x.name === current) ? current : "";
    }
    return state.sources;
  }

  async function loadKnownEvents() {
    const since = new Date(Date.now() - 30 * 86400000).toISOString();
    try {
      const data = await api("/api/insights/counts" + qs({ since, bucket: "month", breakdown: "event" }));
      const totals = new Map();
      for (const row of data.series) {
        if (row.value === null) continue;
        totals.set(row.value, (totals.get(row.value) || 0) + row.events);
      }
      state.events = [...totals.entries()].sort((a, b) => b[1] - a[1]).map((e) => e[0]);
    } catch (e) {
      if (e instanceof Unauthorised) throw e;
      state.events = [];
    }
    const list = clear($("#known-events"));
    for (const name of state.events) list.appendChild(h("option", { value: name }));
    return state.events;
  }

  // ---------------------------------------------------------------- charts (inline SVG)
  /** A round step for about `count` ticks up to `max`; whole numbers for counts. */
  function niceStep(max, count) {
    const raw = Math.max(max / count, 1);
    const exp = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * exp >= raw) return m * exp;
    return 10 * exp;
  }

  function shortNumber(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(n % 1e6 ? 1 : 0) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n % 1e3 ? 1 : 0) + "k";
    return String(Math.round(n * 100) / 100);
  }

  function chartWidth(box) {
    return Math.max(320, Math.round((box && box.clientWidth) || 900));
  }

  /**
   * A time-series chart: series = [{name, color, values}] over shared x positions
   * `xs` (ms). Stacked bars when there are few buckets, lines when there are many.
   */
  function timeChart(box, xs, series, labelFor) {
    const W = chartWidth(box), H = 260, L = 48, R = 12, T = 10, B = 28;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
    const n = xs.length;
    const bars = n <= 60;
    const totals = xs.map((_, i) => series.reduce((a, ser) => a + ser.values[i], 0));
    const peak = bars ? Math.max(1, ...totals) : Math.max(1, ...series.flatMap((x) => x.values));
    const step = niceStep(peak, 4);
    const maxValue = Math.ceil(peak / step) * step;
    const plotW = W - L - R, plotH = H - T - B;
    const y = (v) => T + plotH - (v / maxValue) * plotH;
    for (let t = 0; t <= maxValue + 1e-9; t += step) {
      svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(t), y2: y(t), class: "gridline" }));
      svg.appendChild(s("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, shortNumber(t)));
    }
    svg.appendChild(s("line", { x1: L, x2: W - R, y1: T + plotH, y2: T + plotH, class: "axis" }));
    const slot = plotW / Math.max(n, 1);
    const xAt = (i) => (bars ? L + slot * i + slot / 2 : L + (n > 1 ? (plotW * i) / (n - 1) : plotW / 2));
    const labelEvery = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(plotW / 70))));
    xs.forEach((x, i) => {
      if (i % labelEvery === 0) {
        svg.appendChild(s("text", { x: xAt(i), y: H - 9, "text-anchor": "middle" }, labelFor(x)));
      }
    });
    if (bars) {
      const width = Math.max(slot * 0.72, 1);
      xs.forEach((x, i) => {
        let base = 0;
        for (const ser of series) {
          const v = ser.values[i];
          if (!v) continue;
          const rect = s("rect", {
            x: xAt(i) - width / 2, y: y(base + v), width, height: y(base) - y(base + v), fill: ser.color,
          });
          rect.appendChild(s("title", {}, `${ser.name} · ${labelFor(x)}: ${fmtInt(v)}`));
          svg.appendChild(rect);
          base += v;
        }
      });
    } else {
      series.forEach((ser) => {
        const d = ser.values.map((v, i) => `${i ? "L" : "M"}${xAt(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
        const path = s("path", { d, fill: "none", stroke: ser.color, "stroke-width": 1.8, "stroke-linejoin": "round" });
        path.appendChild(s("title", {}, ser.name));
        svg.appendChild(path);
      });
    }
    return svg;
  }

  function legend(series) {
    return h("div", { class: "legend" },
      series.map((x) => h("span", { style: `--c:${x.color}` }, `${x.name} (${fmtInt(x.values.reduce((a, b) => a + b, 0))})`)));
  }

  const BUCKET_MS = { minute: 60000, hour: 3600000, day: 86400000 };

  function bucketPositions(sinceMs, untilMs, bucket, seen) {
    const step = BUCKET_MS[bucket];
    if (!step) return [...seen].sort((a, b) => a - b);
    const out = [];
    const start = Math.floor(sinceMs / step) * step;
    for (let t = start; t < untilMs && out.length < 2000; t += step) out.push(t);
    return out;
  }

  function bucketLabel(bucket) {
    return (ms) => {
      const d = new Date(ms);
      if (bucket === "minute" || bucket === "hour") return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      return `${d.getMonth() + 1}/${d.getDate()}`;
    };
  }

  // ---------------------------------------------------------------- Sources
  const sources = {
    interval: 0,
    fresh: null,
    init() {
      $("#source-form").addEventListener("submit", async (e) => {
        e.preventDefault();
        const name = $("#source-name").value.trim();
        if (!name) return;
        try {
          const created = await api("/api/sources", { method: "POST", body: { name } });
          this.fresh = created.write_key;
          $("#source-name").value = "";
          notice($("#sources-message"), `Created source “${created.name}”. Its write key: ${created.write_key}`);
          await this.refresh();
          await this.showSnippets(created.name);
        } catch (err) {
          if (!(err instanceof Unauthorised)) notice($("#sources-message"), err.message, true);
        }
      });
    },
    async refresh() {
      const list = await loadSources();
      const body = clear($("#sources-table tbody"));
      if (!list.length) body.appendChild(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "No sources yet.")));
      for (const src of list) {
        const key = h("span", { class: "key" + (src.write_key === this.fresh ? " fresh" : ""), "data-key": src.name }, src.write_key);
        body.appendChild(h("tr", { "data-source": src.name },
          h("td", {}, src.name),
          h("td", {}, key, " ", copyButton(() => src.write_key)),
          h("td", {}, src.enabled ? "yes" : h("span", { class: "badge fail" }, "disabled")),
          h("td", { class: "num" },
            h("button", { type: "button", class: "small", onclick: () => this.showSnippets(src.name) }, "Install snippets"), " ",
            h("button", { type: "button", class: "small", onclick: () => this.rotate(src.name) }, "Rotate key"))));
      }
    },
    async rotate(name) {
      if (!window.confirm(`Rotate the write key of “${name}”? Clients using the old key will be refused.`)) return;
      try {
        const result = await api(`/api/sources/${encodeURIComponent(name)}/rotate`, { method: "POST" });
        this.fresh = result.write_key;
        notice($("#sources-message"), `New write key for “${name}”: ${result.write_key}`);
        await this.refresh();
        if (!$("#snippets").hidden) await this.showSnippets(name);
      } catch (err) {
        if (!(err instanceof Unauthorised)) notice($("#sources-message"), err.message, true);
      }
    },
    async showSnippets(name) {
      const box = clear($("#snippets"));
      box.hidden = false;
      let data;
      try {
        data = await api(`/api/sources/${encodeURIComponent(name)}/snippets`);
      } catch (err) {
        box.appendChild(errorBox(err));
        return;
      }
      const names = Object.keys(data.snippets);
      const pre = h("pre", { id: "snippet-code" });
      const tabs = h("div", { class: "snippet-tabs" });
      let current = names[0];
      const select = (label) => {
        current = label;
        pre.textContent = data.snippets[label];
        for (const b of tabs.children) b.classList.toggle("active", b.dataset.sdk === label);
      };
      for (const label of names) {
        tabs.appendChild(h("button", { type: "button", "data-sdk": label, onclick: () => select(label) }, label));
      }
      box.append(
        h("div", { class: "view-head" }, h("h2", {}, `Install snippets for “${name}”`),
          h("span", {}, copyButton(() => data.snippets[current]), " ",
            h("button", { type: "button", class: "small", onclick: () => { box.hidden = true; } }, "Close"))),
        tabs, pre);
      select(current);
    },
  };

  // ---------------------------------------------------------------- Live debugger
  const live = {
    interval: 0,
    source: null,
    paused: false,
    buffered: [],
    lastSeq: 0,
    lastRejection: 0,
    count: 0,
    retry: null,
    init() {
      $("#live-filters").addEventListener("submit", (e) => {
        e.preventDefault();
        this.clearList();
        this.lastSeq = 0;
        this.lastRejection = 0;
        this.connect();
      });
      $("#live-pause").addEventListener("click", () => this.togglePause());
      $("#live-clear").addEventListener("click", () => this.clearList());
    },
    filters() {
      return {
        source: $("#live-source").value,
        type: $("#live-type").value,
        event: $("#live-event").value.trim(),
        user: $("#live-user").value.trim(),
      };
    },
    show() {
      if (!this.source) this.connect();
    },
    hide() {
      this.disconnect();
    },
    connect() {
      this.disconnect();
      const params = this.filters();
      if (this.lastSeq) params.after = this.lastSeq;
      const es = new EventSource("/api/live" + qs(params));
      this.source = es;
      this.setState("connecting…");
      es.addEventListener("open", () => this.setState(this.paused ? "paused" : "live"));
      es.addEventListener("event", (m) => this.receive("event", JSON.parse(m.data)));
      es.addEventListener("rejection", (m) => this.receive("rejection", JSON.parse(m.data)));
      es.addEventListener("error", () => {
        if (es !== this.source) return;
        this.disconnect();
        this.setState("disconnected; retrying…");
        this.retry = setTimeout(async () => {
          this.retry = null;
          try {
            await api("/api/status");
          } catch (err) {
            if (err instanceof Unauthorised) return;
          }
          if (state.tab === "live") this.connect();
        }, 2000);
      });
    },
    disconnect() {
      if (this.retry) { clearTimeout(this.retry); this.retry = null; }
      if (this.source) { this.source.close(); this.source = null; }
    },
    setState(text) { $("#live-state").textContent = text; },
    receive(kind, item) {
      if (kind === "event") {
        if (item.seq <= this.lastSeq) return;
        this.lastSeq = item.seq;
      } else {
        if (item.id <= this.lastRejection) return;
        this.lastRejection = item.id;
      }
      if (this.paused) {
        this.buffered.push([kind, item]);
        if (this.buffered.length > LIVE_MAX) this.buffered.shift();
        $("#live-pause").textContent = `Resume (${this.buffered.length} new)`;
        return;
      }
      this.add(kind, item, true);
    },
    togglePause() {
      this.paused = !this.paused;
      if (this.paused) {
        $("#live-pause").textContent = "Resume";
        this.setState("paused");
      } else {
        $("#live-pause").textContent = "Pause";
        this.setState(this.source ? "live" : "connecting…");
        for (const [kind, item] of this.buffered) this.add(kind, item, false);
        this.buffered = [];
      }
    },
    clearList() {
      clear($("#live-list"));
      this.buffered = [];
      this.count = 0;
      $("#live-count").textContent = "0";
      clear($("#live-detail")).appendChild(h("p", { class: "muted" }, "Click an event to see its full payload."));
    },
    add(kind, item, flash) {
      const list = $("#live-list");
      let li;
      if (kind === "event") {
        const ev = item.event || {};
        const type = ev.type || "?";
        const title = ev.event || ev.name || (type === "identify" ? "identify" : type);
        const when = Date.parse(ev.receivedAt || ev.timestamp || "") || Date.now();
        li = h("li", { class: "entry" + (flash ? " new" : ""), "data-kind": "event", "data-seq": item.seq },
          h("span", { class: "time", title: ev.timestamp || "" }, fmtTime(when)),
          h("span", {}, h("span", { class: `badge ${type}` }, type)),
          h("span", { class: "what", title }, title, item.bot ? h("span", { class: "muted" }, " · bot") : null),
          h("span", { class: "who", title: ev.userId || ev.anonymousId || "" }, `${item.source} · ${ev.userId || ev.anonymousId || "–"}`));
      } else {
        li = h("li", { class: "entry rejection" + (flash ? " new" : ""), "data-kind": "rejection" },
          h("span", { class: "time" }, fmtTime(item.received_ms)),
          h("span", {}, h("span", { class: "badge refused" }, `refused ${item.status}`)),
          h("span", { class: "what", title: item.message }, `${item.code}: ${item.message}`),
          h("span", { class: "who" }, `${item.source || "?"} · ${item.path}`));
      }
      li.addEventListener("click", () => {
        for (const el of list.querySelectorAll("li.selected")) el.classList.remove("selected");
        li.classList.add("selected");
        this.detail(kind, item);
      });
      list.insertBefore(li, list.firstChild);
      while (list.children.length > LIVE_MAX) list.removeChild(list.lastChild);
      this.count = list.children.length;
      $("#live-count").textContent = String(this.count);
    },
    detail(kind, item) {
      const box = clear($("#live-detail"));
      if (kind === "event") {
        const ev = item.event || {};
        const enrichment = item.enrichment || {};
        box.append(
          h("h2", {}, ev.event || ev.name || ev.type),
          h("dl", {},
            h("dt", {}, "source"), h("dd", {}, item.source),
            h("dt", {}, "type"), h("dd", {}, ev.type),
            h("dt", {}, "messageId"), h("dd", { class: "mono" }, ev.messageId || "–"),
            h("dt", {}, "userId"), h("dd", {}, ev.userId || "–"),
            h("dt", {}, "anonymousId"), h("dd", {}, ev.anonymousId || "–"),
            h("dt", {}, "timestamp"), h("dd", {}, ev.timestamp || "–"),
            h("dt", {}, "browser / OS / device"),
            h("dd", {}, [enrichment.browser, enrichment.os, enrichment.device].map((x) => x || "–").join(" / ")),
            h("dt", {}, "bot"), h("dd", {}, item.bot ? "yes" : "no"),
            (item.warnings || []).length ? [h("dt", {}, "warnings"), h("dd", {}, item.warnings.join(", "))] : null),
          h("div", { class: "view-head" }, h("h3", {}, "Payload with enrichment"), copyButton(() => json(item))),
          h("pre", { id: "live-payload" }, json(item)));
      } else {
        box.append(
          h("h2", {}, `Refused: ${item.code}`),
          h("dl", {},
            h("dt", {}, "reason"), h("dd", {}, item.message),
            h("dt", {}, "field"), h("dd", {}, item.field || "–"),
            h("dt", {}, "status"), h("dd", {}, String(item.status)),
            h("dt", {}, "path"), h("dd", {}, item.path),
            h("dt", {}, "source"), h("dd", {}, item.source || "–"),
            h("dt", {}, "received"), h("dd", {}, fmtDateTime(item.received_ms))),
          h("h3", {}, "Request body"),
          h("pre", { id: "live-payload" }, prettyBody(item.body)));
      }
    },
  };

  // ---------------------------------------------------------------- Volumes
  const RANGES = {
    "1h": { ms: 3600000, bucket: "minute" },
    "24h": { ms: 86400000, bucket: "hour" },
    "7d": { ms: 7 * 86400000, bucket: "hour" },
    "30d": { ms: 30 * 86400000, bucket: "day" },
  };

  const volumes = {
    interval: 15000,
    init() {
      $("#volumes-form").addEventListener("submit", (e) => { e.preventDefault(); this.refresh(); });
      $("#volumes-breakdown").addEventListener("change", () => {
        $("#volumes-custom").hidden = $("#volumes-breakdown").value !== "custom";
      });
    },
    async show() { await loadKnownEvents(); },
    async refresh() {
      const range = RANGES[$("#volumes-range").value];
      const until = Date.now();
      const since = until - range.ms;
      let breakdown = $("#volumes-breakdown").value;
      if (breakdown === "custom") breakdown = $("#volumes-custom").value.trim();
      const chartBox = $("#volumes-chart");
      const current = ticket("volumes");
      let data;
      try {
        data = await api("/api/insights/counts" + qs({
          since: new Date(since).toISOString(), until: new Date(until).toISOString(), bucket: range.bucket,
          source: $("#volumes-source").value, event: $("#volumes-event").value.trim(), breakdown,
        }));
      } catch (err) {
        if (current() && !(err instanceof Unauthorised)) clear(chartBox).appendChild(errorBox(err));
        return;
      }
      if (!current()) return;
      const names = [];
      const byName = new Map();
      const seen = new Set();
      for (const row of data.series) {
        const t = Date.parse(row.bucket);
        const name = breakdown ? (row.value === null ? "(none)" : String(row.value)) : "all events";
        if (!byName.has(name)) { byName.set(name, new Map()); names.push(name); }
        byName.get(name).set(t, row.events);
        seen.add(t);
      }
      const xs = bucketPositions(since, until, range.bucket, seen);
      const series = names.map((name, i) => ({
        name, color: PALETTE[i % PALETTE.length], values: xs.map((x) => byName.get(name).get(x) || 0),
      }));
      series.sort((a, b) => b.values.reduce((p, q) => p + q, 0) - a.values.reduce((p, q) => p + q, 0));
      series.forEach((x, i) => { x.color = PALETTE[i % PALETTE.length]; });
      clear(chartBox);
      if (!series.length) {
        chartBox.appendChild(h("p", { class: "muted" }, "No events in this range."));
      } else {
        chartBox.append(timeChart(chartBox, xs, series, bucketLabel(range.bucket)), legend(series));
      }
      const body = clear($("#volumes-table tbody"));
      for (const x of series) {
        body.appendChild(h("tr", {}, h("td", {}, h("span", { class: "legend" }, h("span", { style: `--c:${x.color}` }, x.name))),
          h("td", { class: "num" }, fmtInt(x.values.reduce((a, b) => a + b, 0)))));
      }
    },
  };

  // ---------------------------------------------------------------- Insights
  const insightsTab = {
    interval: 30000,
    ran: false,
    init() {
      $("#funnel-add").addEventListener("click", () => this.addStep(""));
      $("#funnel-form").addEventListener("submit", (e) => { e.preventDefault(); this.funnel(); });
      $("#users-form").addEventListener("submit", (e) => { e.preventDefault(); this.users(); });
      $("#retention-form").addEventListener("submit", (e) => { e.preventDefault(); this.retention(); });
      this.addStep("");
      this.addStep("");
    },
    addStep(value) {
      const list = $("#funnel-steps");
      if (list.children.length >= 10) return;
      const input = h("input", { list: "known-events", placeholder: "event name", value, class: "funnel-step" });
      const li = h("li", {}, input, " ",
        h("button", { type: "button", class: "small", onclick: () => {
          if (list.children.length > 2) li.remove();
        } }, "Remove"));
      list.appendChild(li);
      $("#funnel-add").disabled = list.children.length >= 10;
    },
    async show() {
      const events = await loadKnownEvents();
      const inputs = [...document.querySelectorAll("#funnel-steps input")];
      if (inputs.every((x) => !x.value) && events.length >= 2) {
        inputs[0].value = events[0];
        inputs[1].value = events[1];
      }
      if (!this.ran) {
        this.ran = true;
        await this.refresh();
      }
    },
    async refresh() {
      await Promise.all([this.funnel(), this.users(), this.retention()]);
    },
    async funnel() {
      const box = $("#funnel-chart");
      const steps = [...document.querySelectorAll("#funnel-steps input")].map((x) => x.value.trim()).filter(Boolean);
      if (steps.length < 2) {
        clear(box).appendChild(h("p", { class: "muted" }, "Name at least two steps."));
        return;
      }
      const within = Math.max(1, Number($("#funnel-within").value) || 1) * Number($("#funnel-unit").value);
      const days = Math.max(1, Number($("#funnel-days").value) || 7);
      const current = ticket("funnel");
      let data;
      try {
        data = await api("/api/insights/funnel" + qs({ steps: steps.join(","), within_seconds: within, days }));
      } catch (err) {
        if (current() && !(err instanceof Unauthorised)) clear(box).appendChild(errorBox(err));
        return;
      }
      if (!current()) return;
      clear(box).appendChild(funnelChart(box, data.steps));
    },
    async users() {
      const box = $("#users-chart");
      const days = Math.max(1, Number($("#users-days").value) || 30);
      const current = ticket("users");
      let data;
      try {
        data = await api("/api/insights/users" + qs({ bucket: "day", days, event: $("#users-event").value.trim() }));
      } catch (err) {
        if (current() && !(err instanceof Unauthorised)) clear(box).appendChild(errorBox(err));
        return;
      }
      if (!current()) return;
      const until = Date.now();
      const byDay = new Map(data.series.map((r) => [Date.parse(r.bucket), r.users]));
      const xs = bucketPositions(until - days * 86400000, until, "day", new Set(byDay.keys()));
      const series = [{ name: "unique users", color: PALETTE[0], values: xs.map((x) => byDay.get(x) || 0) }];
      clear(box).append(
        h("p", {}, h("span", { class: "big", id: "users-total" }, fmtInt(data.total)),
          h("span", { class: "muted" }, ` unique users in the last ${days} days`)),
        timeChart(box, xs, series, bucketLabel("day")));
    },
    async retention() {
      const box = $("#retention-table");
      const current = ticket("retention");
      let data;
      try {
        data = await api("/api/insights/retention" + qs({
          start_event: $("#retention-start").value.trim(), return_event: $("#retention-return").value.trim(),
          bucket: $("#retention-bucket").value, periods: $("#retention-periods").value,
          days: Math.max(1, Number($("#retention-days").value) || 56),
        }));
      } catch (err) {
        if (current() && !(err instanceof Unauthorised)) clear(box).appendChild(errorBox(err));
        return;
      }
      if (!current()) return;
      clear(box);
      if (!data.cohorts.length) {
        box.appendChild(h("p", { class: "muted" }, "No people in this range."));
        return;
      }
      const head = h("tr", {}, h("th", {}, "Cohort"), h("th", { class: "num" }, "People"));
      for (let k = 0; k <= data.periods; k++) head.appendChild(h("th", { class: "num" }, `${data.bucket} ${k}`));
      const body = h("tbody");
      for (const c of data.cohorts) {
        const d = new Date(Date.parse(c.cohort));
        const row = h("tr", {}, h("td", {}, `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`),
          h("td", { class: "num" }, fmtInt(c.size)));
        c.rates.forEach((rate, k) => {
          const alpha = (0.08 + 0.8 * rate).toFixed(2);
          row.appendChild(h("td", {
            class: "cell", title: `${fmtInt(c.retained[k])} of ${fmtInt(c.size)}`,
            style: rate ? `background: rgba(31,111,235,${alpha}); color:${rate > 0.55 ? "#fff" : "inherit"}` : "",
          }, rate ? fmtPct(rate, 0) : "·"));
        });
        body.appendChild(row);
      }
      box.appendChild(h("table", { class: "grid retention" }, h("thead", {}, head), body));
    },
  };

  function funnelChart(box, steps) {
    const W = chartWidth(box), rowH = 44, L = Math.min(190, W * 0.3), R = Math.min(300, W * 0.4);
    const H = steps.length * rowH + 10;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "funnel" });
    const first = steps.length ? steps[0].people : 0;
    steps.forEach((step, i) => {
      const y = 6 + i * rowH;
      const width = first ? ((W - L - R) * step.people) / first : 0;
      svg.appendChild(s("text", { x: L - 10, y: y + 22, "text-anchor": "end", class: "label" },
        `${step.step}. ${step.event.length > 24 ? step.event.slice(0, 23) + "…" : step.event}`));
      svg.appendChild(s("rect", { x: L, y: y + 6, width: W - L - R, height: 26, fill: "#eef2f8", rx: 3 }));
      const bar = s("rect", { x: L, y: y + 6, width: Math.max(width, step.people ? 2 : 0), height: 26, fill: PALETTE[0], rx: 3, class: "funnel-bar" });
      bar.appendChild(s("title", {}, `${step.event}: ${step.people} people`));
      svg.appendChild(bar);
      const note = i === 0
        ? `${fmtInt(step.people)} people`
        : `${fmtInt(step.people)} · ${fmtPct(step.conversion_from_start)} of start · ${fmtPct(step.conversion_from_previous)} of previous`;
      svg.appendChild(s("text", { x: W - R + 10, y: y + 24, class: "label" }, note));
    });
    return svg;
  }

  // ---------------------------------------------------------------- Delivery
  function stat(label, value, bad) {
    return h("div", { class: "stat" + (bad ? " bad" : "") }, h("div", { class: "n" }, fmtInt(value)), h("div", { class: "l" }, label));
  }

  function sum(obj) {
    return Object.values(obj || {}).reduce((a, b) => a + b, 0);
  }

  function samplesBlock(title, samples) {
    if (!samples || !samples.length) return null;
    return h("details", {}, h("summary", {}, `${title} (${samples.length} sample${samples.length === 1 ? "" : "s"})`),
      samples.slice(0, 10).map((x) => h("pre", {}, typeof x === "string" ? prettyBody(x) : json(x))));
  }

  const delivery = {
    interval: 5000,
    async refresh() {
      let data;
      try {
        data = await api("/api/destinations");
      } catch (err) {
        if (!(err instanceof Unauthorised)) clear($("#delivery-source")).appendChild(errorBox(err));
        return;
      }
      const src = data.source;
      const rejected = sum(src.rejected_at_ingest);
      const sourceBox = clear($("#delivery-source"));
      sourceBox.append(
        h("h2", {}, "At the source"),
        h("div", { class: "flow" },
          stat("received (read from the log)", src.received),
          stat("rejected at ingest", rejected, rejected > 0),
          stat("filtered at source (duplicates)", sum(src.filtered_at_source)),
          stat("stored", src.stored)));
      if (rejected) {
        sourceBox.appendChild(h("div", { class: "panel" }, h("h3", {}, "Rejected at ingest, by reason"),
          Object.entries(src.rejected_at_ingest).map(([code, n]) => h("div", {},
            h("strong", {}, `${code}: ${fmtInt(n)}`),
            samplesBlock("requests", (src.rejected_samples[code] || []).map((r) => `${r.status} ${r.message}\n${prettyBody(r.body)}`))))));
      }
      const box = clear($("#delivery-destinations"));
      box.appendChild(h("h2", {}, "Per destination"));
      if (!data.destinations.length) {
        box.appendChild(h("p", { class: "muted" }, "No enabled destination. Add one under [[destinations]] in headwater.toml."));
        return;
      }
      const table = h("table", { class: "grid", id: "delivery-table" },
        h("thead", {}, h("tr", {}, ["Destination", "Kind", "Received", "Rejected at ingest", "Filtered at source",
          "Filtered at destination", "Failed", "Retried", "Dead-lettered", "Delivered", "Pending"].map((x, i) => h("th", { class: i > 1 ? "num" : "" }, x)))),
        h("tbody", {}, data.destinations.map((d) => h("tr", { "data-destination": d.name },
          h("td", {}, h("strong", {}, d.name)), h("td", {}, d.kind),
          h("td", { class: "num" }, fmtInt(d.received)),
          h("td", { class: "num" }, fmtInt(rejected)),
          h("td", { class: "num" }, fmtInt(sum(src.filtered_at_source))),
          h("td", { class: "num" }, fmtInt(sum(d.filtered_at_destination))),
          h("td", { class: "num" }, fmtInt(d.failed)),
          h("td", { class: "num" }, fmtInt(d.retried)),
          h("td", { class: "num" }, fmtInt(d.dead_lettered)),
          h("td", { class: "num" }, fmtInt(d.delivered)),
          h("td", { class: "num" }, fmtInt(d.pending))))));
      box.appendChild(table);
      for (const d of data.destinations) {
        const reasons = d.discard_reasons || [];
        const filtered = Object.entries(d.filtered_at_destination || {});
        if (!reasons.length && !filtered.length && !d.last_error) continue;
        box.appendChild(h("div", { class: "panel" },
          h("h3", {}, d.name),
          d.last_error ? h("p", { class: "notice bad" }, `Last error: ${d.last_error}`) : null,
          filtered.length ? h("div", {}, h("strong", {}, "Filtered at destination"),
            filtered.map(([reason, n]) => h("div", {}, `${reason}: ${fmtInt(n)}`,
              samplesBlock("events", (d.filtered_samples || {})[reason])))) : null,
          reasons.length ? h("div", {}, h("strong", {}, "Discard reasons (dead letters)"),
            reasons.map((r) => h("div", { class: "discard" }, h("div", {}, r.reason), samplesBlock("payloads", r.samples)))) : null));
      }
    },
  };

  // ---------------------------------------------------------------- Dead letters
  const deadletters = {
    interval: 15000,
    letters: [],
    open: new Set(),
    init() {
      $("#dead-destination").addEventListener("change", () => this.refresh());
      $("#dead-all").addEventListener("change", (e) => {
        for (const box of document.querySelectorAll("#dead-table tbody input[type=checkbox]")) box.checked = e.target.checked;
      });
      $("#dead-replay-selected").addEventListener("click", () => {
        const ids = new Set([...document.querySelectorAll("#dead-table tbody input:checked")].map((x) => Number(x.value)));
        this.replay(this.letters.filter((l) => ids.has(l.id)));
      });
      $("#dead-replay-all").addEventListener("click", () => this.replay(this.letters));
    },
    async refresh() {
      const current = ticket("deadletters");
      let data;
      let destinations;
      try {
        [data, destinations] = await Promise.all([
          api("/api/deadletters" + qs({ destination: $("#dead-destination").value })),
          api("/api/destinations"),
        ]);
      } catch (err) {
        if (current() && !(err instanceof Unauthorised)) notice($("#dead-message"), err.message, true);
        return;
      }
      if (!current()) return;
      const select = $("#dead-destination");
      const chosen = select.value;
      clear(select).appendChild(h("option", { value: "" }, "all destinations"));
      for (const d of destinations.destinations) select.appendChild(h("option", { value: d.name }, d.name));
      select.value = chosen;
      const checked = new Set([...document.querySelectorAll("#dead-table tbody input:checked")].map((x) => Number(x.value)));
      this.letters = data.dead_letters;
      const body = clear($("#dead-table tbody"));
      if (!this.letters.length) {
        body.appendChild(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No dead letters.")));
      }
      for (const l of this.letters) {
        const row = h("tr", { class: "clickable", "data-id": l.id },
          h("td", {}, h("input", { type: "checkbox", value: String(l.id), checked: checked.has(l.id), onclick: (e) => e.stopPropagation() })),
          h("td", {}, l.destination), h("td", { class: "mono" }, l.message_id), h("td", {}, l.reason),
          h("td", { class: "num" }, fmtInt(l.attempts)), h("td", {}, l.last_status === null ? "–" : String(l.last_status)),
          h("td", {}, fmtDateTime(l.dead_ms)));
        const detail = h("tr", { class: "expanded", hidden: !this.open.has(l.id) },
          h("td", { colspan: 7 },
            l.last_response ? [h("h3", {}, "Last response"), h("pre", {}, prettyBody(String(l.last_response)))] : null,
            h("h3", {}, "Event"), h("pre", {}, json(l.event))));
        row.addEventListener("click", () => {
          detail.hidden = !detail.hidden;
          if (detail.hidden) this.open.delete(l.id); else this.open.add(l.id);
        });
        body.append(row, detail);
      }
    },
    async replay(letters) {
      if (!letters.length) {
        notice($("#dead-message"), "Nothing to replay.");
        return;
      }
      const byDestination = new Map();
      for (const l of letters) {
        if (!byDestination.has(l.destination)) byDestination.set(l.destination, []);
        byDestination.get(l.destination).push(l.id);
      }
      let delivered = 0, failed = 0;
      try {
        for (const [destination, ids] of byDestination) {
          const result = await api("/api/deadletters/replay", { method: "POST", body: { destination, ids } });
          delivered += result.delivered;
          failed += result.failed;
        }
      } catch (err) {
        if (!(err instanceof Unauthorised)) notice($("#dead-message"), err.message, true);
        return;
      }
      notice($("#dead-message"), `Replayed: ${delivered} delivered, ${failed} failed again.`, failed > 0);
      $("#dead-all").checked = false;
      await this.refresh();
    },
  };

  // ---------------------------------------------------------------- Success metrics
  const LEVELS = [
    ["north_star", "North star"],
    ["core", "Core metrics"],
    ["indicator", "Supporting indicators"],
    ["risk", "Risk factors"],
  ];

  function fmtValue(value, unit) {
    if (value === null || value === undefined) return "–";
    if (unit === "ratio") return fmtPct(value, value > 0.999 && value < 1 ? 2 : 1);
    if (unit === "seconds") {
      if (!Number.isFinite(value)) return "∞";
      return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
    }
    return `${fmtInt(Math.round(value * 100) / 100)} ${unit}`;
  }

  function trendNode(m) {
    if (m.trend === null || m.trend === undefined) return h("span", { class: "trend" }, "no previous period");
    if (m.trend === 0) return h("span", { class: "trend" }, "→ unchanged");
    const up = m.trend > 0;
    const good = m.target === null ? null : (up === (m.better === "higher"));
    const cls = good === null ? "trend" : good ? "trend good" : "trend bad";
    const size = Math.abs(m.trend);
    const delta = m.unit === "ratio" ? `${(size * 100).toFixed(1)} pts`
      : m.unit === "seconds" ? fmtValue(size, "seconds") : fmtInt(Math.round(size * 100) / 100);
    return h("span", { class: cls, title: `previous: ${fmtValue(m.previous, m.unit)}` },
      `${up ? "↑" : "↓"} ${delta} vs previous`);
  }

  function metricCard(m) {
    const status = m.status === "no data" ? "nodata" : m.status;
    const target = m.target === null || m.target === undefined
      ? "no target" : `target ${m.better === "higher" ? "≥" : "≤"} ${fmtValue(m.target, m.unit)}`;
    const details = Object.entries(m.details || {}).filter(([, v]) => v !== null && !(Array.isArray(v) && !v.length) && !(typeof v === "object" && !Array.isArray(v) && !Object.keys(v).length));
    return h("div", { class: `metric ${m.status === "no data" ? "" : m.status}${m.level === "north_star" ? " north" : ""}`, "data-metric": m.id },
      h("div", { class: "row" }, h("span", { class: "name" }, m.name), h("span", { class: `badge ${status}` }, m.status)),
      h("div", { class: "value" }, fmtValue(m.value, m.unit)),
      h("div", { class: "meta" }, h("span", {}, target), trendNode(m)),
      h("p", { class: "def" }, m.definition),
      details.length ? h("details", {}, h("summary", { class: "muted" }, "details"), h("pre", {}, json(Object.fromEntries(details)))) : null);
  }

  const reportTab = {
    interval: 30000,
    async refresh() {
      let data;
      const box = $("#report");
      try {
        data = await api("/api/report");
      } catch (err) {
        if (!(err instanceof Unauthorised)) clear(box).appendChild(errorBox(err));
        return;
      }
      $("#report-period").textContent = `last ${data.period_hours} h, compared with the ${data.period_hours} h before · as of ${fmtDateTime(data.until_ms)}`;
      clear(box);
      const tally = {};
      for (const m of data.metrics) tally[m.status] = (tally[m.status] || 0) + 1;
      box.appendChild(h("p", { class: "summary", id: "report-summary" },
        ["ok", "warn", "fail", "info", "no data"].filter((k) => tally[k]).map((k) =>
          h("span", { class: `badge ${k === "no data" ? "nodata" : k}` }, `${tally[k]} ${k}`))));
      for (const [level, title] of LEVELS) {
        const metrics = data.metrics.filter((m) => m.level === level);
        if (!metrics.length) continue;
        const section = h("section", { class: "level", "data-level": level }, h("h2", {}, title));
        if (level === "indicator") {
          const groups = new Map();
          for (const m of metrics) {
            if (!groups.has(m.stakeholder)) groups.set(m.stakeholder, []);
            groups.get(m.stakeholder).push(m);
          }
          for (const [who, list] of groups) {
            section.append(h("div", { class: "stakeholder" }, `for ${who}`), h("div", { class: "metric-grid" }, list.map(metricCard)));
          }
        } else {
          section.appendChild(h("div", { class: "metric-grid" }, metrics.map(metricCard)));
        }
        box.appendChild(section);
      }
      const anomalies = data.anomalies || [];
      box.appendChild(h("section", { class: "level", id: "anomalies" }, h("h2", {}, "Anomalies"),
        anomalies.length
          ? h("ul", { class: "anomalies" }, anomalies.map((a) => h("li", {},
            h("span", { class: `badge ${a.direction === "spike" ? "warn" : "fail"}` }, a.direction), " ",
            `${a.kind === "rejections" ? "rejections" : `“${a.subject}”`}: ${fmtInt(a.last_hour)} in the last hour against an hourly mean of ${a.hourly_mean} (z = ${a.z})`)))
          : h("p", { class: "muted" }, "None: every event's volume and the rejection rate are within their usual hourly pattern.")));
    },
  };

  // ---------------------------------------------------------------- status line
  async function refreshStatus() {
    try {
      const st = await api("/api/status");
      const total = (st.sources || []).reduce((a, b) => a + (b.events || 0), 0);
      $("#status-line").textContent = `${fmtInt(total)} events stored · pipeline lag ${fmtInt(st.log.lag_events)}`;
    } catch (err) {
      if (!(err instanceof Unauthorised)) $("#status-line").textContent = "status unavailable";
    }
  }

  // ---------------------------------------------------------------- navigation
  const TABS = { sources, live, volumes, insights: insightsTab, delivery, deadletters, report: reportTab };

  async function activate(name) {
    if (!TABS[name]) name = "sources";
    const previous = state.tab ? TABS[state.tab] : null;
    if (previous && state.tab !== name && previous.hide) previous.hide();
    state.tab = name;
    for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === name);
    for (const key of Object.keys(TABS)) $(`#view-${key}`).hidden = key !== name;
    if (state.timer) { clearInterval(state.timer); state.timer = null; }
    const tab = TABS[name];
    refreshStatus();
    try {
      if (name !== "sources") await loadSources();
      if (tab.show) await tab.show();
      if (tab.refresh && !(name === "insights")) await tab.refresh();
    } catch (err) {
      if (!(err instanceof Unauthorised)) console.error(err);
    }
    if (tab.interval && tab.refresh) {
      let busy = false;
      state.timer = setInterval(async () => {
        if (busy || document.hidden || !$("#auto-refresh").checked || state.tab !== name) return;
        busy = true;
        try { await tab.refresh(); } catch (err) { /* shown by the tab */ } finally { busy = false; }
      }, tab.interval);
    }
  }

  let statusTimer = null;

  function showLogin(message) {
    state.signedIn = false;
    live.disconnect();
    if (state.timer) { clearInterval(state.timer); state.timer = null; }
    if (statusTimer) { clearInterval(statusTimer); statusTimer = null; }
    for (const key of Object.keys(TABS)) $(`#view-${key}`).hidden = true;
    $("#tabs").hidden = true;
    $("#top-right").hidden = true;
    $("#login").hidden = false;
    $("#login-error").textContent = message || "";
    $("#login-token").focus();
  }

  async function start() {
    state.signedIn = true;
    $("#login").hidden = true;
    $("#tabs").hidden = false;
    $("#top-right").hidden = false;
    refreshStatus();
    statusTimer = setInterval(() => { if (!document.hidden) refreshStatus(); }, 10000);
    await activate(location.hash.slice(1));
  }

  function boot() {
    for (const tab of Object.values(TABS)) if (tab.init) tab.init();
    $("#login-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const token = $("#login-token").value;
      try {
        await api("/api/login", { method: "POST", body: { token } });
      } catch (err) {
        $("#login-error").textContent = err.message === "token: not the admin token" ? "That is not the admin token." : err.message;
        return;
      }
      $("#login-token").value = "";
      await start();
    });
    $("#sign-out").addEventListener("click", async () => {
      try { await api("/api/logout", { method: "POST" }); } catch (err) { /* signed out anyway */ }
      showLogin("Signed out.");
    });
    window.addEventListener("hashchange", () => { if (state.signedIn) activate(location.hash.slice(1)); });
    fetch("/api/status", { credentials: "same-origin" }).then((r) => {
      if (r.status === 401) showLogin("");
      else start();
    }, () => showLogin("The console API is unreachable."));
  }

  boot();
})();
