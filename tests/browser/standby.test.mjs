// End to end in real headless Chromium: warm standby. One broadcaster page and six viewer
// pages form a tree of depth 3 (root fan-out 1, relay fan-out 2). With warm standby on (the
// default), each relay's stand-in holds idle connections to the relay's parent and children;
// a relay's renderer then crashes (no leave, no word: only its children notice) and the
// repair must run over those prepared links: the orphans play again, each through a
// standby link that was connected when it was used, and nobody else's link changes. The
// same crash with `warm_standby = false` repairs over cold links and opens no standby link.
//
// Measured, never asserted tight (a loaded 2-core CI box): each orphan's media gap (last
// frame before the crash to the first after), the renderer CPU of pages holding standby
// links and of one holding four idle standby pairs. Printed and written to
// target/browser-standby-measurements.json (warm) and browser-standby-cold-measurements.json.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadavg } from 'node:os';
import {
  liveSuite, waitFor, sleep, media, recordFrames, playingAgain, longestGapAfter, cpuSeconds,
} from './harness.mjs';

const VIEWERS = 6;
const LIVE_BOUND_MS = 60000;     // joining and first frames on a loaded box
const STANDBY_BOUND_MS = 30000;  // standby links prepared and connected
const REPAIR_BOUND_MS = 30000;   // "plays again" after the relay died
const OTHERS_GAP_MS = 3000;      // pages the crash does not concern keep playing (generous)
const CPU_WINDOW_MS = 10000;

const log = (...a) => console.log('   ', ...a);
const load = () => loadavg().map((x) => Math.round(x * 100) / 100);

/** A page's standby links and counters, and its peer id. */
function standbyOf(page) {
  return page.evaluate(() => {
    const p = window.treecast.peer;
    return {
      id: p.status?.peer_id,
      counts: { ...p.info.standby },
      links: [...p.standby.values()].map((c) => ({ peer: c.peer, role: c.role, state: c.pc.connectionState })),
      conns: [p.parent, p.previous].filter(Boolean).length + p.children.size + p.standby.size,
    };
  });
}

function crashSuite(warm) {
  describe(`a relay crashes with warm standby ${warm ? 'on' : 'off'} (Chromium)`, { timeout: 300000 }, () => {
    let broadcaster, room, link;
    const viewers = [];
    const suite = liveSuite({
      it, before, after,
      serverArgs: ['--root-fanout', '1', '--relay-fanout', '2'],
      serverRoom: warm ? '' : 'warm_standby = false',
      measurementsFile: warm ? 'browser-standby-measurements.json' : 'browser-standby-cold-measurements.json',
      pages: () => [broadcaster, ...viewers],
    });
    const { step, measured } = suite;
    // Chosen once the tree stands: the relay that crashes, its stand-in (warm) and its
    // children that are not the stand-in (the orphans).
    let relay, standIn, orphans;

    const snapshot = async () => (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();
    const byPeer = (id) => viewers.find((v) => v.peerId === id);

    step('a broadcaster and six viewers form a tree of depth 3', async () => {
      broadcaster = await suite.browser.open(`${suite.server.base}/?w=320&h=240&fps=15`, 'broadcaster');
      await suite.browser.identifyHarder(broadcaster);
      const page = broadcaster.page;
      await page.check('input[name=source][value=pattern]');
      await page.click('#go-live');
      await waitFor('the room link', () => page.evaluate(() => window.treecast && window.treecast.link), LIVE_BOUND_MS);
      ({ room, link } = await page.evaluate(() => ({ room: window.treecast.room, link: window.treecast.link })));
      for (let i = 0; i < VIEWERS; i++) {
        const v = await suite.browser.open(link, `viewer${i + 1}`);
        await suite.browser.identifyHarder(v); // for the CPU figures; it feeds nobody yet
        viewers.push(v);
        await waitFor(`viewer ${i + 1} decoding`, async () => (await media(v.page)).frames > 0, LIVE_BOUND_MS);
      }
      const snap = await waitFor('depth 3 with everyone placed', async () => {
        const s = await snapshot();
        return s.max_depth === 3 && s.viewers === VIEWERS && s.waiting === 0 ? s : null;
      }, LIVE_BOUND_MS);
      for (const v of viewers) {
        const m = await media(v.page);
        v.peerId = m.peerId;
      }
      log('tree (peer:parent@depth):', snap.peers.map((p) => `${p.id}:${p.parent}@${p.depth}`).join(' '));
    });

    step(warm ? 'a depth-2 relay\'s stand-in holds connected standby links to its parent and children'
      : 'no page holds a standby link', async () => {
      const pages = [broadcaster, ...viewers];
      if (!warm) {
        // A depth-2 relay with children crashes; without standby nothing is prepared.
        const snap = await snapshot();
        const r = snap.peers.filter((p) => p.role === 'viewer' && p.depth === 2 && p.children.length > 0)
          .sort((a, b) => b.children.length - a.children.length)[0];
        assert.ok(r, 'a depth-2 relay');
        relay = byPeer(r.id);
        relay.parentId = r.parent;
        orphans = r.children.map(byPeer);
        for (const p of pages) {
          const s = await standbyOf(p.page);
          assert.equal(s.counts.opened, 0, `${p.name} opened no standby link`);
        }
        return;
      }
      const found = await waitFor('a relay whose standby links are all connected', async () => {
        const snap = await snapshot();
        const states = new Map();
        for (const p of pages) { const s = await standbyOf(p.page); states.set(s.id, s); }
        const holds = (holder, peer, role) => states.get(holder)?.links.some((l) =>
          l.peer === peer && l.role === role && l.state === 'connected');
        const peers = new Map(snap.peers.map((p) => [p.id, p]));
        for (const r of snap.peers.filter((p) => p.role === 'viewer' && p.depth === 2 && p.children.length > 0)) {
          for (const s of snap.peers.filter((p) => p.role === 'viewer' && p.id !== r.id && p.id !== r.parent)) {
            const kids = r.children.filter((c) => c !== s.id);
            if (!kids.length) continue;
            // The stand-in feeds each orphan over a prepared link, and reaches the relay's
            // parent over one (unless it is that parent's child already).
            const down = kids.every((c) => holds(s.id, c, 'child') && holds(c, s.id, 'parent'));
            const upOk = peers.get(s.id).parent === r.parent ||
              (holds(s.id, r.parent, 'parent') && holds(r.parent, s.id, 'child'));
            if (down && upOk) return { r, s, kids, states };
          }
        }
        return null;
      }, STANDBY_BOUND_MS);
      relay = byPeer(found.r.id);
      relay.parentId = found.r.parent;
      standIn = byPeer(found.s.id);
      orphans = found.kids.map(byPeer);
      measured.standby_links = [...found.states.values()].map((s) => ({ peer: s.id, links: s.links }));
      log('standby links per peer:', JSON.stringify([...found.states.values()].map((s) =>
        `${s.id}: ${s.links.map((l) => `${l.role[0]}${l.peer}/${l.state}`).join(',')}`)));
      log(`relay ${relay.peerId} (${relay.name}), stand-in ${standIn.peerId}, orphans ${orphans.map((o) => o.peerId)}`);
    });

    step('measures connections and renderer CPU per page', async () => {
      const pages = [broadcaster, ...viewers];
      const pids = pages.map((p) => p.pid);
      const known = pages.filter((p) => p.pid && pids.indexOf(p.pid) === pids.lastIndexOf(p.pid));
      const before = known.map((p) => cpuSeconds(p.pid));
      const t0 = Date.now();
      const loadBefore = load();
      await sleep(CPU_WINDOW_MS);
      const secs = (Date.now() - t0) / 1000;
      const rows = [];
      for (const [i, p] of known.entries()) {
        const s = await standbyOf(p.page);
        rows.push({ page: p.name, peer: s.id, connections: s.conns, standby: s.links.length,
          cpu_percent: Math.round((1000 * (cpuSeconds(p.pid) - before[i])) / secs) / 10 });
      }
      measured.cpu_and_connections = { load_before: loadBefore, load_after: load(), pages: rows };
      log('connections, standby links and CPU (% of a core) per page:', JSON.stringify(rows));
      log('load average:', JSON.stringify(loadBefore), '->', JSON.stringify(load()));
      // Each page holds its media links plus the standby links it was asked for.
      for (const r of rows) {
        if (!warm) assert.equal(r.standby, 0, `${r.page} holds no standby link`);
        assert.ok(r.connections >= r.standby, JSON.stringify(r));
      }
      if (warm) {
        const s = rows.find((r) => r.peer === standIn.peerId);
        if (s) assert.ok(s.standby >= orphans.length, `the stand-in holds its links: ${JSON.stringify(s)}`);
      }
    });

    step('the relay\'s renderer crashes: its orphans play again, nobody else\'s link changes', async () => {
      const rest = viewers.filter((v) => v !== relay);
      const snapBefore = await snapshot();
      const parentBefore = new Map(snapBefore.peers.map((p) => [p.id, p.parent]));
      const countsBefore = new Map();
      for (const v of rest) countsBefore.set(v, (await standbyOf(v.page)).counts);
      await Promise.all(rest.map((v) => recordFrames(v.page)));
      // Which track each presented frame came from: closing a dead parent's connection
      // ends its track, and the element may present a frame for that, which is no media.
      await Promise.all(rest.map((v) => v.page.evaluate(() => {
        const el = document.getElementById('video');
        window.__trackFrames = [];
        const tick = () => {
          const t = el.srcObject?.getVideoTracks()[0];
          window.__trackFrames.push([Date.now(), t ?? null]); // the object: relayed tracks share ids
          el.requestVideoFrameCallback(tick);
        };
        el.requestVideoFrameCallback(tick);
      })));
      await sleep(1500);
      const loadAt = load();
      // Crash its renderer: it vanishes without a word, like a killed tab.
      const session = await suite.browser.context.newCDPSession(relay.page);
      const diedAt = Date.now();
      session.send('Page.crash').catch(() => { /* the session dies with the page */ });
      viewers.splice(viewers.indexOf(relay), 1);
      await playingAgain(orphans, diedAt, REPAIR_BOUND_MS);
      const snap = await waitFor('the repaired tree', async () => {
        const s = await snapshot();
        return s.viewers === VIEWERS - 1 && s.waiting === 0 && !s.peers.some((p) => p.id === relay.peerId) ? s : null;
      }, REPAIR_BOUND_MS);
      await playingAgain(rest, diedAt, REPAIR_BOUND_MS);
      const parentAfter = new Map(snap.peers.map((p) => [p.id, p.parent]));
      // Without standby the room still picks a stand-in at the crash: the orphans' new
      // parent, if it moved into the relay's place.
      const mover = byPeer(parentAfter.get(orphans[0].peerId));
      const movedIn = standIn ?? (mover && parentAfter.get(mover.peerId) !== parentBefore.get(mover.peerId) ? mover : null);
      const others = rest.filter((v) => !orphans.includes(v) && v !== movedIn);
      const gaps = await Promise.all(rest.map((v) => longestGapAfter(v.page, diedAt)));
      const rows = [];
      for (const [i, v] of rest.entries()) {
        const counts = (await standbyOf(v.page)).counts;
        const was = countsBefore.get(v);
        // When it took its new parent, and its first frame after that.
        const { parentAt, firstAfter, parents } = await v.page.evaluate((t) => {
          const parents = (window.treecast.peer.info.parents || []).filter((x) => x.at > t);
          const at = parents[0]?.at ?? null;
          return { parentAt: at, parents, firstAfter: at && (window.__frames.find((f) => f > at) ?? null) };
        }, diedAt);
        const moved = parentAt !== null;
        // The interruption as media: from the last frame before the crash to the first
        // frame of a track the new parent's connection delivers.
        const media = await v.page.evaluate((t) => {
          const now = window.treecast.peer.parent?.tracks || [];
          const f = window.__trackFrames;
          const last = f.filter(([at]) => at <= t).pop()?.[0] ?? null;
          const first = f.find(([at, track]) => at > t && now.includes(track))?.[0] ?? null;
          return { last, first };
        }, diedAt);
        rows.push({ viewer: v.name, peer: v.peerId,
          role: orphans.includes(v) ? 'orphan' : v === movedIn ? 'stand-in' : 'other',
          parent_before: parentBefore.get(v.peerId), parent_after: parentAfter.get(v.peerId),
          gap_ms: gaps[i].gap, first_frame_after_ms: gaps[i].resumed,
          media_gap_ms: moved && media.last && media.first ? media.first - media.last : null,
          new_parent_after_ms: moved ? parentAt - diedAt : null,
          new_parent_to_frame_ms: moved && firstAfter ? firstAfter - parentAt : null,
          parents_taken: parents.map((x) => `${x.peer}@${x.at - diedAt}`),
          // How it feeds its children now, and its falls back to track relay so far.
          relay: await v.page.evaluate(() => {
            const r = window.treecast.peer.info.relay;
            return { modes: Object.values(r.modes), fallbacks: r.fallbacks.map((f) => `${f.peer} ${f.kind}: ${f.why}`) };
          }),
          warm_uses: counts.usedConnected - was.usedConnected,
          other_uses: counts.usedConnecting - was.usedConnecting + counts.usedCold - was.usedCold });
      }
      if (warm) {
        // From the stand-in's use of its link to each orphan to that orphan's first frame.
        const uses = (await standbyOf(standIn.page)).counts.uses;
        for (const r of rows.filter((x) => x.role === 'orphan')) {
          const use = uses.find((u) => u.peer === r.peer && u.at > diedAt);
          r.stand_in_use_after_ms = use ? use.at - diedAt : null;
        }
      }
      measured.crash = { warm, load_at_crash: loadAt, relay: relay.peerId, stand_in: movedIn?.peerId ?? null, pages: rows };
      log(`after the crash of ${relay.peerId} (load ${JSON.stringify(loadAt)}):`, JSON.stringify(rows));
      log('tree after repair (peer:parent@depth):', snap.peers.map((p) => `${p.id}:${p.parent}@${p.depth}`).join(' '));

      const row = (v) => rows.find((r) => r.peer === v.peerId);
      for (const o of orphans) {
        assert.notEqual(row(o).parent_after, relay.peerId, `${o.name} has a new parent`);
        if (warm) {
          // The repair named the prepared stand-in, and the orphan took over a link that
          // was already connected.
          assert.equal(row(o).parent_after, standIn.peerId, `${o.name} is fed by the stand-in`);
          assert.ok(row(o).warm_uses > 0, `${o.name} used a connected standby link: ${JSON.stringify(row(o))}`);
        } else {
          assert.equal(row(o).warm_uses + row(o).other_uses, 0, `${o.name} had no standby link to use`);
        }
      }
      if (warm) {
        // The stand-in took over its links to the orphans (and to the relay's parent) warm.
        assert.equal(parentAfter.get(standIn.peerId), relay.parentId, 'the stand-in took the relay\'s place');
        assert.ok(row(standIn).warm_uses >= orphans.length, `stand-in's warm uses: ${JSON.stringify(row(standIn))}`);
        assert.ok(row(standIn).gap_ms < OTHERS_GAP_MS, `the stand-in kept playing while it moved: ${JSON.stringify(row(standIn))}`);
      }
      // Nobody else's link broke: same parent, and their video kept coming.
      for (const v of others) {
        assert.equal(parentAfter.get(v.peerId), parentBefore.get(v.peerId), `${v.name} kept its parent`);
        assert.ok(row(v).gap_ms < OTHERS_GAP_MS, `${v.name} kept playing: ${JSON.stringify(row(v))}`);
      }
    });

    if (warm) {
      step('four idle standby pairs connect without tracks; their CPU cost', async () => {
        // A fresh page that joins nothing holds four connected idle pairs, set up exactly
        // like standby links (the sending end's transceivers without tracks), then none:
        // renderer CPU over the same window. Both ends live in this page.
        const p = await suite.browser.open(`${suite.server.base}/`, 'idle links');
        await suite.browser.identifyHarder(p);
        // A measurement only: null when the page's process could not be told apart.
        const cpuOver = async () => {
          if (!p.pid) return null;
          const c0 = cpuSeconds(p.pid), t0 = Date.now();
          await sleep(CPU_WINDOW_MS);
          return Math.round((1000 * (cpuSeconds(p.pid) - c0)) / ((Date.now() - t0) / 1000)) / 10;
        };
        const none = await cpuOver();
        const connected = await p.page.evaluate(async (n) => {
          window.__pairs = [];
          for (let i = 0; i < n; i++) {
            const a = new RTCPeerConnection(), b = new RTCPeerConnection();
            a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
            b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
            const stream = new MediaStream();
            a.addTransceiver('video', { direction: 'sendonly', streams: [stream], sendEncodings: [{ maxBitrate: 450000 }] });
            a.addTransceiver('audio', { direction: 'sendonly', streams: [stream] });
            await a.setLocalDescription(await a.createOffer());
            await b.setRemoteDescription(a.localDescription);
            await b.setLocalDescription(await b.createAnswer());
            await a.setRemoteDescription(b.localDescription);
            window.__pairs.push(a, b);
          }
          const deadline = performance.now() + 15000;
          while (performance.now() < deadline && !window.__pairs.every((pc) => pc.connectionState === 'connected')) {
            await new Promise((r) => setTimeout(r, 100));
          }
          return window.__pairs.filter((pc) => pc.connectionState === 'connected').length;
        }, 4);
        assert.equal(connected, 8, 'four idle pairs connected');
        await sleep(2000); // past the set-up
        const four = await cpuOver();
        measured.idle_standby_links_cpu_percent = { none, four_pairs: four, load: load() };
        log('renderer CPU (% of a core) with no connection and with four idle standby pairs (both ends):',
          JSON.stringify(measured.idle_standby_links_cpu_percent));
        // First decoded frame: after replaceTrack onto one idle pair's senders (warm),
        // and after a fresh pair is created with the track (cold), same page, same track.
        const firstFrame = await p.page.evaluate(async () => {
          const canvas = Object.assign(document.createElement('canvas'), { width: 320, height: 240 });
          const ctx = canvas.getContext('2d');
          let n = 0;
          const draw = setInterval(() => { ctx.fillStyle = `hsl(${(n += 10) % 360} 80% 50%)`; ctx.fillRect(0, 0, 320, 240); }, 66);
          const track = canvas.captureStream(15).getVideoTracks()[0];
          await new Promise((r) => setTimeout(r, 500));
          const decoded = async (pc, since) => {
            while (performance.now() - since < 10000) {
              let frames = 0;
              (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') frames = s.framesDecoded || 0; });
              if (frames > 0) return Math.round(performance.now() - since);
              await new Promise((r) => setTimeout(r, 5));
            }
            return null;
          };
          const [a, b] = window.__pairs;
          const t0 = performance.now();
          await a.getTransceivers().find((t) => t.receiver.track.kind === 'video').sender.replaceTrack(track);
          const warm = await decoded(b, t0);
          const t1 = performance.now();
          const c = new RTCPeerConnection(), d = new RTCPeerConnection();
          c.onicecandidate = (e) => e.candidate && d.addIceCandidate(e.candidate);
          d.onicecandidate = (e) => e.candidate && c.addIceCandidate(e.candidate);
          c.addTransceiver(track, { direction: 'sendonly', streams: [new MediaStream()], sendEncodings: [{ maxBitrate: 450000 }] });
          await c.setLocalDescription(await c.createOffer());
          await d.setRemoteDescription(c.localDescription);
          await d.setLocalDescription(await d.createAnswer());
          await c.setRemoteDescription(d.localDescription);
          const cold = await decoded(d, t1);
          const ssrcLines = (a.localDescription.sdp.match(/^a=ssrc:/gm) || []).length;
          clearInterval(draw);
          c.close(); d.close(); track.stop();
          return { warm_ms: warm, cold_ms: cold, idle_offer_ssrc_lines: ssrcLines };
        });
        measured.first_decoded_frame_same_page = firstFrame;
        log('first decoded frame, replaceTrack onto an idle standby pair vs a fresh pair (same page):', JSON.stringify(firstFrame));
        assert.ok(firstFrame.warm_ms !== null, 'media flows on a standby pair once it has a track');
        await p.page.evaluate(() => window.__pairs.forEach((pc) => pc.close()));
        await p.page.close();
      });
    }
  });
}

crashSuite(true);
crashSuite(false);
