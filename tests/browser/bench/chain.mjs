// Measurement, not a test (scripts/test does not run it): a chain of relaying pages
// (root and relay fan-out 1), glass-to-glass latency at every depth, join-to-first-frame,
// and CPU per page. Usage, after scripts/test or scripts/build-client + cargo build:
//   node tests/browser/bench/chain.mjs [depth=5] [WxH@fps=320x240@15]
import { startServer, startBrowser, waitFor, sleep, media, glassToGlass, percentile, cpuSeconds } from '../harness.mjs';

const depth = Number(process.argv[2] || 5);
const [, w, h, fps] = (process.argv[3] || '320x240@15').match(/(\d+)x(\d+)@(\d+)/);
const server = await startServer(['--root-fanout', '1', '--relay-fanout', '1', '--max-depth', String(depth + 1)]);
const browser = await startBrowser();
try {
  const b = await browser.open(`${server.base}/?w=${w}&h=${h}&fps=${fps}`, 'broadcaster');
  await b.page.check('input[name=source][value=pattern]');
  await b.page.click('#go-live');
  const link = await waitFor('link', () => b.page.evaluate(() => window.treecast && window.treecast.link), 60000);
  const viewers = [];
  for (let i = 1; i <= depth; i++) {
    const v = await browser.open(link, `viewer${i}`);
    await waitFor(`viewer ${i} decoding`, async () => (await media(v.page)).frames > 0, 60000);
    viewers.push(v);
  }
  await sleep(3000);
  const joins = [];
  for (const v of viewers) {
    const m = await media(v.page);
    joins.push(Math.round(m.info.firstFrameShownAt - m.info.socketOpenedAt));
  }
  const lat = await Promise.all(viewers.map((v) => glassToGlass(v.page, 150)));
  const pages = [b, ...viewers];
  const c0 = pages.map((p) => (p.pid ? cpuSeconds(p.pid) : 0));
  await sleep(10000);
  const cpu = pages.map((p, i) => (p.pid ? Math.round(10 * (cpuSeconds(p.pid) - c0[i])) : null));
  console.log(JSON.stringify({ size: `${w}x${h}@${fps}`, join_ms_by_depth: joins,
    glass_to_glass_ms_by_depth: lat.map((xs, i) => ({ depth: i + 1, frames: xs.length, p50: percentile(xs, 50), p95: percentile(xs, 95) })),
    cpu_percent_by_depth: cpu }, null, 1));
} finally {
  await browser.close();
  await server.stop();
}
