// gantry's web monitor in headless Chromium (Debian's, driven by playwright-core)
// against a real `gantry serve` with `gantry sim` backends, each in its own process:
// the two flows of seed 002 (page first, then machines; machines busy, then the page),
// a backend killed mid-job, a cached prompt done in milliseconds, the timeline of a
// finished job, and the page's bounded state. Screenshots go to target/monitor-artifacts.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const GANTRY = process.env.GANTRY_BIN ?? resolve(here, '../target/debug/gantry');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = resolve(here, '../target/monitor-artifacts');
mkdirSync(ARTIFACTS, { recursive: true });

const children = new Set();
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  for (const c of children) c.kill('SIGKILL');
});

/// A free port on loopback, for a simulator that starts later than the server that
/// names it.
function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/// Run `gantry ARGS`; answers the process and what followed `prefix` on its first line
/// that starts with it.
function gantry(args, prefix) {
  const child = spawn(GANTRY, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: 'warn' } });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return new Promise((ok, fail) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => fail(new Error(`gantry ${args[0]} did not announce itself`)), 60_000);
    lines.on('line', (line) => {
      if (line.startsWith(prefix)) {
        clearTimeout(timer);
        ok({ child, url: line.slice(prefix.length).trim() });
      }
    });
    child.once('exit', (code) => fail(new Error(`gantry ${args[0]} exited with ${code}`)));
  });
}

const sim = (port, ...args) => gantry(['sim', '--listen', `127.0.0.1:${port}`, ...args], 'gantry sim: a ComfyUI server on ');

/// `gantry serve` on a fresh data dir naming the simulators on `ports` b0, b1, ...;
/// `before(dataDir)` runs first (to make a token, say).
async function serve(ports, extra = '', { priorities = [], before: first } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'gantry-monitor-'));
  const backends = ports.map((p, i) => `[[backends]]\nname = "b${i}"\nurl = "http://127.0.0.1:${p}"\npriority = ${priorities[i] ?? 0}\n`).join('');
  writeFileSync(join(dir, 'gantry.toml'), `liveness = "1s"\n${extra}\n${backends}`);
  if (first) await first(join(dir, 'data'));
  const s = await gantry(['serve', '--listen', '127.0.0.1:0', '--data-dir', join(dir, 'data'), '--config', join(dir, 'gantry.toml')], 'gantry: serving on ');
  s.dir = dir;
  return s;
}

/// `gantry ARGS` to its end; answers its stdout.
function gantryOutput(args) {
  return new Promise((ok, fail) => {
    const child = spawn(GANTRY, args, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.once('exit', (code) => (code === 0 ? ok(out) : fail(new Error(`gantry ${args.join(' ')} exited with ${code}`))));
  });
}

async function stop(server) {
  server.child.kill('SIGINT');
  await new Promise((ok) => (server.child.exitCode !== null ? ok() : server.child.once('exit', ok)));
  rmSync(server.dir, { recursive: true, force: true });
}

async function submit(url, workflow, extra = {}) {
  const r = await fetch(`${url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ workflow, ...extra }) });
  const body = await r.json();
  assert.equal(r.status, 202, JSON.stringify(body));
  return body.id;
}

async function job(url, id) {
  return (await fetch(`${url}/v1/jobs/${id}`)).json();
}

async function waitFor(what, check, ms = 30_000) {
  const until = Date.now() + ms;
  let last;
  for (;;) {
    last = await check();
    if (last) return last;
    if (Date.now() > until) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const sleepWorkflow = (seconds, steps, seed) => ({
  1: { class_type: 'EmptyImage', inputs: { width: 16, height: 16, batch_size: 1, color: 0 } },
  2: { class_type: 'GantrySleep', inputs: { image: ['1', 0], seconds, steps, seed } },
  3: { class_type: 'SaveImage', inputs: { images: ['2', 0], filename_prefix: 'monitor' } },
});

/// A page on the monitor that records every status each backend's badge took.
async function openPage(url) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.addInitScript(() => {
    window.__statuses = {};
    window.__record = () => {
      const m = window.gantryMonitor?.state();
      if (!m) return;
      for (const [name, b] of m.backends) {
        const seen = (window.__statuses[name] ??= []);
        if (seen[seen.length - 1] !== b.status) seen.push(b.status);
      }
    };
    // Sampled from the page's own state on every frame it draws.
    const tick = () => { window.__record(); requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
  });
  await page.goto(url);
  page.errors = errors;
  return page;
}

/// What a page shows, in a form two pages can be compared by.
async function shown(page) {
  return page.evaluate(() => {
    const m = window.gantryMonitor.state();
    return {
      seq: m.seq,
      backends: [...m.backends.values()].map((b) => [b.name, b.status, b.current_job]).sort(),
      running: [...m.running.keys()].sort(),
      recent: m.recent.map((s) => [s.id, s.state]).sort(),
      queued: m.counts.queued ?? 0,
      succeeded: m.counts.succeeded ?? 0,
    };
  });
}

const badge = (page, name) => page.locator(`#backends tr[data-backend="${name}"] .badge`);

test('page first, then the machines, then jobs; and a late page shows the same', async () => {
  const ports = [await freePort(), await freePort()];
  const server = await serve(ports);
  const early = await openPage(server.url);
  // Nothing answers yet: connecting, with no "last heard".
  await waitFor('both rows connecting', async () => (await badge(early, 'b0').textContent()) === 'connecting' && (await badge(early, 'b1').textContent()) === 'connecting');
  await early.screenshot({ path: join(ARTIFACTS, 'a1-connecting.png') });

  const sims = [await sim(ports[0]), await sim(ports[1])];
  await waitFor('both idle', async () => (await badge(early, 'b0').textContent()) === 'idle' && (await badge(early, 'b1').textContent()) === 'idle');

  // Long jobs hold both backends; more wait in the queue.
  const ids = [];
  for (let i = 0; i < 6; i++) ids.push(await submit(server.url, sleepWorkflow(i < 2 ? 4 : 0.3, 8, 100 + i)));
  await waitFor('both busy', async () => (await badge(early, 'b0').textContent()) === 'busy' && (await badge(early, 'b1').textContent()) === 'busy');
  await waitFor('progress drawn', async () => (await early.locator('#running .bar').count()) >= 1);
  await early.screenshot({ path: join(ARTIFACTS, 'a2-busy.png') });

  // (b): the machines are running and busy when a second page opens.
  const late = await openPage(server.url);
  await waitFor('the late page caught up', async () => {
    const [a, b] = [await shown(early), await shown(late)];
    return a.seq === b.seq && JSON.stringify(a) === JSON.stringify(b) ? a : null;
  }, 20_000);
  const a = await shown(early);
  assert.equal(a.backends.filter(([, s]) => s === 'busy').length, 2, JSON.stringify(a));
  assert.ok(a.queued >= 1, JSON.stringify(a));
  await late.screenshot({ path: join(ARTIFACTS, 'b1-late-page.png') });

  // Every job appears and finishes, on both pages.
  for (const page of [early, late]) {
    await waitFor('every job succeeded on the page', async () => {
      const rows = await page.locator('#recent tbody tr').evaluateAll((trs) => trs.map((tr) => [tr.dataset.job, tr.querySelector('.badge').textContent]));
      const done = new Map(rows);
      return ids.every((id) => done.get(id) === 'succeeded');
    }, 60_000);
  }
  await waitFor('idle again', async () => (await badge(early, 'b0').textContent()) === 'idle' && (await badge(early, 'b1').textContent()) === 'idle');
  assert.deepEqual(await shown(early), await shown(late));
  const statuses = await early.evaluate(() => window.__statuses);
  for (const name of ['b0', 'b1']) {
    const seen = statuses[name];
    const order = ['connecting', 'idle', 'busy', 'idle'];
    let at = 0;
    for (const s of seen) if (s === order[at]) at += 1;
    assert.equal(at, order.length, `${name} went ${seen.join(' -> ')}`);
  }
  assert.equal((await early.locator('#running tbody tr').count()), 0);
  await early.screenshot({ path: join(ARTIFACTS, 'a3-done.png') });
  assert.deepEqual(early.errors, []);
  assert.deepEqual(late.errors, []);
  await early.close();
  await late.close();
  await stop(server);
  for (const s of sims) s.child.kill('SIGKILL');
});

test('a backend killed mid-job shows offline, and the page follows its job to another', async () => {
  const ports = [await freePort(), await freePort()];
  const sims = [await sim(ports[0]), await sim(ports[1])];
  const server = await serve(ports, 'max_attempts = 3');
  const page = await openPage(server.url);
  await waitFor('both idle', async () => (await badge(page, 'b0').textContent()) === 'idle' && (await badge(page, 'b1').textContent()) === 'idle');
  const id = await submit(server.url, sleepWorkflow(6, 12, 7));
  const first = await waitFor('it runs', async () => {
    const j = await job(server.url, id);
    return j.state === 'running' && j.attempts[0]?.status === 'executing' ? j : null;
  });
  const victim = first.attempts[0].backend;
  const other = victim === 'b0' ? 'b1' : 'b0';
  await waitFor('its row is busy with it', async () => (await page.locator(`#backends tr[data-backend="${victim}"] a.job`).getAttribute('data-job').catch(() => null)) === id);
  sims[Number(victim.slice(1))].child.kill('SIGKILL');
  await waitFor(`${victim} offline`, async () => (await badge(page, victim).textContent()) === 'offline');
  await waitFor(`the job runs on ${other}`, async () => (await page.locator(`#backends tr[data-backend="${other}"] a.job`).getAttribute('data-job').catch(() => null)) === id);
  await page.screenshot({ path: join(ARTIFACTS, 'c1-killed.png') });
  await waitFor('it succeeds on the page', async () => (await page.locator(`#recent tr[data-job="${id}"] .badge`).textContent().catch(() => '')) === 'succeeded', 60_000);
  const done = await job(server.url, id);
  assert.equal(done.state, 'succeeded');
  assert.deepEqual(done.attempts.map((a) => a.backend), [victim, other]);
  assert.equal(await page.locator(`#recent tr[data-job="${id}"] td:nth-child(5)`).textContent(), '2');
  assert.deepEqual(page.errors, []);
  await page.close();
  await stop(server);
  for (const s of sims) s.child.kill('SIGKILL');
});

test('a cached prompt done in milliseconds ends succeeded, and a timeline is drawn', async () => {
  const port = await freePort();
  const s = await sim(port);
  const server = await serve([port]);
  const page = await openPage(server.url);
  await waitFor('idle', async () => (await badge(page, 'b0').textContent()) === 'idle');
  const workflow = sleepWorkflow(0.5, 5, 42);
  const first = await submit(server.url, workflow);
  await waitFor('the first ends', async () => (await job(server.url, first)).state === 'succeeded');
  // The same prompt again: ComfyUI answers it from its cache at once.
  const cached = await submit(server.url, workflow);
  await waitFor('the cached one ends succeeded on the page', async () => (await page.locator(`#recent tr[data-job="${cached}"] .badge`).textContent().catch(() => '')) === 'succeeded');
  const j = await job(server.url, cached);
  assert.equal(j.state, 'succeeded');
  assert.ok(j.attempts[0].profile.summary.cached >= 1, JSON.stringify(j.attempts[0].profile.summary));
  assert.equal(await page.locator('#running tbody tr').count(), 0);

  // The timeline of the first: one bar per node on a time axis, the sleep with ticks.
  await page.locator(`#recent tr[data-job="${first}"] a.job`).click();
  await waitFor('timeline drawn', async () => (await page.locator('#job .timeline .tl-row').count()) === 3);
  const bars = await page.locator('#job .timeline .tl-row').evaluateAll((rows) => rows.map((r) => ({ node: r.dataset.node, status: r.dataset.status, width: parseFloat(r.querySelector('.tl-bar')?.style.width ?? '0'), ticks: r.querySelectorAll('.tl-tick').length })));
  const sleep = bars.find((b) => b.node === '2');
  assert.equal(sleep.status, 'completed');
  assert.ok(sleep.width > 50, JSON.stringify(bars));
  assert.ok(sleep.ticks >= 1, JSON.stringify(bars));
  await page.screenshot({ path: join(ARTIFACTS, 'd1-timeline.png') });
  // The cached one's timeline marks its cached nodes.
  await page.locator('#job-close').click();
  await page.locator(`#recent tr[data-job="${cached}"] a.job`).click();
  await waitFor('cached marked', async () => (await page.locator('#job .tl-row[data-status="cached"]').count()) >= 1);
  await page.screenshot({ path: join(ARTIFACTS, 'd2-cached-timeline.png') });
  assert.deepEqual(page.errors, []);
  await page.close();
  await stop(server);
  s.child.kill('SIGKILL');
});

test('actions from the page: drain and undrain, cancel a job', async () => {
  const port = await freePort();
  const s = await sim(port);
  const server = await serve([port]);
  const page = await openPage(server.url);
  await waitFor('idle', async () => (await badge(page, 'b0').textContent()) === 'idle');
  await page.locator('#backends tr[data-backend="b0"] button[data-act="drain"]').click();
  await waitFor('drained', async () => (await badge(page, 'b0').textContent()) === 'drained');
  await page.locator('#backends tr[data-backend="b0"] button[data-act="resume"]').click();
  await waitFor('idle again', async () => (await badge(page, 'b0').textContent()) === 'idle');
  const id = await submit(server.url, sleepWorkflow(30, 30, 9));
  await waitFor('running on the page', async () => (await page.locator(`#running tr[data-job="${id}"]`).count()) === 1);
  await page.locator(`#running tr[data-job="${id}"] button[data-act="cancel"]`).click();
  await waitFor('cancelled on the page', async () => (await page.locator(`#recent tr[data-job="${id}"] .badge`).textContent().catch(() => '')) === 'cancelled');
  assert.equal((await job(server.url, id)).state, 'cancelled');
  assert.deepEqual(page.errors, []);
  await page.close();
  await stop(server);
  s.child.kill('SIGKILL');
});

test('the page keeps bounded state through 10 000 events', async () => {
  const port = await freePort();
  const s = await sim(port);
  const server = await serve([port]);
  const page = await openPage(server.url);
  await waitFor('idle', async () => (await badge(page, 'b0').textContent()) === 'idle');
  const held = await page.evaluate(() => {
    const g = window.gantryMonitor;
    const base = g.state().seq;
    const at = new Date().toISOString();
    let seq = base;
    // 2 500 jobs, four events each: queued, dispatched, started, succeeded.
    for (let i = 0; i < 2500; i++) {
      const job_id = `00000000-0000-4000-8000-${String(i).padStart(12, '0')}`;
      g.apply('queued', { seq: ++seq, job_id, at, state: 'queued', type: 'queued', priority: 0 });
      g.apply('dispatched', { seq: ++seq, job_id, at, state: 'running', type: 'dispatched', attempt: 1, backend: 'b0', prompt_id: 'p' });
      g.apply('progress', { job_id, attempt: 1, backend: 'b0', type: 'progress', node: '2', value: 1, max: 2 });
      g.apply('succeeded', { seq: ++seq, job_id, at, state: 'succeeded', type: 'succeeded', attempt: 1, backend: 'b0', late: false });
    }
    return { held: g.held(), caps: g.CAPS };
  });
  assert.equal(held.held.applied >= 10_000, true, JSON.stringify(held));
  assert.ok(held.held.recent <= held.caps.recent, JSON.stringify(held));
  assert.ok(held.held.known <= held.caps.known, JSON.stringify(held));
  assert.ok(held.held.log <= held.caps.log, JSON.stringify(held));
  assert.ok(held.held.queued <= held.caps.queued, JSON.stringify(held));
  assert.ok(held.held.running <= held.caps.running, JSON.stringify(held));
  assert.equal(held.held.recent, held.caps.recent, 'the newest ended jobs are listed');
  assert.equal(await page.locator('#recent tbody tr').count(), held.caps.recent);
  await page.screenshot({ path: join(ARTIFACTS, 'e1-bounded.png') });
  assert.deepEqual(page.errors, []);
  await page.close();
  await stop(server);
  s.child.kill('SIGKILL');
});

test('with tokens on: the page signs in, and an admin lifts a block from it', async () => {
  const ports = [await freePort(), await freePort()];
  const sims = [await sim(ports[0], '--fault', 'oom'), await sim(ports[1])];
  let token;
  const server = await serve(ports, 'max_attempts = 3\ncircuit_threshold = 0', {
    priorities: [10, 0],
    before: async (data) => {
      token = JSON.parse(await gantryOutput(['token', 'create', '--scope', 'admin', '--name', 'monitor', '--data-dir', data, '--json'])).token;
    },
  });
  const page = await openPage(server.url);
  await page.locator('#signin').waitFor({ state: 'visible' });
  await page.screenshot({ path: join(ARTIFACTS, 'f1-sign-in.png') });
  await page.locator('#token').fill('gantry_nope_nope');
  await page.locator('#signin button').click();
  await waitFor('a bad token is refused, naming why', async () => (await page.locator('#signin-error').textContent()).length > 0);
  await page.locator('#token').fill(token);
  await page.locator('#signin button').click();
  await waitFor('both idle', async () => (await badge(page, 'b0').textContent()) === 'idle' && (await badge(page, 'b1').textContent()) === 'idle');
  // A job fails on b0 (out of memory) and succeeds on b1; b0 is blocked for its shape.
  const r = await fetch(`${server.url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` }, body: JSON.stringify({ workflow: sleepWorkflow(0.2, 2, 5) }) });
  assert.equal(r.status, 202);
  const { id } = await r.json();
  await waitFor('it succeeds on the page', async () => (await page.locator(`#recent tr[data-job="${id}"] .badge`).textContent().catch(() => '')) === 'succeeded');
  await waitFor('b0 shows its block', async () => (await badge(page, 'b0').textContent()) === 'blocked' && (await page.locator('#backends tr[data-backend="b0"] button[data-act="lift"]').count()) === 1);
  await page.screenshot({ path: join(ARTIFACTS, 'f2-blocked.png') });
  await page.locator('#backends tr[data-backend="b0"] button[data-act="lift"]').click();
  await waitFor('the block is lifted', async () => (await badge(page, 'b0').textContent()) === 'idle' && (await page.locator('#backends tr[data-backend="b0"] button[data-act="lift"]').count()) === 0);
  assert.deepEqual(page.errors, []);
  await page.close();
  await stop(server);
  for (const s of sims) s.child.kill('SIGKILL');
});

test('an agent shows as one beside URL backends, and a command job shows its program and result', async () => {
  const port = await freePort();
  const s = await sim(port);
  const server = await serve([]);
  const state = mkdtempSync(join(tmpdir(), 'gantry-agent-'));
  const agent = spawn(GANTRY, ['agent', '--server', server.url, '--name', 'a0', '--state', join(state, 'agent.json'),
    '--comfyui', `http://127.0.0.1:${port}`, '--allow', '/bin/sh'], { stdio: 'ignore', env: { ...process.env, RUST_LOG: 'warn' } });
  children.add(agent);
  const page = await openPage(server.url);
  await waitFor('the agent idle', async () => (await badge(page, 'a0').textContent().catch(() => '')) === 'idle');
  const kind = page.locator('#backends tr[data-backend="a0"] .kind');
  assert.equal(await kind.textContent(), 'agent');
  assert.equal(await kind.getAttribute('title'), 'runs commands: /bin/sh');
  const r = await fetch(`${server.url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ kind: 'command', command: { argv: ['/bin/sh', '-c', 'echo fetched 3 files; exit 0'] } }) });
  const { id } = await r.json();
  assert.equal(r.status, 202);
  await waitFor('the command ends succeeded on the page', async () => (await page.locator(`#recent tr[data-job="${id}"] .badge`).textContent().catch(() => '')) === 'succeeded');
  await page.locator(`#recent tr[data-job="${id}"] a.job`).click();
  await waitFor('its program and result drawn', async () => (await page.locator('#job .tail').count()) === 1);
  assert.equal(await page.locator('#job .command').textContent(), '/bin/sh -c echo fetched 3 files; exit 0');
  assert.equal(await page.locator('#job .exit').textContent(), 'exit code 0');
  assert.equal(await page.locator('#job .tail').textContent(), 'fetched 3 files');
  // A command runs no nodes: no timeline, no "incomplete record".
  assert.equal(await page.locator('#job .timeline').count(), 0);
  assert.equal(await page.locator('#job .err').count(), 0);
  await page.screenshot({ path: join(ARTIFACTS, 'g1-agent-command.png') });
  assert.deepEqual(page.errors, []);
  await page.close();
  agent.kill('SIGTERM');
  await new Promise((ok) => (agent.exitCode !== null ? ok() : agent.once('exit', ok)));
  rmSync(state, { recursive: true, force: true });
  await stop(server);
  s.child.kill('SIGKILL');
});
