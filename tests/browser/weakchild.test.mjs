// A weak child of a pass-through relay, end to end through the signaller and the real
// pages: frames passed through ignore WebRTC's rate control, so a child whose link cannot
// carry the stream must be noticed by its relay (web/client.js watchChildren) and get a
// re-encoded leg under congestion control (the room may move it first, on its loss reports;
// its new relay must then do the same). The child keeps
// playing; its sibling on the same relay is unaffected.
//
// Needs root: the test runs itself in a private network namespace (so the machine's own
// loopback is untouched) whose loopback caps UDP sent to the weak child at CAP_KBPS. The
// weak child runs in a browser of its own whose WebRTC sockets take their ports from
// WEAK_PORTS, a range the namespace keeps out of every other socket's ephemeral ports,
// and the cap matches those destination ports: every path to the weak child is capped.
// (A cap by address is not enough: all pages share the namespace's addresses, and ICE
// finds a peer-reflexive path through an address the weak child never offered.) The
// namespace is deleted however the run ends.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { loadavg } from 'node:os';
import { existsSync, rmSync } from 'node:fs';
import { join, resolve, dirname } from 'node:path';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

const CAP_KBPS = 150;          // the stream (320x240@15 test pattern) needs more
const LIVE_BOUND_MS = 60000;
const WEAK_BOUND_MS = 60000;   // noticed and handled (two 2 s samples, plus slack)
const WINDOW_MS = 10000;       // frames counted over this window afterwards
// The weak child's browser's WebRTC ports: aligned, so one u32 match with a mask covers them.
const WEAK_PORTS = { first: 49152, mask: 0xfc00, last: 49152 + 0x3ff };

if (!process.env.TREECAST_WEAK_NS) {
  describe('a weak child (in a private network namespace with a capped downlink)', { timeout: 420000 }, () => {
    it('gets a track leg or is moved, keeps playing, and its sibling is unaffected', async () => {
      const ns = `treecast-weak-${process.pid}`;
      const ip = (...a) => execFileSync('ip', a, { stdio: ['ignore', 'ignore', 'inherit'] });
      const tc = (...a) => execFileSync('ip', ['netns', 'exec', ns, 'tc', ...a], { stdio: ['ignore', 'ignore', 'inherit'] });
      rmSync(join(repo, 'target', 'browser-weakchild.json'), { force: true });
      ip('netns', 'add', ns); // throws without root: this test needs it (CI runs as root)
      const cleanup = () => { try { execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' }); } catch { /* gone */ } };
      process.once('exit', cleanup); // also on an interrupted run
      try {
        ip('-n', ns, 'link', 'set', 'lo', 'up');
        // One address for host candidates (Chromium gathers none on loopback).
        ip('-n', ns, 'link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1');
        for (const d of ['v0', 'v1']) ip('-n', ns, 'link', 'set', d, 'up');
        ip('-n', ns, 'addr', 'add', '10.9.0.1/24', 'dev', 'v0');
        // No other socket of the namespace (the other browser's, the signaller's) may take
        // a port of the weak child's range.
        execFileSync('ip', ['netns', 'exec', ns, 'sysctl', '-q', '-w', `net.ipv4.ip_local_port_range=32768 ${WEAK_PORTS.first - 1}`],
          { stdio: ['ignore', 'ignore', 'inherit'] });
        // Traffic between local addresses goes over loopback: cap UDP to the weak child's
        // ports, with a short queue (30 packets) as a slow access link would drop.
        tc('qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '10');
        tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:10', 'htb', 'rate', '10gbit');
        tc('class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:30', 'htb', 'rate', `${CAP_KBPS}kbit`, 'ceil', `${CAP_KBPS}kbit`);
        tc('qdisc', 'add', 'dev', 'lo', 'parent', '1:30', 'handle', '30:', 'pfifo', 'limit', '30');
        tc('filter', 'add', 'dev', 'lo', 'parent', '1:', 'protocol', 'ip', 'u32', 'match', 'ip', 'protocol', '17', '0xff',
          'match', 'ip', 'dport', String(WEAK_PORTS.first), `0x${WEAK_PORTS.mask.toString(16)}`, 'flowid', '1:30');
        // A plain node run of this file (node:test runs its tests and sets the exit code);
        // without the runner's context variable, or it would skip them as a nested run.
        const env = { ...process.env, TREECAST_WEAK_NS: ns };
        delete env.NODE_TEST_CONTEXT;
        const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '--test-reporter=spec', fileURLToPath(import.meta.url)],
          { stdio: 'inherit', env });
        const code = await new Promise((ok) => child.on('exit', (c, sig) => ok(c ?? sig)));
        assert.equal(code, 0, 'the run inside the namespace passed (its output is above)');
        assert.ok(existsSync(join(repo, 'target', 'browser-weakchild.json')), 'the run inside wrote its measurements');
      } finally {
        cleanup();
        process.removeListener('exit', cleanup);
      }
    });
  });
} else {
  const { liveSuite, startBrowser, waitFor, sleep, media } = await import('./harness.mjs');

  /** Video frames decoded from the parent so far, and the current parent's id. */
  const frames = (page) => page.evaluate(async () => {
    const p = window.treecast.peer;
    let n = 0;
    if (p.parent) (await p.parent.pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.framesDecoded || 0; });
    return { n, parent: p.status?.parent ?? null };
  });

  /** The addresses of the weak child's parent link: the selected candidate pair, and every
   *  pair that works (any of them could be selected). */
  const pairs = (page) => page.evaluate(async () => {
    const p = window.treecast.peer;
    if (!p.parent) return null;
    const stats = await p.parent.pc.getStats();
    const at = (id) => { const c = stats.get(id); return c ? `${c.address}:${c.port}/${c.candidateType}` : null; };
    let selected = null;
    stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) selected = s.selectedCandidatePairId; });
    const out = { selected: null, working: [] };
    stats.forEach((s) => {
      if (s.type !== 'candidate-pair' || s.state !== 'succeeded') return;
      const pair = `${at(s.localCandidateId)} -> ${at(s.remoteCandidateId)}`;
      out.working.push(pair);
      if (s.id === selected) out.selected = pair;
    });
    return out;
  });

  describe('inside the namespace: a relay, a sibling and a capped child', { timeout: 400000 }, () => {
    let broadcaster, relay, sibling, weak, room, weakBrowser;
    const log = (...a) => console.log('   ', ...a);
    const suite = liveSuite({
      it, before, after,
      serverArgs: ['--root-fanout', '1', '--relay-fanout', '2'],
      measurementsFile: 'browser-weakchild.json',
      pages: () => [broadcaster, relay, sibling, weak],
    });
    const { step, measured } = suite;
    before(async () => {
      weakBrowser = await startBrowser({ prefs: { webrtc: { udp_port_range: `${WEAK_PORTS.first}-${WEAK_PORTS.last}` } } });
    });
    after(async () => { if (weakBrowser) await weakBrowser.close(); });
    const snapshot = async () => (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();

    step('a relay feeds two children by pass-through; one of them sits behind the cap', async () => {
      broadcaster = await suite.browser.open(`${suite.server.base}/?w=320&h=240&fps=15`, 'broadcaster');
      await broadcaster.page.check('input[name=source][value=pattern]');
      await broadcaster.page.click('#go-live');
      const link = await waitFor('the room link', () => broadcaster.page.evaluate(() => window.treecast && window.treecast.link), LIVE_BOUND_MS);
      room = await broadcaster.page.evaluate(() => window.treecast.room);
      relay = await suite.browser.open(`${link}?ice_only=10.9.0.1`, 'relay');
      await waitFor('the relay decoding', async () => (await media(relay.page)).frames > 0, LIVE_BOUND_MS);
      sibling = await suite.browser.open(`${link}?ice_only=10.9.0.1`, 'sibling');
      await waitFor('the sibling decoding', async () => (await media(sibling.page)).frames > 0, LIVE_BOUND_MS);
      weak = await weakBrowser.open(`${link}?ice_only=10.9.0.1`, 'weak');
      for (const p of [relay, sibling, weak]) p.peerId = (await waitFor(`${p.name} joined`, async () => (await media(p.page)).peerId, LIVE_BOUND_MS));
      const s = await snapshot();
      const parentOf = (id) => s.peers.find((p) => p.id === id)?.parent;
      assert.equal(parentOf(sibling.peerId), relay.peerId, 'the sibling is the relay\'s child');
      assert.equal(parentOf(weak.peerId), relay.peerId, 'the weak child is the relay\'s child');
    });

    step('the relay notices the weak child and gives it a track leg (or the room moves it)', async () => {
      const t0 = Date.now();
      let last = null;
      const how = await waitFor('the weak child handled', async () => {
        const s = await snapshot();
        last = s;
        // Its downlink is what is capped: whichever relay feeds it (the room may move it
        // under the sibling, a pass-through relay too) must end up re-encoding for it.
        const parent = s.peers.find((p) => p.id === weak.peerId)?.parent;
        const mode = s.peers.find((p) => p.id === parent)?.relay_modes.find((m) => m.peer === weak.peerId)?.mode;
        return mode === 'track' ? `track leg from ${parent === relay.peerId ? 'the relay' : parent === sibling.peerId ? 'the sibling' : parent}` : null;
      }, WEAK_BOUND_MS, 500).catch(async (e) => {
        // What the room and the relay saw, to tell why.
        log('last snapshot:', JSON.stringify(last && last.peers.map((p) => ({ id: p.id, parent: p.parent, capacity: p.capacity,
          children: p.children, media: p.media, loss: p.loss, modes: p.relay_modes }))));
        log('relay info:', JSON.stringify(await relay.page.evaluate(() => window.treecast.peer.info.relay)));
        log('weak child\'s parent link:', JSON.stringify(await pairs(weak.page)));
        log(weakBrowser.consoleOf(weak.page));
        throw e;
      });
      const info = await relay.page.evaluate(() => window.treecast.peer.info.relay);
      const sib = await sibling.page.evaluate(() => window.treecast.peer.info.relay);
      measured.weak = { how, after_ms: Date.now() - t0, relay: { fallbacks: info.fallbacks, samples: info.samples },
        sibling: { fallbacks: sib.fallbacks, samples: sib.samples }, link: await pairs(weak.page) };
      log('weak child:', JSON.stringify(measured.weak));
    });

    step('the weak child keeps playing and its sibling is unaffected', async () => {
      await sleep(4000); // the new leg settles
      const pages = [relay, sibling, weak];
      const a = await Promise.all(pages.map((p) => frames(p.page)));
      await sleep(WINDOW_MS);
      const b = await Promise.all(pages.map((p) => frames(p.page)));
      const fps = pages.map((p, i) => (b[i].n - a[i].n) / (WINDOW_MS / 1000));
      const info = await relay.page.evaluate(() => window.treecast.peer.info.relay);
      measured.fps = Object.fromEntries(pages.map((p, i) => [p.name, fps[i]]));
      measured.relay_samples_after = info.samples;
      measured.load_average = loadavg();
      log('fps over', WINDOW_MS / 1000, 's:', JSON.stringify(measured.fps), 'relay samples:', JSON.stringify(info.samples));
      assert.ok(fps[2] >= 3, `the weak child plays (${fps[2]} fps)`);
      // The sibling keeps pace with the relay itself and stays on pass-through.
      assert.ok(fps[1] >= 0.6 * fps[0], `the sibling plays as the relay does (${fps[1]} vs ${fps[0]} fps)`);
      const s = await snapshot();
      assert.equal(s.peers.find((p) => p.id === sibling.peerId)?.parent, relay.peerId, 'the sibling stays where it was');
      assert.equal(info.modes[sibling.peerId], 'pass-through', 'the sibling stays on pass-through');
      assert.ok(!info.fallbacks.some((f) => f.peer === sibling.peerId), 'no fallback for the sibling');
    });
  });
}
