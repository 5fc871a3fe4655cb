// The asp console: reads GET /v1/cluster/stream (server-sent events, through fetch so
// that a bearer token can go with it) and draws what every member says of itself.
// No framework, no build step: this file is served as it is, from the binary.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
// Per pair of nodes, when this page last saw their vectors equal.
const lastInSync = new Map();
// Per namespace, its key counts (GET /v1/ns/{ns}/stats), refreshed every 15 s.
const stats = new Map();
// Per leader namespace, its leases (GET /v1/ns/{ns}/leases), refreshed with the counts.
const leases = new Map();
let statsAsked = 0;
let token = sessionStorage.getItem("asp-token") || "";
let stream = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function s(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function table(el, head, rows, numeric = []) {
  el.replaceChildren(
    h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { class: numeric.includes(i) ? "num" : null }, c)))),
    h("tbody", {}, rows.length
      ? rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: numeric.includes(i) ? "num" : null }, c))))
      : h("tr", {}, h("td", { colspan: head.length, class: "note" }, "none"))),
  );
}

const short = (id) => (id ? String(id).slice(0, 8) : "?");
const stateCell = (st) => h("span", { class: "state-" + st }, st);
function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1000) return v + " ms";
  if (v < 120000) return (v / 1000).toFixed(1) + " s";
  if (v < 7200000) return (v / 60000).toFixed(1) + " min";
  return (v / 3600000).toFixed(1) + " h";
}
function bytes(v) {
  if (v === null || v === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v) + " " + u[i];
}
function bar(fraction) {
  const inner = h("span");
  inner.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%";
  return h("span", { class: "bar" }, inner);
}

// Dots of one origin as [from, to] ranges: how many of a's are not in b.
function rangesMinus(a, b) {
  let n = 0;
  for (const [lo, hi] of a) {
    let covered = 0;
    for (const [blo, bhi] of b) {
      const from = Math.max(lo, blo), to = Math.min(hi, bhi);
      if (from <= to) covered += to - from + 1;
    }
    n += hi - lo + 1 - covered;
  }
  return n;
}

// Events node a holds that node b lacks, over every namespace and origin.
function lacking(a, b) {
  let n = 0;
  const bns = new Map((b.namespaces || []).map((x) => [x.name, x]));
  for (const ns of a.namespaces || []) {
    if (ns.name === "_asp.audit") continue; // each node's own, never replicated
    const other = bns.get(ns.name);
    const borigins = new Map(((other && other.origins) || []).map((o) => [o.origin, o.ranges]));
    for (const o of ns.origins || []) n += rangesMinus(o.ranges || [], borigins.get(o.origin) || []);
  }
  return n;
}

function drawTopology(nodes) {
  const svg = $("topology");
  svg.replaceChildren();
  const w = 360, hgt = 300, r = 110, cx = w / 2, cy = hgt / 2;
  const pos = new Map();
  nodes.forEach((n, i) => {
    const a = (2 * Math.PI * i) / nodes.length - Math.PI / 2;
    pos.set(n.node_id, [cx + r * Math.cos(a), cy + r * Math.sin(a)]);
  });
  const drawn = new Set();
  for (const n of nodes) {
    const peers = (n.status && n.status.replication && n.status.replication.peers) || [];
    for (const p of peers) {
      if (!p.node_id || !pos.has(p.node_id) || p.state !== "active") continue;
      const key = [n.node_id, p.node_id].sort().join("-");
      if (drawn.has(key)) continue;
      drawn.add(key);
      const [x1, y1] = pos.get(n.node_id), [x2, y2] = pos.get(p.node_id);
      const lag = (p.namespaces || []).reduce((m, x) => Math.max(m, x.lag_events || 0), 0);
      svg.append(s("line", { x1, y1, x2, y2, stroke: lag ? "#b7791f" : "#2b6cb0", "stroke-width": 2 }));
      svg.append(s("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle", "font-size": 11, fill: "#5d6677" }, "lag " + lag));
    }
  }
  for (const n of nodes) {
    const [x, y] = pos.get(n.node_id);
    const color = n.error ? "#c53030" : n.state === "alive" ? "#1f8a4c" : "#b7791f";
    svg.append(s("circle", { cx: x, cy: y, r: 22, fill: "#fff", stroke: color, "stroke-width": n.this_node ? 4 : 2 }));
    svg.append(s("text", { x, y: y + 4, "text-anchor": "middle", "font-size": 11, "font-family": "monospace" }, short(n.node_id)));
  }
}

let lastView = null;

function render(view) {
  lastView = view;
  const nodes = view.nodes || [];
  const up = nodes.filter((n) => n.status);
  $("where").textContent = "node " + short(view.node_id) + " · " + nodes.length + " members · " + new Date(view.generated_ms).toLocaleTimeString();
  drawTopology(nodes);

  table($("members"), ["node", "state", "API", "version", "uptime", "feed head", "events held", "peers", "error"],
    nodes.map((n) => {
      const st = n.status || {};
      const events = (st.namespaces || []).reduce((a, x) => a + (x.events || 0), 0);
      const peers = ((st.replication && st.replication.peers) || []).filter((p) => p.state === "active").length;
      return [h("code", {}, n.node_id + (n.this_node ? " (this)" : "")), stateCell(n.error ? "error" : n.state), n.api || "–",
        st.version || "–", st.uptime_s !== undefined ? ms(st.uptime_s * 1000) : "–",
        st.feed ? st.feed.head_seq : "–", n.status ? events : "–", n.status ? peers : "–", n.error || ""];
    }), [4, 5, 6, 7]);

  const lagRows = [];
  for (const n of up) {
    for (const p of (n.status.replication && n.status.replication.peers) || []) {
      for (const x of p.namespaces || []) {
        lagRows.push([h("code", {}, short(n.node_id)), h("code", {}, short(p.node_id)), stateCell(p.state), p.direction || "–", x.name,
          x.lag_events, ms(x.lag_ms), x.missing_events, p.events_sent, p.events_received, p.acked_seq]);
      }
    }
  }
  table($("lag"), ["node", "peer", "link", "direction", "namespace", "lag (events)", "lag (time)", "missing", "sent", "received", "acked seq"], lagRows, [5, 6, 7, 8, 9, 10]);

  const now = Date.now();
  const pairRows = [];
  for (let i = 0; i < up.length; i++) {
    for (let j = i + 1; j < up.length; j++) {
      const a = up[i], b = up[j];
      const ab = lacking(a.status, b.status), ba = lacking(b.status, a.status);
      const key = a.node_id + "-" + b.node_id;
      if (ab + ba === 0) lastInSync.set(key, now);
      const seen = lastInSync.get(key);
      pairRows.push([h("code", {}, short(a.node_id)), h("code", {}, short(b.node_id)), ab + ba, ab, ba,
        ab + ba === 0 ? h("span", { class: "state-alive" }, "in sync") : seen ? ms(now - seen) + " ago" : "not since this page opened"]);
    }
  }
  table($("pairs"), ["node a", "node b", "vector distance", "a has, b lacks", "b has, a lacks", "last in sync"], pairRows, [2, 3, 4]);

  // Per origin: each receiver's delays; the slowest receiver bounds "reached everyone".
  const origins = new Map();
  for (const n of up) {
    for (const d of (n.status.convergence && n.status.convergence.origins) || []) {
      if (!origins.has(d.origin)) origins.set(d.origin, []);
      origins.get(d.origin).push([n.node_id, d]);
    }
  }
  const reachRows = [...origins.entries()].sort().map(([origin, list]) => {
    const receivers = up.filter((n) => n.node_id !== origin).length;
    const p50 = Math.max(...list.map(([, d]) => d.p50_ms));
    const p99 = Math.max(...list.map(([, d]) => d.p99_ms));
    const max = Math.max(...list.map(([, d]) => d.max_ms));
    const writes = Math.max(...list.map(([, d]) => d.events));
    return [h("code", {}, short(origin)), writes, list.length + " of " + receivers, ms(p50), ms(p99), ms(max),
      list.map(([id, d]) => short(id) + ": " + ms(d.p50_ms) + " / " + ms(d.p99_ms)).join(", ")];
  });
  table($("reach"), ["origin", "writes (window)", "nodes reached", "to every node p50", "p99", "max", "per node (p50 / p99)"], reachRows, [1, 3, 4, 5]);

  const self = nodes.find((n) => n.this_node);
  const nsList = (self && self.status && self.status.namespaces) || [];
  if (Date.now() - statsAsked > 15000) {
    statsAsked = Date.now();
    refreshStats(nsList.slice(0, 50).map((x) => x.name),
      nsList.filter((x) => x.mode && x.mode.mode === "leader").slice(0, 50).map((x) => x.name));
  }
  table($("ns"), ["namespace", "policy", "mode", "residency", "keys", "with siblings", "deleted keys", "values", "events", "origins", "compacted", "stable events", "collection waits for"],
    nsList.map((x) => {
      const st = stats.get(x.name);
      const more = st && !st.complete ? "+" : "";
      const mode = x.mode && x.mode.mode ? x.mode.mode + (x.mode.leader ? " (" + short(x.mode.leader) + ")" : "") : "multi-master";
      const residency = x.residency ? Object.entries(x.residency).map(([k, v]) => k + "=" + v).join(", ") : "anywhere";
      const gc = x.tombstone_gc || {};
      return [x.name, x.policy || "–", mode, residency, st ? st.keys + more : "…", st ? (st.keys_with_siblings === null ? "–" : st.keys_with_siblings + more) : "…", st ? st.deleted_keys + more : "…",
        st ? bytes(st.value_bytes) + more : "…", x.events, (x.origins || []).length, x.compacted_events,
        gc.stable_events !== undefined ? gc.stable_events : "–", (gc.waiting_for || []).map(short).join(", ")];
    }), [4, 5, 6, 7, 8, 9, 10, 11]);

  const ops = [];
  for (const n of up) {
    const st = n.status;
    for (const p of (st.replication && st.replication.peers) || []) {
      const lag = (p.namespaces || []).reduce((a, x) => a + (x.lag_events || 0), 0);
      if (lag > 0) {
        const have = (st.namespaces || []).reduce((a, x) => a + (x.events || 0), 0);
        ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " catching up from ", h("code", {}, short(p.node_id)), ": ",
          bar(have / (have + lag)), " ", lag + " events to go"));
      }
      const receiving = p.reconcile && p.reconcile.receiving;
      if (receiving) {
        ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " receiving keys from ", h("code", {}, short(p.node_id)),
          " (reconciliation, or a bootstrap's transfer): " + receiving.keys + " so far, running " + ms(receiving.running_ms)));
      }
      const last = p.reconcile && p.reconcile.last;
      if (last) {
        ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " reconciliation with ", h("code", {}, short(p.node_id)), ": ",
          (p.reconcile.runs || 0) + " runs, " + (p.reconcile.keys_repaired || 0) + " keys repaired; last: " + JSON.stringify(last)));
      }
    }
    for (const o of st.operations || []) {
      ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " " + o.kind + ": ", bar(o.done / Math.max(1, o.total)), " ",
        (o.unit === "bytes" ? bytes(o.done) + " of " + bytes(o.total) : o.done + " of " + o.total + " " + o.unit) +
        ", running " + ms(Date.now() - o.started_unix_ms)));
    }
    if (st.scrub) {
      const done = st.scrub.finished_unix_ms;
      ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " last scrub: ", done ? bar(1) : bar(0), " ",
        (st.scrub.records || 0) + " records, " + bytes(st.scrub.bytes) + ", " + (st.scrub.damage || []).length + " damaged"));
    }
    if (st.recovery && (st.recovery.replayed_events || st.recovery.index_rebuilt || st.recovery.salvage)) {
      ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " recovery at start: " + st.recovery.replayed_events + " events replayed" +
        (st.recovery.index_rebuilt ? ", index rebuilt" : "") + (st.recovery.salvage ? ", salvaged" : "")));
    }
    const held = st.held;
    if (held && held.events) {
      ops.push(h("div", { class: "op" }, h("code", {}, short(n.node_id)), " holding " + held.events + " events from peers: ",
        bar(held.bytes / Math.max(1, held.bytes_max)), " " + bytes(held.bytes) + " of " + bytes(held.bytes_max)));
    }
    if (st.failure) ops.push(h("div", { class: "op error" }, short(n.node_id) + " storage failure: " + JSON.stringify(st.failure)));
  }
  $("ops").replaceChildren(...(ops.length ? ops : [h("p", { class: "note" }, "nothing running")]));

  const leaseRows = [];
  for (const [ns, list] of leases) {
    for (const l of list.leases || []) {
      leaseRows.push([ns, l.name, l.holder, l.token, stateCell(l.held ? "active" : l.released ? "released" : "expired"),
        l.held ? "in " + ms(Math.max(0, l.expires_ms - Date.now())) : "–", ms(l.ttl_ms)]);
    }
  }
  table($("leases"), ["namespace", "lease", "holder", "fencing token", "state", "expires", "time to live"], leaseRows, [3]);

  const conns = [];
  for (const n of up) {
    for (const c of n.status.connectors || []) {
      for (const side of ["in", "out"]) {
        const x = c[side];
        if (!x) continue;
        conns.push([h("code", {}, short(n.node_id)), c.name, c.kind, side, c.namespace, stateCell(x.state), x.lag, x.messages, x.errors, x.last_error || ""]);
      }
    }
  }
  table($("connectors"), ["node", "connector", "kind", "side", "namespace", "state", "lag", "messages", "errors", "last error"], conns, [6, 7, 8]);
}

// Counts keys per namespace on this node (a scan of its index: not every second).
async function refreshStats(names, leaderNames) {
  for (const name of names) {
    try {
      const res = await fetch("/v1/ns/" + encodeURIComponent(name) + "/stats", { headers: headers() });
      if (res.ok) stats.set(name, await res.json());
    } catch (_) { /* shown as unknown */ }
  }
  for (const name of leaderNames) {
    try {
      const res = await fetch("/v1/ns/" + encodeURIComponent(name) + "/leases", { headers: headers() });
      if (res.ok) leases.set(name, await res.json());
    } catch (_) { /* shown as unknown */ }
  }
  // Shown at once, not at the next event.
  if (lastView) render(lastView);
}

function headers(extra) {
  const hd = Object.assign({}, extra || {});
  if (token) hd.Authorization = "Bearer " + token;
  return hd;
}

function showError(text) {
  const e = $("error");
  e.hidden = !text;
  e.textContent = text || "";
}

async function errorText(res) {
  try {
    const body = await res.json();
    return res.status + " " + body.error.code + ": " + body.error.message;
  } catch (_) {
    return "HTTP " + res.status;
  }
}

// Reads the cluster stream; reconnects after a drop, asks for a token on 401.
async function follow() {
  const live = $("live");
  for (;;) {
    const ctrl = new AbortController();
    stream = ctrl;
    try {
      const res = await fetch("/v1/cluster/stream?interval_ms=1000", { headers: headers({ Accept: "text/event-stream" }), signal: ctrl.signal });
      if (res.status === 401 || res.status === 403) {
        $("token-form").hidden = false;
        showError(await errorText(res) + " — give a token (asp token create)");
        live.textContent = "needs a token";
        live.className = "badge off";
        return;
      }
      if (!res.ok) throw new Error(await errorText(res));
      live.textContent = "live";
      live.className = "badge on";
      showError("");
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "", name = "", data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let nl;
        while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
          if (line === "") {
            if (name === "cluster" && data.length) render(JSON.parse(data.join("\n")));
            name = ""; data = [];
          } else if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      showError("the stream failed: " + e.message + "; retrying");
    }
    live.textContent = "reconnecting…";
    live.className = "badge off";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function inspect(ev) {
  ev.preventDefault();
  const ns = $("inspect-ns").value, key = $("inspect-key").value;
  const out = $("inspect-out");
  const path = "/v1/ns/" + encodeURIComponent(ns) + "/kv/" + encodeURIComponent(key);
  try {
    // Asked as JSON: the node converts CBOR and MessagePack values.
    let res = await fetch(path, { headers: headers({ Accept: "application/json" }) });
    let raw = false;
    if (res.status === 406 || res.status === 415) {
      res = await fetch(path, { headers: headers() });
      raw = true;
    }
    // 300: a siblings namespace's key with concurrent values; the body lists them.
    if (!res.ok && res.status !== 300) {
      out.replaceChildren(h("p", { class: "error" }, await errorText(res)));
      return;
    }
    const type = res.headers.get("content-type") || "";
    const text = await res.text();
    let shown = text;
    if (!raw && type.startsWith("application/json")) {
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* as sent */ }
    }
    const rows = [["version", res.headers.get("etag") || "–"], ["content type", type]];
    if (res.status === 300) {
      try { rows.push(["siblings", String(JSON.parse(text).siblings.length)]); } catch (_) { /* shown below */ }
    }
    for (const [name, value] of res.headers.entries()) {
      if (name.startsWith("x-asp-")) rows.push([name, value]);
    }
    // The event that wrote the current value, from the feed: its dot and clock (gone
    // once compaction took it out of the feed).
    try {
      const nsPath = "/v1/ns/" + encodeURIComponent(ns);
      const list = await (await fetch(nsPath + "/kv?limit=1&prefix=" + encodeURIComponent(key), { headers: headers() })).json();
      const item = (list.items || []).find((i) => i.key === key);
      if (item && item.seq) {
        const page = await (await fetch(nsPath + "/changes?limit=1&since=" + (item.seq - 1), { headers: headers() })).json();
        const ev = (page.changes || []).find((c) => c.seq === item.seq && c.key === key);
        if (ev) {
          rows.push(["dot", ev.dot.counter + " of " + ev.dot.origin]);
          rows.push(["HLC", ev.hlc.physical_ms + "." + ev.hlc.logical + " (" + new Date(ev.hlc.physical_ms).toISOString() + ")"]);
          rows.push(["feed position", String(ev.seq)]);
        } else {
          rows.push(["dot, HLC", "not in the feed any more (compacted)"]);
        }
      }
    } catch (_) { /* the value is shown without them */ }
    const t = h("table");
    table(t, ["", ""], rows.map(([a, b]) => [a, h("code", {}, b)]));
    out.replaceChildren(t, h("pre", {}, shown));
  } catch (e) {
    out.replaceChildren(h("p", { class: "error" }, e.message));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("asp-token", token);
    $("token-form").hidden = true;
    if (stream) stream.abort();
    follow();
  });
  $("inspect-form").addEventListener("submit", inspect);
  follow();
});
