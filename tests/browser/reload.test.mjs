// The broadcaster reloads its page in the middle of a broadcast: the tab remembers the
// room and its token (sessionStorage), takes the room back (the server re-roots the tree
// at the new session) and sends the test pattern again without asking; every viewer then
// decodes advancing frames again, relays included. A new tab does not take the room; a
// camera broadcast gets its camera back after a reload.
// Also: relaying pages read WebRTC's own bandwidth estimate, and with a fast probe an
// application-limited estimate never lowers anyone's capacity.
//
// Liveness bounds are generous; measured times are printed and written to
// target/browser-reload-measurements.json.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { liveSuite, waitFor, sleep, media, recordFrames, playingAgain, longestGapAfter } from './harness.mjs';

const VIEWERS = 3;
const LIVE_BOUND_MS = 60000;
const RESUME_BOUND_MS = 30000;

describe('the broadcaster reloads its page', { timeout: 240000 }, () => {
  let broadcaster, room, link;
  const viewers = [];
  const log = (...a) => console.log('   ', ...a);
  const suite = liveSuite({
    it, before, after,
    serverArgs: ['--root-fanout', '1', '--relay-fanout', '2'],
    measurementsFile: 'browser-reload-measurements.json',
    pages: () => [broadcaster, ...viewers],
  });
  const { step, measured } = suite;
  const snapshot = async () => (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();


  step('a broadcast with three viewers in a tree of depth 2', async () => {
    broadcaster = await suite.browser.open(`${suite.server.base}/?w=320&h=240&fps=15`, 'broadcaster');
    await broadcaster.page.check('input[name=source][value=pattern]');
    await broadcaster.page.click('#go-live');
    link = await waitFor('the room link', () => broadcaster.page.evaluate(() => window.treecast && window.treecast.link), LIVE_BOUND_MS);
    room = await broadcaster.page.evaluate(() => window.treecast.room);
    for (let i = 0; i < VIEWERS; i++) {
      const v = await suite.browser.open(link, `viewer${i + 1}`);
      viewers.push(v);
      await waitFor(`viewer ${i + 1} decoding`, async () => (await media(v.page)).frames > 0, LIVE_BOUND_MS);
    }
    const snap = await waitFor('depth 2', async () => {
      const s = await snapshot();
      return s.max_depth === 2 && s.viewers === VIEWERS ? s : null;
    }, LIVE_BOUND_MS);
    measured.broadcaster_before = snap.broadcaster;
  });

  step('relays read WebRTC\'s bandwidth estimate; with a fast probe it lowers no capacity', async () => {
    const before = await snapshot();
    const relay = await waitFor('a relay sending to children', async () => {
      for (const v of viewers) {
        const n = await v.page.evaluate(() => window.treecast.peer.children.size);
        if (n > 0) return v;
      }
      return null;
    }, 15000);
    // The estimate counts after a 10 s warm-up of sending; give it a few intervals more.
    const info = await waitFor('a smoothed estimate', () => relay.page.evaluate(() => {
      const i = window.treecast.peer.info;
      return i.uplinkEstimateKbps ? { estimate: i.uplinkEstimateKbps, children: i.estimates, reports: i.uplinkReports || [] } : null;
    }), 30000);
    const root = await broadcaster.page.evaluate(() => {
      const i = window.treecast.peer.info;
      return { estimate: i.uplinkEstimateKbps, children: i.estimates, reports: i.uplinkReports || [] };
    });
    measured.webrtc_estimate = { relay: info, broadcaster: root };
    log('relay: estimate', info.estimate, 'kbit/s; per child [peer, available, sending]:', JSON.stringify(info.children),
      '; uplink reports:', JSON.stringify(info.reports));
    log('broadcaster: estimate', root.estimate, 'kbit/s; per child:', JSON.stringify(root.children),
      '; uplink reports:', JSON.stringify(root.reports));
    for (const [, available] of info.children) assert.ok(available > 0, 'availableOutgoingBitrate present');
    // On loopback the upload probe measures far more than any estimate of an
    // application-limited sender: nothing may be reported below it.
    const after = await snapshot();
    const capacity = (s) => Object.fromEntries(s.peers.map((p) => [p.id, p.capacity]));
    assert.deepEqual(capacity(after), capacity(before));
  });

  step('reloading the broadcaster page takes the room back; every viewer plays again', async () => {
    await Promise.all(viewers.map((v) => recordFrames(v.page)));
    await sleep(1000);
    const reloadedAt = Date.now();
    await broadcaster.page.reload();
    // No click: the test pattern resumes by itself.
    await waitFor('the broadcaster page back in its room', () => broadcaster.page.evaluate(() =>
      window.treecast && window.treecast.resumed && document.body.dataset.phase === 'joined'), RESUME_BOUND_MS);
    const rejoinedMs = Date.now() - reloadedAt;
    assert.equal(await broadcaster.page.evaluate(() => window.treecast.room), room, 'same room');
    assert.equal(await broadcaster.page.evaluate(() => document.getElementById('link').value), link, 'same link');
    assert.ok(await broadcaster.page.isVisible('#end'), 'the live controls are back');
    await playingAgain(viewers, reloadedAt, RESUME_BOUND_MS);
    const allPlayingMs = Date.now() - reloadedAt;
    // The old page keeps sending until it unloads: the interruption is the longest gap
    // between presented frames, and the frame that ends it is when playing resumed.
    const gaps = await Promise.all(viewers.map((v) => longestGapAfter(v.page, reloadedAt)));
    const snap = await waitFor('the re-rooted tree', async () => {
      const s = await snapshot();
      return s.live && s.broadcaster !== measured.broadcaster_before && s.viewers === VIEWERS && s.waiting === 0 ? s : null;
    }, RESUME_BOUND_MS);
    assert.equal(snap.max_depth, 2, 'subtrees moved with their roots');
    for (const v of viewers) {
      const m = await media(v.page);
      v.peerId = m.peerId;
      assert.equal(m.phase, 'joined', v.name);
      assert.equal(m.media, 'receiving', v.name);
    }
    measured.broadcaster_reload = {
      back_in_room_ms: rejoinedMs,
      ten_fresh_frames_everywhere_ms: allPlayingMs,
      viewers: viewers.map((v, i) => ({ viewer: v.name, depth: snap.peers.find((p) => p.id === v.peerId)?.depth,
        longest_frame_gap_ms: gaps[i].gap, playing_again_after_reload_ms: gaps[i].resumed })),
    };
    log('broadcaster reload:', JSON.stringify(measured.broadcaster_reload));
    log('tree after the reload (peer:parent@depth):', snap.peers.map((p) => `${p.id}:${p.parent}@${p.depth}`).join(' '));
  });

  step('a new tab does not take the broadcast; ending it forgets the room', async () => {
    const other = await suite.browser.open(`${suite.server.base}/`, 'new tab');
    await sleep(1500);
    assert.equal(await other.page.isVisible('#go-live'), true, 'a new tab offers to go live');
    assert.equal(await other.page.evaluate(() => window.treecast), undefined);
    await other.page.close();
    await broadcaster.page.click('#end');
    await waitFor('every viewer sees the end', async () => {
      for (const v of viewers) if (!(await v.page.evaluate(() => document.body.dataset.phase === 'ended'))) return false;
      return true;
    }, 15000);
    await broadcaster.page.reload();
    await sleep(1500);
    assert.equal(await broadcaster.page.isVisible('#go-live'), true, 'after the end a reload starts afresh');
    assert.equal(await broadcaster.page.evaluate(() => sessionStorage.length), 0);
  });

  step('a camera broadcast re-acquires the camera after a reload', async () => {
    // Chromium's fake camera, with permission granted as a returning broadcaster's would be.
    const page = broadcaster.page;
    await page.check('input[name=source][value=camera]');
    await page.click('#go-live');
    const camRoom = await waitFor('a second room', () => page.evaluate(() => window.treecast && window.treecast.room), LIVE_BOUND_MS);
    assert.notEqual(camRoom, room);
    await waitFor('live', () => page.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);
    await page.reload();
    await waitFor('back with a live camera track', () => page.evaluate(() => {
      const p = window.treecast && window.treecast.peer;
      const v = p && p.tracks.video;
      return window.treecast.resumed && p.status?.phase === 'joined' && v && v.readyState === 'live' &&
        !(v instanceof CanvasCaptureMediaStreamTrack);
    }), RESUME_BOUND_MS);
    assert.equal(await page.evaluate(() => window.treecast.room), camRoom);
    assert.equal(await page.isVisible('#resume-button'), false, 'no click was needed');
    await page.click('#end');
    await waitFor('ended', () => page.evaluate(() => !document.getElementById('over').hidden), 15000);
  });
});
