// End to end in real headless Chromium: a relay leaves. One broadcaster page and six viewer
// pages form a tree of depth 3 (root fan-out 1, relay fan-out 2), and the depth-1 relay (two
// children, three grandchildren) leaves in one of two ways:
//
// - with the page's own Leave button: the page sends `leave {"linger":true}` and keeps
//   feeding its children until the room has moved each to a new parent that delivers
//   (make-before-break, docs/protocol.md §2.7 and §4). Every descendant keeps playing: its
//   longest gap between presented frames stays within a jitter bound, well below what a
//   leave at once costs; every descendant ends fed by someone else, and the page says it left.
// - by closing its page (a tab closed: `pagehide` leaves at once). Measured for comparison;
//   asserted only that every descendant plays again.
//
// Each descendant's longest gap is printed with the load average and written to
// target/browser-linger-measurements.json and browser-linger-close-measurements.json.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { loadavg } from 'node:os';
import {
  liveSuite, waitFor, sleep, media, recordFrames, playingAgain, longestGapAfter, broadcastWithViewers,
} from './harness.mjs';

const VIEWERS = 6;
const LIVE_BOUND_MS = 60000;     // joining and first frames on a loaded box
const REPAIR_BOUND_MS = 30000;   // handovers done, or "plays again" after a leave at once
// A descendant of a relay that leaves from its button sees no break, only jitter. Measured
// on a 2-core box at load 10-13 (other Chromium tests running): longest gap 156-356 ms
// (83-101 ms in the quiet 1.5 s before). With warm standby a page closed costs about the
// same here (138-406 ms), so the bound is a no-freeze bound, not a comparison.
const LINGER_GAP_MS = 500;

const log = (...a) => console.log('   ', ...a);
const load = () => loadavg().map((x) => Math.round(x * 100) / 100);

/**
 * Records each presented frame with the track it came from and whether that track was
 * live: when a parent's connection closes its track ends, and the element may present a
 * frame for that, which is no media. The object, not the id: relayed tracks carry the
 * broadcaster's track id. Also records the frame times `longestGapAfter` reads.
 */
async function recordTrackFrames(page) {
  await recordFrames(page);
  await page.evaluate(() => {
    const el = document.getElementById('video');
    window.__trackFrames = [];
    const tick = () => {
      const t = el.srcObject?.getVideoTracks()[0] ?? null;
      window.__trackFrames.push([Date.now(), t, t?.readyState === 'live']);
      el.requestVideoFrameCallback(tick);
    };
    el.requestVideoFrameCallback(tick);
  });
}

/** The longest gap after `since` between presented frames of live tracks, whether the
 *  page switched tracks after `since`, and its new parent's first frame (ms after `since`). */
function mediaAfter(page, since) {
  return page.evaluate((t) => {
    const f = window.__trackFrames.filter(([at, , live]) => live && at > t - 2000);
    let gap = 0;
    for (let i = 1; i < f.length; i++) if (f[i][0] > t) gap = Math.max(gap, f[i][0] - Math.max(f[i - 1][0], t));
    const before = f.filter(([at]) => at <= t).pop()?.[1] ?? null;
    const now = window.treecast.peer.parent?.tracks || [];
    const first = f.find(([at, track]) => at > t && now.includes(track))?.[0] ?? null;
    return { gap, switched: f.some(([at, track]) => at > t && track !== before),
      newParentFirstFrame: first === null ? null : first - t };
  }, since);
}

function leaveSuite(byButton) {
  describe(`a depth-1 relay ${byButton ? 'leaves with its Leave button' : 'closes its page'} (Chromium)`, { timeout: 300000 }, () => {
    let broadcaster, room, relay, descendants;
    const viewers = [];
    const suite = liveSuite({
      it, before, after,
      serverArgs: ['--root-fanout', '1', '--relay-fanout', '2'],
      measurementsFile: byButton ? 'browser-linger-measurements.json' : 'browser-linger-close-measurements.json',
      pages: () => [broadcaster, ...viewers],
    });
    const { step, measured } = suite;
    const snapshot = async () => (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();

    step('a broadcaster and six viewers form a tree of depth 3', async () => {
      ({ broadcaster, room } = await broadcastWithViewers(suite.browser, suite.server.base, VIEWERS,
        LIVE_BOUND_MS, viewers));
      const snap = await waitFor('depth 3 with everyone placed', async () => {
        const s = await snapshot();
        return s.max_depth === 3 && s.viewers === VIEWERS && s.waiting === 0 ? s : null;
      }, LIVE_BOUND_MS);
      assert.deepEqual(snap.depth_histogram, [1, 1, 2, 3]);
      for (const v of viewers) v.peerId = (await media(v.page)).peerId;
      const r = snap.peers.find((p) => p.role === 'viewer' && p.depth === 1);
      relay = viewers.find((v) => v.peerId === r.id);
      descendants = viewers.filter((v) => v !== relay); // everyone else is below it
      relay.children = r.children;
      assert.equal(relay.children.length, 2, 'the relay feeds two children');
      log('tree (peer:parent@depth):', snap.peers.map((p) => `${p.id}:${p.parent}@${p.depth}`).join(' '));
      // Every page plays before anyone leaves (and records its frames from now on).
      await Promise.all(viewers.map((v) => recordTrackFrames(v.page)));
      await playingAgain(viewers, Date.now(), LIVE_BOUND_MS);
    });

    step(byButton ? 'the relay clicks Leave: its descendants keep playing and move, its page says it left'
      : 'the relay\'s page closes: its descendants play again', async () => {
      if (byButton) {
        await relay.page.evaluate(() => {
          window.__phases = [];
          const note = () => window.__phases.push(document.body.dataset.phase);
          new MutationObserver(note).observe(document.body, { attributes: true, attributeFilter: ['data-phase'] });
        });
      }
      await sleep(1500);
      const loadAt = load();
      const leftAt = Date.now();
      if (byButton) await relay.page.click('#leave');
      else await relay.page.close();
      await playingAgain(descendants, leftAt, REPAIR_BOUND_MS);
      const snap = await waitFor('the tree without the relay', async () => {
        const s = await snapshot();
        return s.viewers === VIEWERS - 1 && s.waiting === 0 && !s.peers.some((p) => p.id === relay.peerId) ? s : null;
      }, REPAIR_BOUND_MS);
      // Every descendant is fed by someone else, and no longer by the relay (for a
      // lingering leaver: its connection closed on the room's drop).
      const fedBy = await waitFor('every descendant fed by a new parent only', async () => {
        const pages = await Promise.all(descendants.map((v) => v.page.evaluate(() => {
          const p = window.treecast.peer;
          return { parent: p.parent?.peer ?? null, previous: p.previous?.peer ?? null, media: p.status?.media };
        })));
        return pages.every((p) => p.parent !== null && p.parent !== relay.peerId && p.previous === null &&
          p.media === 'receiving') ? pages : null;
      }, REPAIR_BOUND_MS);
      if (byButton) {
        await waitFor('the relay\'s page in the "left" state', () => relay.page.evaluate(() =>
          document.body.dataset.phase === 'left'), REPAIR_BOUND_MS);
      }
      await sleep(1000); // frames after the last switch
      const rows = [];
      for (const [i, v] of descendants.entries()) {
        const presented = await longestGapAfter(v.page, leftAt);
        const m = await mediaAfter(v.page, leftAt);
        // The same measure over the 1.5 s before the leave: the jitter with nothing happening.
        const quiet = await v.page.evaluate((t) => {
          const f = window.__frames.filter((x) => x > t - 1500 && x <= t);
          let gap = 0;
          for (let i = 1; i < f.length; i++) gap = Math.max(gap, f[i] - f[i - 1]);
          return gap;
        }, leftAt);
        rows.push({ viewer: v.name, peer: v.peerId, role: relay.children.includes(v.peerId) ? 'child' : 'grandchild',
          parent_after: fedBy[i].parent, quiet_gap_ms: quiet, gap_ms: presented.gap, live_track_gap_ms: m.gap,
          switched_track: m.switched, new_parent_first_frame_ms: m.newParentFirstFrame });
      }
      const phases = byButton ? await relay.page.evaluate(() => window.__phases) : null;
      measured.leave = { kind: byButton ? 'button (linger)' : 'page closed (at once)', load_at_leave: loadAt,
        load_after: load(), relay: relay.peerId, relay_phases: phases, pages: rows };
      log(`after ${relay.peerId} left by ${byButton ? 'its button' : 'closing its page'} (load ${JSON.stringify(loadAt)}):`,
        JSON.stringify(rows));
      if (phases) log('relay page phases:', JSON.stringify(phases));
      log('tree after (peer:parent@depth):', snap.peers.map((p) => `${p.id}:${p.parent}@${p.depth}`).join(' '));

      for (const r of rows) assert.notEqual(r.parent_after, relay.peerId, `${r.viewer} has a new parent`);
      for (const c of relay.children) {
        const r = rows.find((x) => x.peer === c);
        assert.ok(r.switched_track, `${r.viewer} plays its new parent's track: ${JSON.stringify(r)}`);
      }
      if (byButton) {
        for (const r of rows) {
          assert.ok(r.gap_ms <= LINGER_GAP_MS, `${r.viewer} kept playing through the handover: ${JSON.stringify(r)}`);
          assert.ok(r.live_track_gap_ms <= LINGER_GAP_MS, `${r.viewer}'s media kept coming: ${JSON.stringify(r)}`);
        }
        assert.ok(await relay.page.isHidden('#leave'), 'the Leave button is gone');
        assert.match(await relay.page.textContent('#message'), /You left/);
      }
    });
  });
}

leaveSuite(true);
leaveSuite(false);
