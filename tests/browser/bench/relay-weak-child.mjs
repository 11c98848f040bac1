// Measurement, not a test (scripts/test does not run it; needs root): a relay with two
// children whose legs are capped by tc at KBPS, one pass-through and one track relay, and
// one uncapped pass-through child for comparison: what the relay measures per child
// (web/relay.js onStats: sent vs available bit rate, loss, NACKs) and what the children
// get (frames, freezes). It runs itself in a private network namespace whose loopback
// carries the caps (10.9.0.2 and 10.9.0.3 are the capped children's addresses), so the
// machine's own loopback is untouched. Usage: node tests/browser/bench/relay-weak-child.mjs [kbps=250] [seconds=20]
import { spawnSync, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const kbps = Number(process.argv[2] || 250);
const seconds = Number(process.argv[3] || 20);

if (!process.env.RELAY_BENCH_NS) {
  const ns = `treecast-relaycap-${process.pid}`;
  const ip = (...a) => execFileSync('ip', a, { stdio: 'inherit' });
  const tc = (...a) => execFileSync('ip', ['netns', 'exec', ns, 'tc', ...a], { stdio: 'inherit' });
  ip('netns', 'add', ns);
  try {
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    // One address per interface: Chromium gathers one host candidate per interface.
    ip('-n', ns, 'link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1');
    ip('-n', ns, 'link', 'add', 'v2', 'type', 'veth', 'peer', 'name', 'v3');
    for (const d of ['v0', 'v1', 'v2', 'v3']) ip('-n', ns, 'link', 'set', d, 'up');
    ip('-n', ns, 'addr', 'add', '10.9.0.1/24', 'dev', 'v0');
    ip('-n', ns, 'addr', 'add', '10.9.0.2/24', 'dev', 'v1');
    ip('-n', ns, 'addr', 'add', '10.9.0.3/24', 'dev', 'v2');
    // Traffic between local addresses goes over loopback: cap what goes to .2 and .3,
    // with a short queue (30 packets) as a slow access link would drop.
    tc('qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '10');
    tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:10', 'htb', 'rate', '10gbit');
    for (const [n, addr] of [[20, '10.9.0.2'], [30, '10.9.0.3']]) {
      tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', `1:${n}`, 'htb', 'rate', `${kbps}kbit`, 'ceil', `${kbps}kbit`);
      tc('qdisc', 'add', 'dev', 'lo', 'parent', `1:${n}`, 'handle', `${n}:`, 'pfifo', 'limit', '30');
      tc('filter', 'add', 'dev', 'lo', 'parent', '1:', 'protocol', 'ip', 'u32', 'match', 'ip', 'dst', `${addr}/32`, 'flowid', `1:${n}`);
    }
    const r = spawnSync('ip', ['netns', 'exec', ns, process.execPath, fileURLToPath(import.meta.url), ...process.argv.slice(2)],
      { stdio: 'inherit', env: { ...process.env, RELAY_BENCH_NS: ns } });
    process.exitCode = r.status ?? 1;
  } finally {
    ip('netns', 'del', ns);
  }
} else {
  const { startBrowser, waitFor, sleep } = await import('../harness.mjs');
  const { serveBench } = await import('../relay/serve.mjs');
  const server = await serveBench();
  const browser = await startBrowser();
  try {
    const { page } = await browser.open(`${server.base}/`, 'bench');
    await waitFor('the bench page', () => page.evaluate(() => window.bench && window.bench.ready), 30000);
    const plain = { out: '10.9.0.1', inc: '10.9.0.1' };
    await page.evaluate(async ({ plain }) => {
      const b = window.bench;
      b.source({ width: 640, height: 360, fps: 15 });
      for (let i = 1; i <= 4; i++) b.addNode();
      await b.link(0, 1, { addresses: plain });
      await b.link(1, 2, { addresses: { out: '10.9.0.1', inc: '10.9.0.2' } });
      await b.link(1, 3, { addresses: { out: '10.9.0.1', inc: '10.9.0.3' }, mode: 'track' });
      await b.link(1, 4, { addresses: plain });
    }, { plain });
    for (const i of [1, 2, 3, 4]) await waitFor(`node ${i} decoding`, () => page.evaluate(async (i) => (await window.bench.inbound(i)).framesDecoded > 0, i), 60000);
    await sleep(5000);
    const before = await page.evaluate(async () => { await window.bench.measure(1); return Promise.all([2, 3, 4].map((i) => window.bench.inbound(i))); });
    await sleep(seconds * 1000);
    const [stats, after] = await page.evaluate(async () => [await window.bench.measure(1), await Promise.all([2, 3, 4].map((i) => window.bench.inbound(i)))]);
    const names = { '1->2': `pass-through, capped ${kbps} kbit/s`, '1->3': `track, capped ${kbps} kbit/s`, '1->4': 'pass-through, uncapped' };
    const out = stats.map((s) => {
      const i = Number(s.id.split('->')[1]) - 2;
      const a = before[i], b = after[i];
      return { child: names[s.id], modes: s.modes,
        relay_sees: { sent_kbps: Math.round(s.sendBitrate / 1000), available_outgoing_kbps: Math.round(s.availableOutgoingBitrate / 1000),
          packets_lost: s.packetsLost, fraction_lost: s.fractionLost, nacks: s.nackCount, rtt_ms: s.rttMs, retransmitted_bytes: s.retransmittedBytesSent },
        child_gets: { fps: Number(((b.framesDecoded - a.framesDecoded) / seconds).toFixed(1)), freezes: b.freezeCount - a.freezeCount,
          frozen_s: Number((b.totalFreezesDuration - a.totalFreezesDuration).toFixed(1)), size: `${b.width}x${b.height}`,
          pli_sent: b.pliCount - a.pliCount } };
    });
    const keyRequests = await page.evaluate(() => window.bench.events(1).filter((e) => e.type === 'keyRequest').map((e) => e.why));
    const byWhy = {};
    for (const w of keyRequests) byWhy[w] = (byWhy[w] || 0) + 1;
    out.push({ relay_key_frame_requests_upstream_by_cause: byWhy });
    console.log(JSON.stringify({ cap_kbps: kbps, window_s: seconds, children: out }, null, 1));
  } finally {
    await browser.close();
    await server.stop();
  }
}
