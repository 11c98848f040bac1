// Measurement, not a test (scripts/test does not run it): audio/video sync per depth in a
// chain of relaying pages (root and relay fan-out 1). The broadcaster sends the test
// pattern (its clock drawn in the picture) and, instead of its steady tone, a beep on every
// 500 ms of the wall clock; each viewer times the beeps it plays and the clock in the
// frames it decodes. Both latencies are taken where the page's sinks get the media (as
// glass-to-glass is elsewhere), so what the browser adds after that is left out. The audio
// figure carries a constant bias (when the audio graph renders a beep against the wall
// clock): compare depths, and audio minus video between depths. Usage, after
// scripts/build-client + cargo build:
//   node tests/browser/bench/av-sync.mjs [depth=4] [modes=pass-through,track]
import { loadavg } from 'node:os';
import { startServer, startBrowser, waitFor, sleep, media, glassToGlass, percentile } from '../harness.mjs';

const depth = Number(process.argv[2] || 4);
const modes = (process.argv[3] || 'pass-through,track').split(',');
const BEEP_EVERY_MS = 500;

/** The broadcaster's audio becomes beeps of 30 ms at 1 kHz on every BEEP_EVERY_MS of Date.now(). */
function beeps(page) {
  return page.evaluate((every) => {
    const ctx = new AudioContext();
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    gain.gain.value = 0;
    osc.frequency.value = 1000;
    const out = ctx.createMediaStreamDestination();
    osc.connect(gain).connect(out);
    osc.start();
    ctx.resume();
    let next = Math.ceil((Date.now() + 200) / every) * every;
    const schedule = () => {
      // Context time of each beep from one reading of both clocks.
      const t0 = ctx.currentTime, d0 = Date.now();
      while (next < d0 + 2000) {
        const at = t0 + (next - d0) / 1000;
        if (at > t0) { gain.gain.setValueAtTime(0.5, at); gain.gain.setValueAtTime(0, at + 0.03); }
        next += every;
      }
    };
    schedule();
    setInterval(schedule, 500);
    window.treecast.peer.setTrack(out.stream.getAudioTracks()[0]);
  }, BEEP_EVERY_MS);
}

/** Latencies (ms) of the beeps a viewer plays, over `ms`. */
function beepLatencies(page, ms) {
  return page.evaluate(async ({ ms, every }) => {
    const track = window.treecast.peer.tracks.audio.clone();
    const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
    const out = [];
    let quietSince = 0; // samples of silence before the current one
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const { value: a, done } = await reader.read();
      if (done) break;
      const now = Date.now();
      const n = a.numberOfFrames, sr = a.sampleRate;
      const buf = new Float32Array(n);
      a.copyTo(buf, { planeIndex: 0, format: 'f32-planar' });
      a.close();
      for (let i = 0; i < n; i++) {
        if (Math.abs(buf[i]) > 0.1) {
          if (quietSince > sr * 0.2) {
            // The onset: this sample was handed over (n - i) samples before the chunk's end.
            const t = now - ((n - i) * 1000) / sr;
            const lat = ((t % every) + every) % every;
            out.push(lat);
          }
          quietSince = 0;
        } else quietSince++;
      }
    }
    reader.cancel();
    track.stop();
    return out;
  }, { ms, every: BEEP_EVERY_MS });
}

/** Video minus audio of the parent's clock of what plays now (estimatedPlayoutTimestamp),
 *  ms: near the page's own playout skew when the parent's sender reports are consistent,
 *  huge or null when they are not. */
async function playoutGap(page) {
  return page.evaluate(async () => {
    const e = {};
    (await window.treecast.peer.parent.pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') e[s.kind] = s.estimatedPlayoutTimestamp;
    });
    return e.video && e.audio ? Math.round(e.video - e.audio) : null;
  });
}

async function run(mode) {
  const server = await startServer(['--root-fanout', '1', '--relay-fanout', '1', '--max-depth', String(depth + 1)]);
  const browser = await startBrowser();
  try {
    const b = await browser.open(`${server.base}/?w=320&h=240&fps=15`, 'broadcaster');
    await b.page.check('input[name=source][value=pattern]');
    await b.page.click('#go-live');
    const link = await waitFor('link', () => b.page.evaluate(() => window.treecast && window.treecast.link), 60000);
    await beeps(b.page);
    const viewers = [];
    for (let i = 1; i <= depth; i++) {
      const v = await browser.open(mode === 'track' ? `${link}?relay=track` : link, `viewer${i}`);
      await waitFor(`viewer ${i} decoding`, async () => (await media(v.page)).frames > 0, 60000);
      viewers.push(v);
    }
    await sleep(8000); // sync settles in steps
    const load = loadavg().map((x) => Number(x.toFixed(2)));
    const [video, audio] = await Promise.all([
      Promise.all(viewers.map((v) => glassToGlass(v.page, 150))),
      Promise.all(viewers.map((v) => beepLatencies(v.page, 10000))),
    ]);
    const gaps = await Promise.all(viewers.map((v) => playoutGap(v.page)));
    return { mode, load_average: load, by_depth: viewers.map((_, i) => {
      const v = percentile(video[i], 50), a = percentile(audio[i], 50);
      return { depth: i + 1, video_p50: v, audio_p50: Number(a.toFixed(1)), beeps: audio[i].length,
        audio_minus_video_ms: Number((a - v).toFixed(1)), playout_gap_ms: gaps[i] };
    }), load_average_end: loadavg().map((x) => Number(x.toFixed(2))) };
  } finally {
    await browser.close();
    await server.stop();
  }
}

const out = [];
for (const mode of modes) out.push(await run(mode));
console.log(JSON.stringify(out, null, 1));
