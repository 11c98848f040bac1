// Measurement, not a test (scripts/test does not run it): a chain of relaying pages
// (root and relay fan-out 1), glass-to-glass latency at every depth, join-to-first-frame,
// CPU per page and what each depth decodes (size, fps, QP), for each relay mode in turn in
// one run: pass-through (the default in Chromium) and track relay (every viewer opened
// with the watch page's test switch ?relay=track). Usage, after scripts/test or
// scripts/build-client + cargo build:
//   node tests/browser/bench/chain.mjs [depth=5] [WxH@fps=320x240@15] [modes=pass-through,track]
import { loadavg } from 'node:os';
import { startServer, startBrowser, waitFor, sleep, media, glassToGlass, percentile, cpuSeconds } from '../harness.mjs';

const depth = Number(process.argv[2] || 5);
const [, w, h, fps] = (process.argv[3] || '320x240@15').match(/(\d+)x(\d+)@(\d+)/);
const modes = (process.argv[4] || 'pass-through,track').split(',');

/** Decoded size, frame rate and mean QP over `ms` of the page's parent link, and each
 *  kind's mean jitter-buffer delay, target and minimum (ms; the minimum is where
 *  libwebrtc's audio/video sync puts the delay it adds). */
async function quality(page, ms = 5000) {
  const read = () => page.evaluate(async () => {
    const out = { at: performance.now() };
    (await window.treecast.peer.parent.pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') out[s.kind] = s; });
    return out;
  });
  const a = await read();
  await sleep(ms);
  const b = await read();
  const v = b.video, n = v.framesDecoded - a.video.framesDecoded;
  const jb = (kind) => {
    const x = a[kind], y = b[kind];
    const k = y && x ? y.jitterBufferEmittedCount - x.jitterBufferEmittedCount : 0;
    const avg = (f) => Number(((1000 * (y[f] - x[f])) / k).toFixed(1));
    return k > 0 ? { delay: avg('jitterBufferDelay'), target: avg('jitterBufferTargetDelay'), minimum: avg('jitterBufferMinimumDelay') } : null;
  };
  return { size: `${v.frameWidth}x${v.frameHeight}`, fps: Number(((1000 * n) / (b.at - a.at)).toFixed(1)),
    qp: n > 0 ? Number(((v.qpSum - a.video.qpSum) / n).toFixed(1)) : null,
    jitter_buffer_ms: { video: jb('video'), audio: jb('audio') } };
}

async function run(mode) {
  const server = await startServer(['--root-fanout', '1', '--relay-fanout', '1', '--max-depth', String(depth + 1)]);
  const browser = await startBrowser();
  try {
    const b = await browser.open(`${server.base}/?w=${w}&h=${h}&fps=${fps}`, 'broadcaster');
    await b.page.check('input[name=source][value=pattern]');
    await b.page.click('#go-live');
    const link = await waitFor('link', () => b.page.evaluate(() => window.treecast && window.treecast.link), 60000);
    const viewers = [];
    for (let i = 1; i <= depth; i++) {
      const v = await browser.open(mode === 'track' ? `${link}?relay=track` : link, `viewer${i}`);
      await waitFor(`viewer ${i} decoding`, async () => (await media(v.page)).frames > 0, 60000);
      viewers.push(v);
    }
    await sleep(3000);
    const relayModes = await Promise.all(viewers.slice(0, -1).map((v) => v.page.evaluate(() => Object.values(window.treecast.peer.info.relay.modes))));
    const joins = [];
    for (const v of viewers) {
      const m = await media(v.page);
      joins.push(Math.round(m.info.firstFrameShownAt - m.info.socketOpenedAt));
    }
    const load = loadavg().map((x) => Number(x.toFixed(2)));
    const lat = await Promise.all(viewers.map((v) => glassToGlass(v.page, 150)));
    const pages = [b, ...viewers];
    const c0 = pages.map((p) => (p.pid ? cpuSeconds(p.pid) : 0));
    const t0 = Date.now();
    const q = await Promise.all(viewers.map((v) => quality(v.page, 10000)));
    const secs = (Date.now() - t0) / 1000;
    const cpu = pages.map((p, i) => (p.pid ? Math.round((100 * (cpuSeconds(p.pid) - c0[i])) / secs) : null));
    const p50 = lat.map((xs) => percentile(xs, 50)), p95 = lat.map((xs) => percentile(xs, 95));
    return { mode, size: `${w}x${h}@${fps}`, load_average: load, relay_modes_seen: relayModes.flat(),
      join_ms_by_depth: joins,
      glass_to_glass_ms_by_depth: lat.map((xs, i) => ({ depth: i + 1, frames: xs.length, p50: p50[i], p95: p95[i] })),
      per_hop_ms: { p50: Number(((p50[depth - 1] - p50[0]) / (depth - 1)).toFixed(1)), p95: Number(((p95[depth - 1] - p95[0]) / (depth - 1)).toFixed(1)) },
      // Depth 1 can play later than depth 2 (see docs/performance.md, "Pass-through relay in
      // Chromium, integrated"): the slope from depth 2 on is the fairer per-hop figure.
      per_hop_from_depth_2_ms: depth > 2 ? { p50: Number(((p50[depth - 1] - p50[1]) / (depth - 2)).toFixed(1)), p95: Number(((p95[depth - 1] - p95[1]) / (depth - 2)).toFixed(1)) } : null,
      quality_by_depth: q.map((x, i) => ({ depth: i + 1, ...x })),
      cpu_percent_of_a_core: { broadcaster: cpu[0], by_depth: cpu.slice(1) },
      load_average_end: loadavg().map((x) => Number(x.toFixed(2))) };
  } finally {
    await browser.close();
    await server.stop();
  }
}

const out = [];
for (const mode of modes) out.push(await run(mode));
console.log(JSON.stringify(out, null, 1));
