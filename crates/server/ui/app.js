// gantry's monitor: one snapshot (GET /v1/state), then every later event
// (GET /v1/events?since=SEQ). Every change goes through `apply`, the one reducer; the
// page keeps bounded state (CAPS) however long it stays open.
'use strict';

const CAPS = {
  recent: 100, // ended jobs listed
  queued: 200, // queued jobs known by id (the depth comes from the counts)
  running: 1000, // running jobs listed (the count is exact beyond it)
  known: 2000, // jobs whose state the page remembers
  log: 200, // raw events kept for inspection
};

const JOB_EVENTS = [
  'queued', 'dispatched', 'submitted', 'started', 'attempt_failed', 'job_retrying',
  'backend_blocked', 'cancel_requested', 'succeeded', 'failed', 'cancelled', 'late',
];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
/// A running attempt's node steps: part of the job's history (with a seq), shown as its progress.
const NODE_EVENTS = ['node_started', 'node_finished', 'nodes_cached'];

const M = {
  seq: 0,
  backends: new Map(), // name -> Backend row (the server's, whole)
  running: new Map(), // job id -> summary
  queued: new Map(), // job id -> summary
  recent: [], // summaries, newest first
  known: new Map(), // job id -> summary (every job above, and some more), insertion order
  counts: {},
  queueByPriority: new Map(), // priority -> count
  log: [],
  staleAfterMs: 20000,
  applied: 0,
  link: 'connecting',
  selected: null,
};

let source = null;
let dirty = false;

// ---- the reducer -------------------------------------------------------------------

function summaryOf(j) {
  return {
    id: j.id, state: j.state, priority: j.priority ?? 0,
    created: j.created_at ? Date.parse(j.created_at) : null,
    ended: TERMINAL.has(j.state) && j.updated_at ? Date.parse(j.updated_at) : null,
    backend: j.backend ?? null, attempts: j.attempts ?? 0, error: j.error ?? null,
    duration_ms: j.duration_ms ?? null, progress: j.progress ?? null,
    since: null,
  };
}

function remember(s) {
  M.known.delete(s.id);
  M.known.set(s.id, s);
  while (M.known.size > CAPS.known) {
    // The oldest that no list holds goes first; else the oldest.
    let victim = null;
    for (const [id] of M.known) {
      if (!M.running.has(id) && !M.queued.has(id)) { victim = id; break; }
    }
    M.known.delete(victim ?? M.known.keys().next().value);
  }
}

function snapshot(st) {
  M.seq = st.seq;
  M.staleAfterMs = st.stale_after_ms;
  M.backends = new Map(st.backends.map((b) => [b.name, b]));
  M.counts = { ...st.counts };
  M.queueByPriority = new Map(st.queue.map((q) => [q.priority, q.count]));
  M.running = new Map();
  M.queued = new Map();
  M.known = new Map();
  for (const j of st.recent.slice().reverse()) remember(summaryOf(j));
  M.recent = st.recent.slice(0, CAPS.recent).map((j) => M.known.get(j.id));
  for (const j of st.running) {
    const s = summaryOf(j);
    remember(s);
    M.running.set(s.id, s);
  }
  for (const j of st.queued_jobs ?? []) {
    const s = summaryOf(j);
    remember(s);
    if (M.queued.size < CAPS.queued) M.queued.set(s.id, s);
  }
  touch();
}

function count(state, delta) {
  M.counts[state] = Math.max(0, (M.counts[state] ?? 0) + delta);
}

function queueCount(priority, delta) {
  const n = Math.max(0, (M.queueByPriority.get(priority) ?? 0) + delta);
  if (n === 0) M.queueByPriority.delete(priority); else M.queueByPriority.set(priority, n);
}

/// A job event: the job's state after it, and what the event says of the attempt.
function jobEvent(kind, e) {
  if (typeof e.seq === 'number') {
    if (e.seq <= M.seq) return; // already in the snapshot or seen
    M.seq = e.seq;
  }
  let s = M.known.get(e.job_id);
  // A job first seen now: new when queued; otherwise it was queued before the snapshot.
  if (!s) s = { id: e.job_id, state: kind === 'queued' ? null : 'queued', priority: e.priority ?? null, created: null, ended: null, backend: null, attempts: 0, error: null, duration_ms: null, progress: null, since: null };
  const before = s.state;
  const at = Date.parse(e.at);
  if (kind === 'queued') {
    s.priority = e.priority ?? s.priority ?? 0;
    if (s.created === null) s.created = at;
  }
  if (e.attempt && typeof e.attempt === 'number') s.attempts = Math.max(s.attempts, e.attempt);
  if (e.backend && kind !== 'backend_blocked') s.backend = e.backend;
  if (kind === 'dispatched' || kind === 'started') s.since = s.since && kind === 'started' ? s.since : at;
  if (kind === 'attempt_failed' && e.error) s.lastError = e.error;
  if (kind === 'failed') s.error = e.error;
  if (kind === 'job_retrying') s.progress = null;
  s.state = e.state;
  if (before !== s.state) {
    if (before) count(before, -1);
    count(s.state, 1);
    if (before === 'queued') queueCount(s.priority ?? maxPriority(), -1);
    if (s.state === 'queued') queueCount(s.priority ?? 0, 1);
  }
  M.queued.delete(s.id);
  M.running.delete(s.id);
  if (s.state === 'queued') {
    if (M.queued.size < CAPS.queued) M.queued.set(s.id, s);
  } else if (s.state === 'running') {
    if (M.running.size < CAPS.running) M.running.set(s.id, s);
  } else if (TERMINAL.has(s.state)) {
    s.ended = at;
    s.progress = null;
    if (s.created !== null) s.duration_ms = at - s.created;
    M.recent = [s, ...M.recent.filter((r) => r.id !== s.id)].slice(0, CAPS.recent);
  }
  remember(s);
  if (M.selected === s.id) refreshJob();
}

function maxPriority() {
  let best = null;
  for (const p of M.queueByPriority.keys()) if (best === null || p > best) best = p;
  return best ?? 0;
}

function liveEvent(kind, e) {
  const s = M.running.get(e.job_id);
  const p = (s && s.progress && s.progress.attempt === e.attempt) ? s.progress : { job_id: e.job_id, attempt: e.attempt, backend: e.backend, node: null, class_type: null, value: null, max: null };
  if (kind === 'node_started') {
    p.node = e.node; p.class_type = e.class_type; p.value = null; p.max = null;
  } else {
    if (p.node !== e.node) { p.node = e.node; p.class_type = null; }
    p.value = e.value; p.max = e.max;
  }
  if (s) s.progress = p;
  const b = M.backends.get(e.backend);
  if (b && b.current_job === e.job_id) b.progress = p;
}

/// Every change to the page's state, from the stream or the snapshot.
function apply(kind, data) {
  M.applied += 1;
  M.log.push({ kind, seq: data.seq ?? null });
  if (M.log.length > CAPS.log) M.log.splice(0, M.log.length - CAPS.log);
  if (kind === 'backend') {
    const old = M.backends.get(data.name);
    // A row carries no progress between its own changes; keep what the stream said.
    if (!data.progress && old && old.progress && old.current_job === data.current_job) data.progress = old.progress;
    M.backends.set(data.name, data);
  } else if (NODE_EVENTS.includes(kind)) {
    if (typeof data.seq === 'number') {
      if (data.seq <= M.seq) { touch(); return; }
      M.seq = data.seq;
    }
    if (kind === 'node_started') liveEvent(kind, data);
  } else if (kind === 'progress') {
    liveEvent(kind, data);
  } else if (JOB_EVENTS.includes(kind)) {
    jobEvent(kind, data);
  }
  touch();
}

// ---- the stream --------------------------------------------------------------------

async function api(method, path, body) {
  const r = await fetch(path, {
    method, credentials: 'same-origin',
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!r.ok) {
    const err = new Error(json?.error?.message ?? `${method} ${path}: ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return json;
}

async function load() {
  if (source) { source.close(); source = null; }
  setLink('connecting');
  let st;
  try {
    st = await api('GET', '/v1/state');
  } catch (e) {
    if (e.status === 401 || e.status === 403) { showSignIn(); return; }
    setLink('reconnecting');
    toast(e.message);
    setTimeout(load, 1000);
    return;
  }
  document.getElementById('signin').hidden = true;
  document.getElementById('farm').hidden = false;
  snapshot(st);
  connect();
}

function connect() {
  const es = new EventSource(`/v1/events?since=${M.seq}`);
  source = es;
  const on = (kind) => es.addEventListener(kind, (msg) => {
    let data;
    try { data = JSON.parse(msg.data); } catch (_) { return; }
    apply(kind, data);
  });
  for (const k of [...JOB_EVENTS, ...NODE_EVENTS, 'backend', 'progress']) on(k);
  es.addEventListener('resync', () => { es.close(); load(); });
  es.onopen = () => setLink('live');
  // EventSource reconnects by itself with Last-Event-ID; the server then sends every
  // backend again and every job event missed.
  es.onerror = () => setLink(es.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting');
}

function setLink(state) {
  M.link = state;
  const el = document.getElementById('link');
  el.dataset.state = state;
  el.textContent = state;
}

// ---- actions -----------------------------------------------------------------------

async function act(method, path) {
  try {
    await api(method, path);
  } catch (e) {
    toast(e.message);
  }
}

function toast(message) {
  const t = document.getElementById('toast');
  t.textContent = message;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

function showSignIn() {
  document.getElementById('farm').hidden = true;
  document.getElementById('signin').hidden = false;
  setLink('signed out');
}

document.getElementById('signin').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const token = document.getElementById('token').value.trim();
  try {
    await api('POST', '/v1/session', { token });
    document.getElementById('signin-error').textContent = '';
    load();
  } catch (e) {
    document.getElementById('signin-error').textContent = e.message;
  }
});

document.addEventListener('click', (ev) => {
  const el = ev.target.closest('[data-act]');
  if (!el) return;
  const { act: what, name, job, hash } = el.dataset;
  const n = encodeURIComponent(name ?? '');
  if (what === 'drain') act('POST', `/v1/backends/${n}/drain`);
  if (what === 'resume') act('POST', `/v1/backends/${n}/resume`);
  if (what === 'lift') act('DELETE', `/v1/backends/${n}/blocks/${encodeURIComponent(hash)}`);
  if (what === 'cancel') act('DELETE', `/v1/jobs/${encodeURIComponent(job)}`);
  if (what === 'open') openJob(job);
});

document.getElementById('job-close').addEventListener('click', () => {
  M.selected = null;
  document.getElementById('job').hidden = true;
});

// ---- drawing -----------------------------------------------------------------------

const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
const short = (id) => esc(String(id ?? '').slice(0, 8));
const jobLink = (id) => (id ? `<a class="job" data-act="open" data-job="${esc(id)}" title="${esc(id)}">${short(id)}</a>` : '');
const ago = (ms) => (ms === null || Number.isNaN(ms) ? '-' : ms < 1000 ? 'now' : `${Math.round(ms / 1000)} s ago`);
const dur = (ms) => (ms === null || ms === undefined ? '-' : ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`);

function bar(p) {
  if (!p || p.max === null || !p.max) return '';
  const pct = Math.max(0, Math.min(100, (100 * p.value) / p.max));
  return `<span class="bar" data-value="${p.value}" data-max="${p.max}"><span style="width:${pct}%"></span></span> ${Math.round(p.value)}/${Math.round(p.max)}`;
}

function touch() {
  if (dirty) return;
  dirty = true;
  requestAnimationFrame(render);
}

function render() {
  dirty = false;
  const now = Date.now();
  const rows = [];
  for (const b of M.backends.values()) {
    const heard = b.last_seen ? now - Date.parse(b.last_seen) : null;
    const blocks = b.blocks.filter((k) => Date.parse(k.until) > now).map((k) => {
      const left = Math.max(0, Math.ceil((Date.parse(k.until) - now) / 1000));
      return `<span class="block mono" title="${esc(k.workflow_hash)}">${esc(k.workflow_hash.slice(0, 8))} ${left}s <button data-act="lift" data-name="${esc(b.name)}" data-hash="${esc(k.workflow_hash)}">lift</button></span>`;
    }).join(' ');
    const drain = b.status === 'draining' || b.status === 'drained'
      ? `<button data-act="resume" data-name="${esc(b.name)}">undrain</button>`
      : `<button data-act="drain" data-name="${esc(b.name)}">drain</button>`;
    const p = b.progress;
    // An agent's URL is a listener on the coordinator; what it allows says more.
    const kind = b.kind === 'agent'
      ? ` <span class="kind" title="${esc(b.allow?.length ? `runs commands: ${b.allow.join(', ')}` : 'runs no commands')}">agent</span>`
      : '';
    rows.push(`<tr data-backend="${esc(b.name)}"><td>${esc(b.name)}${kind}</td>`
      + `<td><span class="badge" data-status="${esc(b.status)}">${esc(b.status)}</span>${b.circuit?.state === 'open' ? ' circuit open' : ''}</td>`
      + `<td class="id">${jobLink(b.current_job)}</td><td>${esc(p?.node ?? '')} ${esc(p?.class_type ?? '')}</td>`
      + `<td>${bar(p)}</td><td>${blocks}</td><td class="heard">${ago(heard)}</td><td>${drain}</td></tr>`);
  }
  document.querySelector('#backends tbody').innerHTML = rows.join('');

  const total = [...M.queueByPriority.values()].reduce((a, b) => a + b, 0);
  document.getElementById('queued').textContent = `(${M.counts.queued ?? total})`;
  document.getElementById('queue').innerHTML = [...M.queueByPriority.entries()]
    .sort((a, b) => b[0] - a[0])
    .map(([p, n]) => `<span class="prio">priority ${esc(p)}: <b>${esc(n)}</b></span>`)
    .join(' &nbsp; ') || 'empty';

  document.querySelector('#running tbody').innerHTML = [...M.running.values()].map((s) => {
    const p = s.progress;
    return `<tr data-job="${esc(s.id)}"><td class="id">${jobLink(s.id)}</td><td>${esc(s.backend)}</td>`
      + `<td>${esc(p?.node ?? '')} ${esc(p?.class_type ?? '')}</td><td>${bar(p)}</td>`
      + `<td>${s.since ? dur(now - s.since) : '-'}</td>`
      + `<td><button data-act="cancel" data-job="${esc(s.id)}">cancel</button></td></tr>`;
  }).join('');

  document.querySelector('#recent tbody').innerHTML = M.recent.map((s) => `<tr data-job="${esc(s.id)}">`
    + `<td class="id">${jobLink(s.id)}</td><td><span class="badge" data-state="${esc(s.state)}">${esc(s.state)}</span></td>`
    + `<td>${dur(s.duration_ms)}</td><td>${esc(s.backend)}</td><td>${esc(s.attempts)}</td>`
    + `<td class="err">${esc(s.error?.code ?? '')} ${esc(s.error?.message ?? '')}</td></tr>`).join('');

  const c = M.counts;
  document.getElementById('counts').textContent = ['queued', 'running', 'succeeded', 'failed', 'cancelled']
    .map((k) => `${k} ${c[k] ?? 0}`).join(' · ');
}

// "heard N s ago" and block countdowns move with the clock.
setInterval(touch, 500);

// ---- the job view ------------------------------------------------------------------

async function openJob(id) {
  M.selected = id;
  document.getElementById('job').hidden = false;
  document.getElementById('job-body').innerHTML = `<p>loading ${esc(id)}</p>`;
  await refreshJob();
}

async function refreshJob() {
  const id = M.selected;
  if (!id) return;
  let job;
  try {
    job = await api('GET', `/v1/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    document.getElementById('job-body').innerHTML = `<p class="err">${esc(e.message)}</p>`;
    return;
  }
  if (M.selected !== id) return;
  const parts = [`<h2 class="mono">${esc(job.id)}</h2>`,
    `<p><span class="badge" data-state="${esc(job.state)}">${esc(job.state)}</span> priority ${esc(job.priority)} · created ${esc(job.created_at)}`
    + (TERMINAL.has(job.state) ? '' : ` <button data-act="cancel" data-job="${esc(job.id)}">cancel</button>`) + '</p>'];
  if (job.command) parts.push(`<p class="command mono">${esc(job.command.argv.join(' '))}</p>`);
  if (job.error) parts.push(`<p class="err">${esc(job.error.code)}: ${esc(job.error.message)}</p>`);
  if (job.waiting_for) {
    const per = Object.entries(job.waiting_for.backends ?? {}).map(([b, why]) => `<li>${esc(b)}: ${esc(why)}</li>`).join('');
    parts.push(`<p class="waiting" data-reason="${esc(job.waiting_for.reason)}">waiting: ${esc(job.waiting_for.message)}</p>${per ? `<ul class="waiting-backends">${per}</ul>` : ''}`);
  }
  if (job.result) {
    const how = job.result.exit_code !== null && job.result.exit_code !== undefined
      ? `exit code ${job.result.exit_code}` : `signal ${job.result.signal}`;
    parts.push(`<p class="exit">${esc(how)}</p><pre class="tail mono">${esc(job.result.tail.join('\n'))}</pre>`);
  }
  for (const a of job.attempts) {
    parts.push(`<h3>attempt ${esc(a.number)} on ${esc(a.backend)}: ${esc(a.status)}</h3>`);
    if (a.error) parts.push(`<p class="err">${esc(a.error.code)}: ${esc(a.error.message)}</p>`);
    if (a.profile && !job.command) parts.push(timeline(a.profile));
  }
  document.getElementById('job-body').innerHTML = parts.join('');
}

/// One bar per node on the attempt's time axis; cached nodes marked, progress ticks.
function timeline(p) {
  const starts = p.nodes.map((n) => n.start).filter((v) => v !== null);
  const ends = p.nodes.map((n) => n.end).filter((v) => v !== null);
  const from = p.started_at ?? (starts.length ? Math.min(...starts) : null);
  const to = p.completed_at ?? (ends.length ? Math.max(...ends) : null);
  if (from === null || to === null) return '<p>no timings recorded</p>';
  const span = Math.max(1, to - from);
  const x = (t) => (100 * (t - from)) / span;
  const rows = p.nodes.map((n) => {
    let body = '';
    if (n.status === 'cached') {
      body = '<span class="tl-bar" data-status="cached" style="left:0;width:100%;opacity:.35"></span>';
    } else if (n.start !== null) {
      const end = n.end ?? to;
      const ticks = n.progress.map((pt) => `<span class="tl-tick" style="left:${(100 * (pt.at - n.start)) / Math.max(1, end - n.start)}%"></span>`).join('');
      body = `<span class="tl-bar" data-status="${esc(n.status)}" style="left:${x(n.start)}%;width:${Math.max(0.2, x(end) - x(n.start))}%">${ticks}</span>`;
    }
    const label = `${esc(n.id)} ${esc(n.title ?? n.class_type)}`;
    return `<div class="tl-row" data-node="${esc(n.id)}" data-status="${esc(n.status)}"><span class="tl-label" title="${esc(n.class_type)}">${label}${n.status === 'cached' ? '<span class="tl-cached">cached</span>' : ''}</span>`
      + `<span class="tl-track">${body}</span><span class="tl-ms">${n.status === 'cached' ? 'cached' : dur(n.duration_ms)}</span></div>`;
  }).join('');
  const gaps = p.complete ? '' : `<p class="err">incomplete record: ${esc((p.gaps ?? []).map((g) => g.reason).join('; '))}</p>`;
  return `<div class="timeline" data-total-ms="${span}">${rows}</div>${gaps}`;
}

// ---- for tests and the curious -------------------------------------------------------

window.gantryMonitor = {
  CAPS,
  apply,
  /// What the page holds: every count is bounded by CAPS.
  held: () => ({
    backends: M.backends.size, running: M.running.size, queued: M.queued.size,
    recent: M.recent.length, known: M.known.size, log: M.log.length, applied: M.applied,
  }),
  state: () => M,
};

load();
