// Test harness: a signaller process, Debian's Chromium driven over CDP (playwright-core,
// connectOverCDP: no browser download), every page in its own window (background tabs are
// throttled), and helpers that read media state out of the pages.
import { spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { mkdtempSync, readFileSync, readdirSync, rmSync, existsSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, '..', '..');

export const CHROMIUM_FLAGS = [
  '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--autoplay-policy=no-user-gesture-required',
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; throws with `what` after `timeoutMs`. */
export async function waitFor(what, fn, timeoutMs = 30000, everyMs = 200) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() - start > timeoutMs) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    }
    await sleep(everyMs);
  }
}

/** Two consecutive free UDP ports on loopback (the STUN server's primary and alternate). */
async function freeUdpPair() {
  const bind = (port) => new Promise((ok) => {
    const s = createSocket('udp4');
    s.once('error', () => ok(null));
    s.bind(port, '127.0.0.1', () => ok(s));
  });
  for (let attempt = 0; attempt < 50; attempt++) {
    const a = await bind(0);
    if (!a) continue;
    const port = a.address().port;
    const b = port < 65535 ? await bind(port + 1) : null;
    a.close();
    if (b) { b.close(); return port; }
  }
  throw new Error('no two consecutive free UDP ports on 127.0.0.1');
}

/** Starts the signaller on a free loopback port; resolves to {base, stop}. `room`: more
 *  lines for the config file's [room] table (e.g. 'warm_standby = false'). `env`: more
 *  environment variables (e.g. TREECAST_ADMIN_SECRET for a server that asks for it; on
 *  loopback without one, the server asks no credentials). */
export async function startServer(args = [], { room = '', env = {} } = {}) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startServerOnce(args, room, env);
    } catch (e) {
      // Another process took the STUN ports between our check and the bind: pick again.
      if (attempt < 5 && /cannot listen for STUN/.test(e.message)) continue;
      throw e;
    }
  }
}

async function startServerOnce(args, room, env) {
  const bin = process.env.TREECAST_BIN || join(repo, 'target', 'debug', 'treecast-signaller');
  if (!existsSync(bin)) throw new Error(`no signaller at ${bin}: build it (scripts/test does)`);
  // No STUN/TURN servers but the signaller's own STUN server, on two free loopback ports
  // (its default port is fixed, so servers started in parallel would collide): pages probe
  // their NAT class against it, as on a real network.
  const configDir = mkdtempSync(join(tmpdir(), 'treecast-signaller-'));
  const config = join(configDir, 'test.toml');
  writeFileSync(config, `stun_port = ${await freeUdpPair()}\n[room]\nice_servers = []\n${room ? room + '\n' : ''}`);
  const child = spawn(bin, ['--bind', '127.0.0.1:0', '--config', config, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1', TREECAST_LOG: process.env.TREECAST_LOG || 'info', ...env },
  });
  let output = '';
  const base = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('signaller did not start:\n' + output)), 15000);
    const onData = (d) => {
      output += d;
      // eslint-disable-next-line no-control-regex
      const m = output.replace(/\x1b\[[0-9;]*m/g, '').match(/listening on (http:\/\/[0-9.:]+)/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => fail(new Error(`signaller exited (${code}):\n${output}`)));
  });
  return {
    base,
    log: () => output,
    stop: async () => {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await Promise.race([new Promise((r) => child.on('exit', r)), sleep(5000)]);
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      rmSync(configDir, { recursive: true, force: true });
    },
  };
}

/** Starts Chromium; resolves to a handle that opens pages in their own windows. `prefs`:
 *  profile preferences it starts with (e.g. `{ webrtc: { udp_port_range: '49152-50175' } }`). */
export async function startBrowser({ prefs = null } = {}) {
  const exe = process.env.CHROMIUM || '/usr/bin/chromium';
  const profile = mkdtempSync(join(tmpdir(), 'treecast-chromium-'));
  if (prefs) {
    mkdirSync(join(profile, 'Default'));
    writeFileSync(join(profile, 'Default', 'Preferences'), JSON.stringify(prefs));
  }
  const proc = spawn(exe, [...CHROMIUM_FLAGS, `--user-data-dir=${profile}`, '--remote-debugging-port=0',
    '--window-size=480,400', 'about:blank'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  const ws = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('chromium did not start:\n' + err)), 30000);
    proc.stderr.on('data', (d) => {
      err += d;
      const m = err.match(/DevTools listening on (ws:\/\/\S+)/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    });
    proc.on('exit', (code) => fail(new Error(`chromium exited (${code}):\n${err}`)));
  });
  const browser = await chromium.connectOverCDP(ws);
  const context = browser.contexts()[0];
  const cdp = await browser.newBrowserCDPSession();
  const consoles = new Map();
  return {
    browser, context, cdp, pid: proc.pid,
    /** Opens `url` in a new window (not a tab); resolves to {page, name}. */
    async open(url, name = url) {
      const pagePromise = context.waitForEvent('page', { timeout: 30000 });
      await cdp.send('Target.createTarget', { url, newWindow: true });
      const page = await pagePromise;
      const lines = [];
      consoles.set(page, lines);
      page.on('console', (m) => { if (lines.length < 200) lines.push(`[${name}] ${m.type()}: ${m.text()}`); });
      page.on('pageerror', (e) => lines.push(`[${name}] pageerror: ${e.message}`));
      await page.waitForLoadState('domcontentloaded');
      const handle = { page, name, pid: null };
      await page.waitForLoadState('load').catch(() => {});
      await sleep(300); // let the navigation's process swap settle
      await this.identify([handle]);
      return handle;
    },
    /**
     * Finds each page's renderer process (sets `.pid`): Chromium keeps a spare renderer
     * ready, so "the process that appeared with the window" is wrong; instead each page
     * spins for a moment and the process whose CPU time jumps is its own. Done when a page
     * opens, before it relays anything: a relay whose main thread is blocked stops
     * forwarding, and its children would rightly report it stalled.
     */
    async identify(pages) {
      for (const p of pages) {
        const winners = [];
        p.pid = null;
        for (let round = 0; round < 4 && p.pid === null; round++) {
          const pids = rendererPids(proc.pid);
          const before = pids.map((pid) => { try { return cpuSeconds(pid); } catch { return 0; } });
          await p.page.evaluate(() => { const end = performance.now() + 400; while (performance.now() < end) { /* spin */ } }).catch(() => {});
          const deltas = pids.map((pid, i) => { try { return cpuSeconds(pid) - before[i]; } catch { return 0; } });
          const best = deltas.indexOf(Math.max(...deltas));
          if (process.env.TREECAST_DEBUG_PIDS) console.log(p.name, pids, deltas);
          winners.push(deltas[best] >= 0.25 ? pids[best] : null);
          // Two rounds in a row must agree (start-up work of a fresh window is noise).
          if (round > 0 && winners[round] !== null && winners[round] === winners[round - 1]) p.pid = winners[round];
          await sleep(100);
        }
      }
    },
    /**
     * The page's renderer process when `identify` could not tell it at opening (on a busy
     * machine a short spin earns too little CPU for its absolute threshold): the page
     * spins longer, and the process that used clearly the most CPU, twice in a row, is its
     * own. Only for pages that feed nobody yet: a spinning relay stops forwarding.
     */
    async identifyHarder(p) {
      if (p.pid) return;
      const cpu = (pid) => { try { return cpuSeconds(pid); } catch { return 0; } };
      const votes = [];
      for (let round = 0; round < 6; round++) {
        const pids = rendererPids(proc.pid);
        const before = pids.map(cpu);
        await p.page.evaluate(() => { const end = performance.now() + 800; while (performance.now() < end) { /* spin */ } }).catch(() => {});
        const deltas = pids.map((pid, i) => cpu(pid) - before[i]);
        const order = deltas.map((_, i) => i).sort((a, b) => deltas[b] - deltas[a]);
        const [best, second] = order;
        votes.push(deltas[best] >= 0.05 && deltas[best] >= 2 * (deltas[second] ?? 0) ? pids[best] : null);
        if (round > 0 && votes[round] !== null && votes[round] === votes[round - 1]) { p.pid = votes[round]; return; }
        await sleep(100);
      }
    },
    consoleOf: (page) => (consoles.get(page) || []).join('\n'),
    async close() {
      // Browser.close shuts every Chromium process down; after a SIGKILL of the browser
      // alone its children linger for a while on a busy box, still writing the profile.
      await cdp.send('Browser.close').catch(() => {});
      if (proc.exitCode === null) await Promise.race([new Promise((r) => proc.once('exit', r)), sleep(5000)]);
      await browser.close().catch(() => {});
      proc.kill('SIGKILL');
      await sleep(200);
      try {
        rmSync(profile, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 });
      } catch (e) {
        console.warn(`could not remove the browser profile ${profile}: ${e.message}`);
      }
    },
  };
}

/** Renderer processes below Chromium's browser process. */
export function rendererPids(browserPid) {
  const out = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8');
      if (cmd.includes('--type=renderer') && !cmd.includes('--extension-process') && descends(Number(d), browserPid)) out.push(Number(d));
    } catch { /* gone */ }
  }
  return out;
}

function descends(pid, ancestor) {
  for (let p = pid, i = 0; p > 1 && i < 10; i++) {
    if (p === ancestor) return true;
    try { p = Number(readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')[1]); } catch { return false; }
  }
  return false;
}

/** CPU time (s) used by a process so far. */
export function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in clock ticks (USER_HZ = 100)
}

/** Media counters of a viewer page: its status and its parent connection's inbound stats. */
export function media(page) {
  return page.evaluate(async () => {
    const t = window.treecast;
    if (!t || !t.peer) return { ready: false, phase: document.body.dataset.phase };
    const p = t.peer;
    const out = { ready: true, phase: p.status?.phase, depth: p.status?.depth, parent: p.status?.parent,
      media: p.status?.media, peerId: p.status?.peer_id, frames: 0, audioBytes: 0, audioSamples: 0 };
    if (p.parent) {
      const stats = await p.parent.pc.getStats();
      stats.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        if (s.kind === 'video') out.frames = s.framesDecoded || 0;
        if (s.kind === 'audio') { out.audioBytes = s.bytesReceived || 0; out.audioSamples = s.totalSamplesReceived || 0; }
      });
    }
    out.info = { socketOpenedAt: p.info.socketOpenedAt, firstFrameShownAt: p.info.firstFrameShownAt };
    return out;
  });
}

/** Starts recording when each video frame is presented (Date.now()), across parent changes. */
export function recordFrames(page) {
  return page.evaluate(() => {
    const v = document.getElementById('video');
    window.__frames = [];
    const tick = () => { window.__frames.push(Date.now()); v.requestVideoFrameCallback(tick); };
    v.requestVideoFrameCallback(tick);
  });
}

/** Waits until every page has presented 10 frames more than a second after `since`
 *  (`recordFrames` must have run on it). */
export function playingAgain(pages, since, boundMs) {
  return Promise.all(pages.map((v) => waitFor(`${v.name} playing again`, () => v.page.evaluate((t) =>
    window.__frames.filter((f) => f > t + 1000).length >= 10, since), boundMs)));
}

/** The longest gap between presented frames that ends after `since`, in ms, and when the
 *  frame that ended it came (ms after `since`; null without a gap). */
export function longestGapAfter(page, since) {
  return page.evaluate((t) => {
    const f = window.__frames.filter((x) => x > t - 2000);
    let gap = 0, resumedAt = null;
    for (let i = 1; i < f.length; i++) {
      const g = f[i] - Math.max(f[i - 1], t);
      if (f[i] > t && g > gap) { gap = g; resumedAt = f[i]; }
    }
    return { gap, resumed: resumedAt === null ? null : resumedAt - t };
  }, since);
}

/**
 * Reads `n` frames of the page's video with MediaStreamTrackProcessor and decodes the
 * clock the test pattern draws (48 blocks): glass-to-glass latencies in ms.
 */
export function glassToGlass(page, n = 45) {
  return page.evaluate(async (n) => {
    const track = window.treecast.peer.tracks.video.clone();
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    const canvas = new OffscreenCanvas(16, 16);
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    const lat = [];
    for (let i = 0; i < n; i++) {
      const { value: frame, done } = await reader.read();
      if (done) break;
      const arrived = Date.now();
      const w = frame.displayWidth, h = frame.displayHeight;
      if (canvas.width !== w) { canvas.width = w; canvas.height = h; }
      ctx.drawImage(frame, 0, 0);
      frame.close();
      const bw = w / 16, bh = Math.min(16, h / 12);
      let ts = 0;
      for (let b = 0; b < 48; b++) {
        const px = ctx.getImageData(Math.floor((b % 16) * bw + bw / 2), Math.floor(Math.floor(b / 16) * bh + bh / 2), 1, 1).data;
        if (px[0] + px[1] + px[2] > 3 * 128) ts += 2 ** b;
      }
      const d = arrived - ts;
      if (d >= 0 && d < 10000) lat.push(d);
    }
    reader.cancel();
    track.stop();
    return lat;
  }, n);
}

export function percentile(xs, p) {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

/**
 * A broadcaster page goes live with the 320x240 test pattern at 15 fps, then `viewers`
 * pages open its link one at a time (so placement is in joining order), each decoding
 * before the next opens. Resolves to {broadcaster, room, link, viewers}; `pushTo`, when
 * given, gets each viewer as it opens (so a failing suite can print its console).
 */
export async function broadcastWithViewers(browser, base, viewers, boundMs, pushTo = []) {
  const broadcaster = await browser.open(`${base}/?w=320&h=240&fps=15`, 'broadcaster');
  const page = broadcaster.page;
  await page.check('input[name=source][value=pattern]');
  await page.click('#go-live');
  await waitFor('the room link', () => page.evaluate(() => window.treecast && window.treecast.link), boundMs);
  const { room, link } = await page.evaluate(() => ({ room: window.treecast.room, link: window.treecast.link }));
  for (let i = 0; i < viewers; i++) {
    const v = await browser.open(link, `viewer${i + 1}`);
    pushTo.push(v);
    await waitFor(`viewer ${i + 1} decoding`, async () => (await media(v.page)).frames > 0, boundMs);
  }
  return { broadcaster, room, link, viewers: pushTo };
}

/**
 * The scaffolding of a live-broadcast suite: a signaller (with `serverArgs`, and
 * `serverRoom` lines in its config's [room] table) and a browser
 * started before the steps, both stopped after them, and what the steps measured written to
 * `target/<measurementsFile>`. `step` declares a step that builds on the previous ones:
 * after a failure the later steps are skipped rather than piling up errors, and the pages
 * `pages()` returns print their console output to explain the failure.
 */
export function liveSuite({ it, before, after, serverArgs, serverRoom, measurementsFile, pages }) {
  const suite = { server: null, browser: null, measured: {} };
  let broken = false;
  suite.step = (name, fn) => it(name, async (t) => {
    if (broken) return t.skip('an earlier step failed');
    try { await fn(t); } catch (e) { broken = true; throw e; }
  });
  before(async () => {
    suite.server = await startServer(serverArgs, { room: serverRoom });
    suite.browser = await startBrowser();
  });
  after(async () => {
    // The server stops even if closing the browser failed: a signaller left running keeps
    // the test process alive.
    try {
      if (suite.browser) {
        if (broken) for (const p of pages()) if (p) console.log(suite.browser.consoleOf(p.page));
        await suite.browser.close();
      }
    } finally {
      if (suite.server) await suite.server.stop();
    }
    mkdirSync(join(repo, 'target'), { recursive: true });
    writeFileSync(join(repo, 'target', measurementsFile), JSON.stringify(suite.measured, null, 2));
  });
  return suite;
}
