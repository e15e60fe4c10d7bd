// The StemeDB dashboard: a page per hash (#overview, #shards, #shard/N, #quarantine,
// #breakers, #slow-queries, #anti-entropy, #backups) over this node's own APIs, mounted by the
// dashboard server under /api (client API and node admin) and /cluster-api (cluster admin).
// Everything the APIs return is rendered as text (textContent), never as markup.
"use strict";

const REFRESH_MS = 3000;
const TOKEN_KEY = "stemedb-dashboard-token";
const HISTORY = 60; // chart points kept (3 minutes at one per refresh)

const state = {
  session: null,
  timer: null,
  generation: 0, // bumped on every navigation: late answers for an old page are dropped
  samples: [], // metric samples for the charts: {at, writes, queries, wp50, wp99, qp50, qp99}
  quarantine: { agent: "", prefix: "", cursors: [null], page: 0 },
};

// ---- helpers ----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(text) {
  return el("span", { class: "badge " + String(text) }, String(text));
}

function table(headers, rows, numeric) {
  const nums = new Set(numeric || []);
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { class: nums.has(i) ? "num" : null }, h)))),
    el(
      "tbody",
      {},
      rows.length
        ? rows.map((row) => el("tr", {}, row.map((cell, i) => el("td", { class: nums.has(i) ? "num" : null }, cell))))
        : el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "none")),
    ),
  );
}

function section(title, ...children) {
  return el("section", {}, el("h2", {}, title), ...children);
}

function fmtTime(value) {
  if (value === null || value === undefined) return "—";
  const date = typeof value === "number" ? new Date(value / 1000) : new Date(value);
  return isNaN(date) ? String(value) : date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmtNum(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toFixed(digits === undefined ? 0 : digits);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function banner(message, kind) {
  const node = document.getElementById("banner");
  if (!message) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  node.hidden = false;
  node.className = kind || "";
  node.textContent = message;
}

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One request to this node's APIs; API errors become ApiFailure with the error's code.
async function api(path, options) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const init = Object.assign({ headers }, options || {});
  if (init.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = text;
  }
  if (!response.ok && !(body && typeof body === "object" && !body.error)) {
    const error = (body && body.error) || {};
    throw new ApiFailure(response.status, error.code || "http_" + response.status, error.message || text);
  }
  return body;
}

// Whether the page may call admin endpoints: either the node guards nothing, or a token is set.
function adminReady() {
  return !(state.session && state.session.admin_secured) || token() !== "";
}

function needToken(page) {
  page.append(
    section(
      "Admin token needed",
      el("p", {}, "This page reads admin endpoints. Enter an admin token above (it stays in this browser tab only)."),
    ),
  );
}

function showFailure(error) {
  if (error instanceof ApiFailure) banner(`${error.code} (${error.status}): ${error.message}`);
  else banner(String(error && error.message ? error.message : error));
}

// ---- metrics for the charts ----

// Prometheus text format: {name: [{labels, value}]} for the families the charts read.
function parseMetrics(text) {
  const wanted = /^(stemedb_write_duration_seconds_count|stemedb_query_total|stemedb_write_latency_seconds|stemedb_query_latency_seconds)(\{[^}]*\})? (\S+)/;
  const out = {};
  for (const line of text.split("\n")) {
    const m = wanted.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const pair of m[2].slice(1, -1).matchAll(/(\w+)="([^"]*)"/g)) labels[pair[1]] = pair[2];
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

function sum(series) {
  return (series || []).reduce((total, s) => total + s.value, 0);
}

function quantile(series, q) {
  const found = (series || []).find((s) => s.labels.quantile === q);
  return found && Number.isFinite(found.value) ? found.value * 1000 : null;
}

async function sampleMetrics() {
  const response = await fetch("api/metrics", { headers: token() ? { Authorization: "Bearer " + token() } : {} });
  if (!response.ok) return;
  const m = parseMetrics(await response.text());
  const now = Date.now() / 1000;
  const last = state.samples[state.samples.length - 1];
  if (last && now - last.at > (2 * REFRESH_MS) / 1000 + 1) state.samples = []; // a gap: start over
  state.samples.push({
    at: now,
    writes: sum(m.stemedb_write_duration_seconds_count),
    queries: sum(m.stemedb_query_total),
    wp50: quantile(m.stemedb_write_latency_seconds, "0.5"),
    wp99: quantile(m.stemedb_write_latency_seconds, "0.99"),
    qp50: quantile(m.stemedb_query_latency_seconds, "0.5"),
    qp99: quantile(m.stemedb_query_latency_seconds, "0.99"),
  });
  if (state.samples.length > HISTORY + 1) state.samples.shift();
}

// Points are {at, value}: the rate of a counter between two samples, or a gauge's value.
function rates(key) {
  const out = [];
  for (let i = 1; i < state.samples.length; i++) {
    const [a, b] = [state.samples[i - 1], state.samples[i]];
    const seconds = b.at - a.at;
    out.push({ at: b.at, value: seconds > 0 && b[key] >= a[key] ? (b[key] - a[key]) / seconds : null });
  }
  return out;
}

function values(key) {
  return state.samples.slice(1).map((s) => ({ at: s.at, value: s[key] }));
}

const WINDOW_SECONDS = (HISTORY * REFRESH_MS) / 1000;

const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df"];

// A line chart of `lines` ([{name, points}]) on a canvas, scaled to the largest point.
function chart(title, unit, lines) {
  const canvas = el("canvas", { width: 600, height: 140 });
  const known = (p) => p.value !== null && p.value !== undefined && Number.isFinite(p.value);
  const latest = lines.map((line, i) => {
    const last = [...line.points].reverse().find(known);
    return el("span", {}, el("i", { class: "swatch-" + i }), `${line.name}: ${last === undefined ? "—" : fmtNum(last.value, 1)} ${unit}`);
  });
  const box = el("div", { class: "chart" }, el("h3", {}, title), canvas, el("div", { class: "legend" }, latest));
  latest.forEach((span, i) => (span.firstChild.style.background = COLORS[i % COLORS.length]));
  const ctx = canvas.getContext("2d");
  const all = lines.flatMap((l) => l.points).filter(known).map((p) => p.value);
  const max = Math.max(1e-9, ...all) * 1.1;
  const end = Date.now() / 1000;
  // The scale is in the heading (text on a canvas depends on the browser's fonts).
  box.firstChild.append(el("span", { class: "muted" }, ` · top line ${all.length ? fmtNum(max, max < 10 ? 2 : 0) : "—"} ${unit}`));
  ctx.strokeStyle = "#e6eaf0";
  for (let g = 0; g <= 4; g++) {
    const y = 130 - (g / 4) * 120;
    ctx.beginPath();
    ctx.moveTo(0, y);
    ctx.lineTo(600, y);
    ctx.stroke();
  }
  lines.forEach((line, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    line.points.forEach((p) => {
      if (!known(p)) {
        started = false; // a gap breaks the line
        return;
      }
      const x = Math.max(0, 600 - ((end - p.at) / WINDOW_SECONDS) * 600);
      const y = 130 - (p.value / max) * 120;
      if (started) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      started = true;
    });
    ctx.stroke();
  });
  return box;
}

// ---- pages ----

async function overview(page) {
  const [health, members, shards] = await Promise.all([
    api("cluster-api/cluster/health"),
    api("cluster-api/cluster/members"),
    api("cluster-api/cluster/shards"),
  ]);
  await sampleMetrics().catch(() => {});
  page.append(
    section(
      "Cluster",
      el(
        "p",
        {},
        badge(health.status),
        ` cluster ${health.cluster_id} · nodes up ${health.nodes_up}/${health.nodes_total} · shards with a leader ${health.shards_with_leader}/${health.shards_hosted} hosted here (${health.shards_total} in all)`,
      ),
      health.shards_without_leader.length ? el("p", {}, "Without a leader: " + health.shards_without_leader.join(", ")) : null,
    ),
    el(
      "div",
      { class: "charts" },
      chart("Writes per second (this node)", "/s", [{ name: "writes", points: rates("writes") }]),
      chart("Queries per second (this node)", "/s", [{ name: "queries", points: rates("queries") }]),
      chart("Write latency", "ms", [
        { name: "p50", points: values("wp50") },
        { name: "p99", points: values("wp99") },
      ]),
      chart("Query latency", "ms", [
        { name: "p50", points: values("qp50") },
        { name: "p99", points: values("qp99") },
      ]),
    ),
    section(
      "Members",
      table(
        ["node", "raft address", "status", "shards hosted", "shards led", "replication lag (s)"],
        members.members.map((m) => [
          m.id + (m.self ? " (this node)" : ""),
          m.raft_addr,
          badge(m.status),
          m.shards_hosted,
          m.shards_led,
          m.replication_lag === null ? "—" : fmtNum(m.replication_lag, 3),
        ]),
        [3, 4, 5],
      ),
    ),
    shardTable(shards.shards),
  );
}

function shardTable(shards) {
  const moving = shards.filter((s) => s.rebalance_status === "PENDING" || s.rebalance_status === "IN_PROGRESS");
  return section(
    `Shards hosted here (${shards.length}; ${moving.length} moving)`,
    table(
      ["shard", "leader", "term", "voters", "applied", "max lag (s)", "writes/s", "queries/s", "rebalance"],
      shards.map((s) => [
        el("a", { href: "#shard/" + s.shard }, String(s.shard)),
        s.leader === null ? badge("unavailable") : s.leader,
        s.term,
        s.voters.join(", "),
        s.applied_index,
        s.replication.length ? fmtNum(Math.max(...s.replication.map((r) => r.lag_seconds || 0)), 3) : "—",
        fmtNum(s.write_rate, 1),
        fmtNum(s.query_rate, 1),
        s.rebalance_status === "NONE" ? "—" : badge(s.rebalance_status),
      ]),
      [1, 2, 4, 5, 6, 7],
    ),
  );
}

async function shardsPage(page) {
  const shards = await api("cluster-api/cluster/shards");
  page.append(shardTable(shards.shards));
}

async function shardPage(page, id) {
  const s = await api("cluster-api/cluster/shards/" + encodeURIComponent(id));
  const rows = [
    ["shard / group", `${s.shard} / ${s.group}`],
    ["leader", s.leader === null ? "none known" : s.leader],
    ["term", s.term],
    ["hosted here", s.hosted ? "yes" : "no"],
    ["voters", s.voters.join(", ")],
    ["learners", s.learners.join(", ") || "—"],
    ["placement", s.placement ? s.placement.join(", ") : "—"],
    ["applied index", s.applied_index],
    ["last log index", s.last_log_index === null ? "—" : s.last_log_index],
    ["writes (rate)", `${s.writes_total} (${fmtNum(s.write_rate, 1)}/s)`],
    ["queries (rate)", `${s.queries_total} (${fmtNum(s.query_rate, 1)}/s)`],
    ["rebalance", s.rebalance_status],
  ];
  page.append(
    section(`Shard ${s.shard}`, el("table", { class: "kv" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)))))),
    section(
      "Replication (from the leader)",
      table(
        ["follower", "matched index", "lag (s)"],
        s.replication.map((r) => [r.node, r.matched_index === null ? "—" : r.matched_index, fmtNum(r.lag_seconds, 3)]),
        [1, 2],
      ),
    ),
    s.rebalance
      ? section(
          "Last move",
          table(
            ["from", "to", "cause", "reason", "status", "requested", "updated", "error"],
            [[s.rebalance.from ?? "—", s.rebalance.to ?? "—", s.rebalance.cause, s.rebalance.reason, badge(s.rebalance.status), fmtTime(s.rebalance.requested_at_us), fmtTime(s.rebalance.updated_at_us), s.rebalance.error || "—"]],
          ),
        )
      : null,
  );
}

async function quarantinePage(page) {
  if (!adminReady()) return needToken(page);
  const q = state.quarantine;
  const started = performance.now();
  const params = new URLSearchParams({ limit: "50" });
  if (q.agent) params.set("agent_id", q.agent);
  if (q.prefix) params.set("concept_prefix", q.prefix);
  if (q.cursors[q.page]) params.set("cursor", q.cursors[q.page]);
  const list = await api("api/v1/admin/quarantine?" + params);
  const agent = el("input", { id: "q-agent", placeholder: "agent id", value: q.agent });
  const prefix = el("input", { id: "q-prefix", placeholder: "concept prefix", value: q.prefix });
  const filters = el(
    "form",
    {
      id: "q-filters",
      onsubmit: (event) => {
        event.preventDefault();
        Object.assign(q, { agent: agent.value.trim(), prefix: prefix.value.trim(), cursors: [null], page: 0 });
        render();
      },
    },
    agent,
    prefix,
    el("button", { type: "submit" }, "Filter"),
    el("button", { type: "button", id: "q-refresh", onclick: () => render() }, "Refresh"),
  );
  const decide = (claim, decision) => async () => {
    const reason = window.prompt(`Reason to ${decision} ${claim.id} (optional):`, "") ?? null;
    if (reason === null) return;
    try {
      const body = reason ? { reason } : {};
      const done = await api(`api/v1/admin/quarantine/${encodeURIComponent(claim.id)}/${decision}`, { method: "POST", body });
      banner(`${claim.id} ${done.decision} at ${fmtTime(done.decided_at)}`, "info");
    } catch (error) {
      showFailure(error);
    }
    render();
  };
  const rows = list.quarantined.map((c) => [
    el("code", {}, c.id),
    c.agent_id,
    c.concept_path,
    c.predicate,
    el("span", { class: "value" }, JSON.stringify(c.value)),
    c.quarantine ? `${c.quarantine.reason}: ${c.quarantine.detail}` : "—",
    fmtTime(c.asserted_at),
    el(
      "span",
      { class: "nowrap" },
      el("button", { class: "primary", "data-action": "release", "data-id": c.id, onclick: decide(c, "release") }, "Release"),
      " ",
      el("button", { class: "danger", "data-action": "reject", "data-id": c.id, onclick: decide(c, "reject") }, "Reject"),
    ),
  ]);
  // The page this list is of; a second click before the next page shows does nothing.
  const at = q.page;
  const turn = (to, cursor) => {
    if (q.page !== at || to < 0) return;
    if (cursor) q.cursors[to] = cursor;
    q.page = to;
    for (const button of pager.querySelectorAll("button")) button.disabled = true;
    render();
  };
  const pager = el(
    "div",
    { class: "pager" },
    el("button", { id: "q-prev", disabled: at === 0, onclick: () => turn(at - 1) }, "Previous"),
    `page ${at + 1}`,
    el("button", { id: "q-next", disabled: !list.next_cursor, onclick: () => turn(at + 1, list.next_cursor) }, "Next"),
  );
  const took = performance.now() - started;
  page.append(
    section(
      `Quarantined claims awaiting a decision (${list.quarantined.length} on this page)`,
      filters,
      el("div", { id: "quarantine-list", "data-loaded-ms": took.toFixed(0), "data-count": list.quarantined.length },
        table(["id", "agent", "concept path", "predicate", "value", "why", "asserted", "decision"], rows)),
      pager,
      el("p", { class: "muted" }, `listed in ${took.toFixed(0)} ms`),
    ),
  );
}

async function breakersPage(page) {
  if (!adminReady()) return needToken(page);
  const list = await api("api/v1/admin/circuit-breaker?state=all");
  const agent = el("input", { id: "b-agent", placeholder: "agent id", required: true });
  const reason = el("input", { id: "b-reason", placeholder: "reason" });
  const duration = el("input", { id: "b-duration", placeholder: "seconds (empty: until reset)", type: "number", min: "1" });
  const trip = el(
    "form",
    {
      id: "b-trip",
      onsubmit: async (event) => {
        event.preventDefault();
        const body = { agent_id: agent.value.trim() };
        if (reason.value.trim()) body.reason = reason.value.trim();
        if (duration.value) body.duration_seconds = Number(duration.value);
        try {
          const record = await api("api/v1/admin/circuit-breaker/trip", { method: "POST", body });
          banner(`breaker of ${record.agent_id} is ${record.state}`, "info");
        } catch (error) {
          showFailure(error);
        }
        render();
      },
    },
    agent,
    reason,
    duration,
    el("button", { type: "submit", class: "danger" }, "Trip"),
    el("button", { type: "button", id: "b-refresh", onclick: () => render() }, "Refresh"),
  );
  const reset = (agentId) => async () => {
    try {
      const record = await api("api/v1/admin/circuit-breaker/reset", { method: "POST", body: { agent_id: agentId } });
      banner(`breaker of ${record.agent_id} is ${record.state}`, "info");
    } catch (error) {
      showFailure(error);
    }
    render();
  };
  page.append(
    section(`Trip a breaker (mode: ${list.mode})`, trip),
    section(
      "Breakers",
      el(
        "div",
        { id: "breaker-list" },
        table(
          ["agent", "state", "cause", "reason", "opened", "open until", "trips", "closed", ""],
          list.breakers.map((b) => [
            b.agent_id,
            badge(b.state),
            b.cause,
            b.reason,
            fmtTime(b.opened_at),
            b.open_until ? fmtTime(b.open_until) : b.state === "closed" ? "—" : "until reset",
            b.trips,
            b.closed_at ? `${fmtTime(b.closed_at)} (${b.closed_reason})` : "—",
            b.state === "closed" ? "" : el("button", { "data-reset": b.agent_id, onclick: reset(b.agent_id) }, "Reset"),
          ]),
          [6],
        ),
      ),
    ),
  );
}

async function slowQueriesPage(page) {
  if (!adminReady()) return needToken(page);
  const list = await api("api/v1/admin/slow-queries?limit=200");
  page.append(
    section(
      `Slow queries (at least ${list.slow_query_ms} ms; newest first; this node keeps ${list.capacity})`,
      table(
        ["at", "agent", "subject", "predicate", "lens", "consistency", "duration (ms)", "memory (MB)", "results", "error"],
        list.queries.map((q) => [fmtTime(q.at), q.agent_id, q.subject, q.predicate ?? "—", q.lens, q.consistency, q.duration_ms, fmtNum(q.memory_mb, 3), q.results, q.error ?? "—"]),
        [6, 7, 8],
      ),
    ),
  );
}

async function antiEntropyPage(page) {
  const sync = await api("cluster-api/cluster/sync_status");
  const s = sync.summary;
  page.append(
    section(
      "Anti-entropy",
      el(
        "p",
        {},
        `${sync.enabled ? "enabled" : "disabled"} · check every ${sync.interval_seconds} s · ${s.agreeing}/${s.shards} shards agree · ${s.suspect} being repaired · ${s.unchecked} unchecked · ${s.mismatched_buckets} mismatched buckets · ${s.repairs} repairs since start`,
      ),
      table(
        ["shard", "leader", "agreement", "check index", "applied", "mismatched buckets", "repairs", "last repair", "checked"],
        sync.shards.map((x) => [
          x.shard,
          x.leader ?? "—",
          badge(x.agreement),
          x.check_index ?? "—",
          x.applied_index,
          x.mismatched_buckets,
          x.repairs,
          x.last_repair ? `${fmtTime(x.last_repair.at_us)} ${x.last_repair.kind}${x.last_repair.error ? " (" + x.last_repair.error + ")" : ""}` : "—",
          x.checked ? "yes" : "no",
        ]),
        [3, 4, 5, 6],
      ),
    ),
  );
}

async function backupsPage(page) {
  if (!adminReady()) return needToken(page);
  const list = await api("api/v1/admin/backup");
  page.append(
    section(
      "Backups coordinated by this node since it started (newest first)",
      table(
        ["id", "state", "destination", "started", "finished", "groups", "read (MiB)", "uploaded (MiB)", "reused (MiB)", "error"],
        list.backups.map((b) => [
          b.id,
          badge(b.state),
          b.destination,
          fmtTime(b.started_at_us),
          b.finished_at_us ? fmtTime(b.finished_at_us) : "—",
          `${b.groups_done}/${b.groups_total}`,
          fmtNum(b.bytes_read / 1048576, 1),
          fmtNum(b.bytes_uploaded / 1048576, 1),
          fmtNum(b.bytes_reused / 1048576, 1),
          b.error ? `${b.error_code}: ${b.error}` : "—",
        ]),
        [6, 7, 8],
      ),
    ),
  );
}

const PAGES = {
  overview,
  shards: shardsPage,
  quarantine: quarantinePage,
  breakers: breakersPage,
  "slow-queries": slowQueriesPage,
  "anti-entropy": antiEntropyPage,
  backups: backupsPage,
};

// Pages refreshed on the timer; the others change only on a user's action.
// Pages with a form (quarantine filters, tripping a breaker) refresh by their own button, so
// typing is never lost to a refresh.
const LIVE = new Set(["overview", "shards", "shard", "slow-queries", "anti-entropy", "backups"]);

function route() {
  const hash = location.hash.replace(/^#/, "") || "overview";
  const [name, arg] = hash.split("/");
  return { name: Object.hasOwn(PAGES, name) || name === "shard" ? name : "overview", arg };
}

async function loadSession() {
  try {
    state.session = await api("session");
    document.getElementById("node").textContent = `node ${state.session.node_id} · v${state.session.version}`;
  } catch (error) {
    state.session = null;
    return error;
  }
  return null;
}

async function render() {
  const generation = ++state.generation;
  const { name, arg } = route();
  // Until the node said whether it needs a token, ask again on every render.
  const sessionFailure = state.session ? null : await loadSession();
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === name || (name === "shard" && link.dataset.page === "shards"));
  }
  const page = el("div", { id: "page-" + name });
  let failure = sessionFailure;
  try {
    if (state.session && state.session.tokens_required && !token()) {
      page.append(section("Sign in", el("p", {}, "This node requires a token: enter one above (an admin token for the admin pages).")));
    } else if (name === "shard") {
      await shardPage(page, arg);
    } else {
      await PAGES[name](page);
    }
  } catch (error) {
    failure = error;
    if (error instanceof ApiFailure && (error.status === 401 || error.status === 403)) {
      page.append(section("Not allowed", el("p", {}, "The token above cannot read this page: enter an admin token.")));
    }
  }
  if (generation !== state.generation) return; // a newer render took over: nothing of this one shows
  if (failure) {
    showFailure(failure);
  } else {
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    const shown = document.getElementById("banner");
    if (!shown.hidden && !shown.classList.contains("info")) banner(""); // an error that passed
  }
  const main = document.getElementById("page");
  main.replaceChildren(page);
  clearTimeout(state.timer);
  if (LIVE.has(name)) state.timer = setTimeout(render, REFRESH_MS);
}

async function start() {
  document.getElementById("refresh-seconds").textContent = String(REFRESH_MS / 1000);
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    banner("");
    render();
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    banner("Token forgotten.", "info");
    render();
  });
  window.addEventListener("hashchange", () => {
    banner("");
    render();
  });
  render();
}

start();
