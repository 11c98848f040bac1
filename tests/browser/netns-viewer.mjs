// One headless Chromium viewer, for the NAT test bed (peer/tests/nat.rs), which runs this
// inside a host namespace behind a NAT: `node netns-viewer.mjs WATCH_URL`. Prints one JSON
// object per second on stdout: the page's phase, depth and parent, what arrived from the
// parent (RTP packets and bytes: the native broadcaster's synthetic stream does not decode,
// so frames say nothing), and the types of the selected candidate pair. Runs until killed.
import { startBrowser, sleep } from './harness.mjs';

const url = process.argv[2];
if (!url) {
  console.error('usage: node netns-viewer.mjs WATCH_URL');
  process.exit(2);
}

const browser = await startBrowser();
const { page } = await browser.open(url, 'viewer');
const started = Date.now();
for (;;) {
  const status = await page.evaluate(async () => {
    const p = window.treecast && window.treecast.peer;
    if (!p) return { ready: false };
    const out = { ready: true, phase: p.status?.phase, depth: p.status?.depth ?? null,
      parent: p.status?.parent ?? null, peer: p.status?.peer_id ?? null,
      packets: 0, bytes: 0, local: null, remote: null };
    if (p.parent) {
      const stats = await p.parent.pc.getStats();
      const byId = new Map();
      let pairId = null;
      stats.forEach((s) => {
        byId.set(s.id, s);
        if (s.type === 'inbound-rtp' && s.kind === 'video') {
          out.packets = s.packetsReceived || 0;
          out.bytes = s.bytesReceived || 0;
        }
        if (s.type === 'transport') pairId = s.selectedCandidatePairId;
      });
      const pair = pairId && byId.get(pairId);
      if (pair) {
        out.local = byId.get(pair.localCandidateId)?.candidateType ?? null;
        out.remote = byId.get(pair.remoteCandidateId)?.candidateType ?? null;
      }
    }
    return out;
  }).catch((e) => ({ ready: false, error: e.message }));
  console.log(JSON.stringify({ ...status, ms: Date.now() - started }));
  await sleep(1000);
}
