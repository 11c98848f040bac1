// The stream the broadcaster chose, end to end in headless Chromium: on a server that
// allows up to 1500 kbit/s, the broadcast page offers 360p and 720p and shows 1080p
// disabled; a broadcast at 720p (test pattern) reaches a viewer at depth 1 and one at depth
// 2 (root and relay fan-out 1: a chain) at 1280x720, every sender's bitrate is the room's
// stream_kbps (video plus audio) and keeps the resolution; asking the server for 1080p is
// refused with quality_not_allowed.
//
// Liveness bounds are generous; the numbers seen are printed and written to
// target/browser-quality.json, never asserted tight.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { liveSuite, waitFor, sleep, media } from './harness.mjs';

const LIVE_BOUND_MS = 60000;
const STREAM_KBPS = 1500;  // the 720p preset
const AUDIO_KBPS = 32;     // web/client.js: the audio's share

describe('the broadcaster chooses 720p and every depth gets it', { timeout: 240000 }, () => {
  let broadcaster, room, link;
  const viewers = [];
  const log = (...a) => console.log('   ', ...a);
  const suite = liveSuite({
    it, before, after,
    serverArgs: ['--root-fanout', '1', '--relay-fanout', '1', '--max-stream-kbps', String(STREAM_KBPS)],
    measurementsFile: 'browser-quality.json',
    pages: () => [broadcaster, ...viewers],
  });
  const { step, measured } = suite;

  /** The video and audio senders' parameters of every child connection of a page. */
  const senders = (page) => page.evaluate(() => [...window.treecast.peer.children.values()].map((c) => {
    const v = c.senders.video.getParameters(), a = c.senders.audio.getParameters();
    return { video: v.encodings[0]?.maxBitrate, audio: a.encodings[0]?.maxBitrate,
      degradation: v.degradationPreference ?? null };
  }));

  /** What a viewer plays: the element's size and the parent connection's inbound video. */
  const playing = (page) => page.evaluate(async () => {
    const v = document.getElementById('video');
    const p = window.treecast.peer;
    const out = { width: v.videoWidth, height: v.videoHeight };
    if (p.parent) {
      (await p.parent.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') {
          Object.assign(out, { frameWidth: s.frameWidth, frameHeight: s.frameHeight, fps: s.framesPerSecond,
            decoded: s.framesDecoded, bytes: s.bytesReceived, qpSum: s.qpSum });
        }
      });
    }
    return out;
  });

  step('the page offers the presets within the server\'s limit; 1080p is shown disabled', async () => {
    broadcaster = await suite.browser.open(`${suite.server.base}/?quality=720p&fps=15`, 'broadcaster');
    const page = broadcaster.page;
    await waitFor('the presets', () => page.evaluate(() =>
      document.querySelectorAll('input[name=quality]').length === 3), 15000);
    const options = await page.evaluate(() => [...document.querySelectorAll('input[name=quality]')].map((i) =>
      ({ value: i.value, disabled: i.disabled, checked: i.checked, text: i.closest('label').textContent.trim() })));
    log('quality options:', JSON.stringify(options));
    assert.deepEqual(options.map((o) => [o.value, o.disabled]), [['360p', false], ['720p', false], ['1080p', true]]);
    assert.equal(options.find((o) => o.checked).value, '720p', 'the URL preselects 720p');
    assert.match(options[1].text, /HD \(720p\).*1\.5 Mbit\/s/);
    assert.match(options[2].text, /Full HD \(1080p\).*not offered/);
  });

  step('a choice above the server\'s limit is refused with quality_not_allowed', async () => {
    const res = await fetch(`${suite.server.base}/api/rooms`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ quality: '1080p' }),
    });
    assert.equal(res.status, 400);
    const body = await res.json();
    log('refusal:', JSON.stringify(body));
    assert.equal(body.code, 'quality_not_allowed');
    assert.match(body.message, /quality/);
  });

  step('the broadcaster goes live at 720p and the room streams at 1500 kbit/s', async () => {
    const page = broadcaster.page;
    await page.check('input[name=source][value=pattern]');
    await page.click('#go-live');
    await waitFor('live', () => page.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);
    ({ room, link } = await page.evaluate(() => ({ room: window.treecast.room, link: window.treecast.link })));
    const stream = await page.evaluate(() => JSON.parse(window.treecast.peer.client.stream()));
    log('welcome stream:', JSON.stringify(stream));
    assert.equal(stream.stream_kbps, STREAM_KBPS);
    assert.deepEqual(stream.video, { quality: '720p', width: 1280, height: 720, fps: 30 });
    const track = await page.evaluate(() => window.treecast.peer.tracks.video.getSettings());
    assert.equal(track.width, 1280);
    assert.equal(track.height, 720);
    assert.match(await page.textContent('#quality-live'), /HD \(1280×720\)/);
  });

  step('viewers at depth 1 and 2 decode 1280x720', async () => {
    for (let i = 0; i < 2; i++) {
      const v = await suite.browser.open(link, `viewer${i + 1}`);
      viewers.push(v);
      await waitFor(`viewer ${i + 1} decoding`, async () => (await media(v.page)).frames > 0, LIVE_BOUND_MS);
    }
    const depths = [];
    for (const v of viewers) depths.push((await media(v.page)).depth);
    assert.deepEqual(depths, [1, 2]);
    const snap = await (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();
    assert.equal(snap.max_depth, 2);
    assert.equal(snap.stream_kbps, STREAM_KBPS);
    assert.equal(snap.video.quality, '720p');
    for (const v of viewers) {
      await waitFor(`${v.name} at 1280x720`, async () => {
        const p = await playing(v.page);
        return p.width === 1280 && p.height === 720 && p.frameWidth === 1280;
      }, LIVE_BOUND_MS);
    }
    // It stays there (the encoders give up frames, not pixels, if they must).
    const seen = [];
    const t0 = Date.now();
    const first = await Promise.all(viewers.map((v) => playing(v.page)));
    for (let i = 0; i < 5; i++) {
      await sleep(1000);
      for (const [n, v] of viewers.entries()) {
        const p = await playing(v.page);
        seen.push({ depth: n + 1, ...p });
        assert.equal(`${p.width}x${p.height}`, '1280x720', `${v.name} at second ${i + 1}`);
        assert.equal(`${p.frameWidth}x${p.frameHeight}`, '1280x720', `${v.name} decodes 720p`);
      }
    }
    const secs = (Date.now() - t0) / 1000;
    const last = await Promise.all(viewers.map((v) => playing(v.page)));
    measured.per_depth = last.map((p, i) => ({
      depth: i + 1, width: p.width, height: p.height,
      fps: Math.round(((p.decoded - first[i].decoded) / secs) * 10) / 10,
      kbps: Math.round(((p.bytes - first[i].bytes) * 8) / secs / 1000),
      qp_per_frame: p.decoded > first[i].decoded
        ? Math.round(((p.qpSum - first[i].qpSum) / (p.decoded - first[i].decoded)) * 10) / 10 : null,
    }));
    log('per depth (capture 15 fps):', JSON.stringify(measured.per_depth));
  });

  step('every sender aims at the room\'s stream bitrate and keeps the resolution', async () => {
    for (const p of [broadcaster, viewers[0]]) {
      const s = await senders(p.page);
      log(`${p.name} senders:`, JSON.stringify(s));
      assert.equal(s.length, 1, `${p.name} feeds one child`);
      assert.equal(s[0].video, (STREAM_KBPS - AUDIO_KBPS) * 1000);
      assert.equal(s[0].audio, AUDIO_KBPS * 1000);
      assert.equal(s[0].video + s[0].audio, STREAM_KBPS * 1000, 'video and audio make the room\'s stream_kbps');
      assert.equal(s[0].degradation, 'maintain-resolution');
    }
    // The relay passes the received frames on unchanged (Chromium's pass-through; its own
    // encoder only runs a tiny dummy), so depth 2 decoded the broadcaster's 720p above.
    const out = await viewers[0].page.evaluate(async () => {
      const p = window.treecast.peer;
      const [id, c] = [...p.children.entries()][0];
      let o = null;
      (await c.pc.getStats()).forEach((s) => { if (s.type === 'outbound-rtp' && s.kind === 'video') o = s; });
      return { mode: p.relay.mode(id, 'video'), bytesSent: o?.bytesSent ?? 0 };
    });
    log('relay leg:', JSON.stringify(out));
    assert.equal(out.mode, 'pass-through');
    assert.ok(out.bytesSent > 0);
  });
});
