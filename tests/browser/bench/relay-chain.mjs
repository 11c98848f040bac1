// Measurement, not a test (scripts/test does not run it): web/relay.js in a chain of
// relaying nodes in one page (tests/browser/relay/page.js), first with pass-through relay,
// then with track relay (decode + re-encode per hop): glass-to-glass latency at every depth
// (the test pattern's clock read back), resolution at every depth, and the CPU of the whole
// browser over a window. No signaller needed. Usage:
//   node tests/browser/bench/relay-chain.mjs [depth=5] [WxH@fps=640x360@15] [seconds=20]
import { readdirSync, readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { startBrowser, waitFor, sleep, percentile, cpuSeconds } from '../harness.mjs';
import { serveBench } from '../relay/serve.mjs';

const depth = Number(process.argv[2] || 5);
const [, w, h, fps] = (process.argv[3] || '640x360@15').match(/(\d+)x(\d+)@(\d+)/);
const seconds = Number(process.argv[4] || 20);

const server = await serveBench();
const browser = await startBrowser();

/** CPU seconds so far of every process of the browser (browser, GPU, utility, renderers),
 *  in total and by thread name (WebRTC's, the workers', the codecs' threads). */
function browserCpu() {
  let total = 0;
  const byThread = {};
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      let p = Number(d);
      for (let k = 0; k < 10 && p > 1; k++) {
        if (p === browser.pid) {
          total += cpuSeconds(Number(d));
          for (const t of readdirSync(`/proc/${d}/task`)) {
            try {
              const stat = readFileSync(`/proc/${d}/task/${t}/stat`, 'utf8');
              const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')).replace(/[0-9]+$/, '#');
              const f = stat.split(') ')[1].split(' ');
              byThread[name] = (byThread[name] || 0) + (Number(f[11]) + Number(f[12])) / 100;
            } catch { /* gone */ }
          }
          break;
        }
        p = Number(readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1].split(' ')[1]);
      }
    } catch { /* gone */ }
  }
  return { total, byThread };
}

/**
 * From the relays' traces (every node's worker, one clock: one page): per hop, the time a
 * frame takes from one node's transform to the next one's (matched by RTP timestamp), and
 * per depth how long Chromium held video frames between their last packet and the
 * transform (ms, p50 / p95).
 */
function hops(traces) {
  const q = (xs) => `${percentile(xs, 50).toFixed(1)} / ${percentile(xs, 95).toFixed(1)}`;
  const out = { transform_to_transform_ms_by_hop: { video: [], audio: [] }, video_hold_ms_by_depth: [] };
  for (const kind of ['video', 'audio']) {
    const at = traces.map((t) => new Map(t.filter((f) => f.kind === kind).map((f) => [f.ts, f.at])));
    for (let i = 1; i < traces.length; i++) {
      const xs = [];
      for (const [ts, t] of at[i - 1]) if (at[i].has(ts)) xs.push(at[i].get(ts) - t);
      out.transform_to_transform_ms_by_hop[kind].push(xs.length ? q(xs) : null);
    }
  }
  for (const t of traces) {
    const xs = t.filter((f) => f.kind === 'video' && f.hold !== null).map((f) => f.hold);
    out.video_hold_ms_by_depth.push(xs.length ? q(xs) : null);
  }
  return out;
}

try {
  const { page } = await browser.open(`${server.base}/`, 'bench');
  await waitFor('the bench page', () => page.evaluate(() => window.bench && window.bench.ready), 30000);
  const inbound = (i) => page.evaluate((i) => window.bench.inbound(i), i);
  const result = { size: `${w}x${h}@${fps}`, depth };
  for (const passThrough of [true, false]) {
    await page.evaluate(({ depth, passThrough, size }) => window.bench.chain(depth, { passThrough, size }),
      { depth, passThrough, size: { width: Number(w), height: Number(h), fps: Number(fps) } });
    for (let i = 1; i <= depth; i++) await waitFor(`node ${i} decoding`, async () => (await inbound(i)).framesDecoded > 10, 60000);
    await sleep(4000);
    if (passThrough) await page.evaluate((d) => { for (let i = 1; i <= d; i++) window.bench.startTrace(i); }, depth);
    const lat = await page.evaluate((depth) => Promise.all(Array.from({ length: depth }, (_, i) => window.bench.glassToGlass(i + 1, 90))), depth);
    const traces = passThrough ? await page.evaluate((d) => Promise.all(Array.from({ length: d }, (_, i) => window.bench.stopTrace(i + 1))), depth) : null;
    const load0 = loadavg();
    const c0 = browserCpu();
    const t0 = Date.now();
    await sleep(seconds * 1000);
    const c1 = browserCpu();
    const secs = (Date.now() - t0) / 1000;
    const cores = (c1.total - c0.total) / secs;
    const threads = Object.entries(c1.byThread).map(([k, v]) => [k, (v - (c0.byThread[k] || 0)) / secs])
      .filter(([, v]) => v >= 0.005).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v.toFixed(3)}`);
    const byDepth = lat.map((xs, i) => ({ depth: i + 1, frames: xs.length, p50: percentile(xs, 50), p95: percentile(xs, 95) }));
    const at = [];
    for (let i = 1; i <= depth; i++) { const m = await inbound(i); at.push(`${m.width}x${m.height}@${m.fps}`); }
    const extra = traces ? hops(traces) : {};
    result[passThrough ? 'pass_through' : 'track'] = {
      ...extra,
      glass_to_glass_ms_by_depth: byDepth,
      added_per_hop_ms: { p50: (byDepth[depth - 1].p50 - byDepth[0].p50) / (depth - 1), p95: (byDepth[depth - 1].p95 - byDepth[0].p95) / (depth - 1) },
      browser_cpu_cores: Number(cores.toFixed(3)),
      cpu_cores_by_thread: threads,
      received_by_depth: at,
      load_average_before: load0.map((x) => x.toFixed(2)).join(' '),
      load_average_after: loadavg().map((x) => x.toFixed(2)).join(' '),
    };
  }
  console.log(JSON.stringify(result, null, 1));
} finally {
  await browser.close();
  await server.stop();
}
