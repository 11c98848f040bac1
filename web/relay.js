// Relaying received media to children without decoding and re-encoding it ("pass-through"),
// in Chromium; every other browser (and any child whose self-test fails) gets the received
// tracks re-encoded ("track" relay). Facts behind this design: ../shared/docs/browser-relay.md.
//
// How: the parent connection's receivers get an RTCRtpScriptTransform running in one worker
// (relay-worker.js) per page; each received frame is copied once per child and written into
// that child's sender through the sender's encoded streams (createEncodedStreams, Chromium's
// non-standard API; the standard transform refuses frames from another connection). The
// original frame goes back to the receiver, so the page keeps playing. Each pass-through
// sender carries a tiny dummy track: without a source libwebrtc does not run the sender, and
// a key frame out of the dummy encoder is how a child's key-frame request becomes visible;
// the worker then asks the parent for one (sendKeyFrameRequest).
//
// Everything the relay needs stays behind this one interface, so it can move to Chromium's
// coming RTCRtpSenderEncodedSource when that ships.

const SELF_TEST_MS = 5000;      // a pass-through sender must send packets within this time
const STATS_EVERY_MS = 2000;    // onStats period
const DUMMY_SIZE = 64;          // the dummy video track: 64x64 at 5 fps (cheap to encode)
const DUMMY_FPS = 5;
export const RELAY_CODEC = 'video/VP8'; // every hop uses it: frames keep their payload type

const hasEncodedStreams = typeof RTCRtpSender !== 'undefined' &&
  typeof RTCRtpSender.prototype.createEncodedStreams === 'function';

/** Whether this browser can relay without re-encoding (Chromium: a script transform on the
 *  receiver, encoded streams on the sender, frame copies). The first child still runs a
 *  self-test: `addChild` says which mode each kind ended up in. */
export function passThroughSupported() {
  return hasEncodedStreams && typeof RTCRtpScriptTransform === 'function' &&
    typeof RTCEncodedVideoFrame === 'function' && typeof Worker === 'function';
}

/**
 * A connection for children. Chromium 156 allows createEncodedStreams on a plain connection
 * only before the first offer ("Too late to create encoded streams" after it): call
 * relay.addChild right after addTransceiver. `lateChildren` sets Chromium's
 * `encodedInsertableStreams`, which allows addChild at any time (after the connection is up,
 * after a renegotiation) but sends nothing from a sender that addChild never piped: only for
 * connections whose every sender goes through the relay.
 */
export function newRelayConnection(config = {}, { lateChildren = false } = {}) {
  if (lateChildren && passThroughSupported()) return new RTCPeerConnection({ ...config, encodedInsertableStreams: true });
  return new RTCPeerConnection(config);
}

/** Puts RELAY_CODEC first on a transceiver (or every video transceiver of a connection),
 *  before the offer or the answer: every hop must use the same codec and payload type. */
export function preferRelayCodec(target) {
  const list = target instanceof RTCPeerConnection ? target.getTransceivers() : [target];
  for (const t of list) {
    const kind = t.receiver?.track?.kind || t.sender?.track?.kind;
    if (kind && kind !== 'video') continue;
    const caps = (RTCRtpReceiver.getCapabilities && RTCRtpReceiver.getCapabilities('video')) || null;
    if (!caps || typeof t.setCodecPreferences !== 'function') continue;
    const first = caps.codecs.filter((c) => c.mimeType === RELAY_CODEC);
    const rest = caps.codecs.filter((c) => c.mimeType !== RELAY_CODEC);
    try { t.setCodecPreferences([...first, ...rest]); } catch { /* stopped or not video */ }
  }
}

let dummyVideo = null;
/** One 64x64 canvas at 5 fps for every pass-through video sender of the page. */
function dummyVideoTrack() {
  if (dummyVideo && dummyVideo.readyState === 'live') return dummyVideo;
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = DUMMY_SIZE;
  const ctx = canvas.getContext('2d');
  const track = canvas.captureStream(DUMMY_FPS).getVideoTracks()[0];
  let n = 0;
  // The encoder only runs on new canvas frames; a changing pixel makes every tick one.
  const timer = setInterval(() => {
    if (track.readyState === 'ended') return clearInterval(timer);
    ctx.fillStyle = n++ % 2 ? '#111' : '#222';
    ctx.fillRect(0, 0, DUMMY_SIZE, DUMMY_SIZE);
  }, 1000 / DUMMY_FPS);
  dummyVideo = track;
  return track;
}

let dummyAudio = null;
/** A near-silent oscillator for pass-through audio senders when no received audio track
 *  is at hand (the received one is used otherwise: it needs no AudioContext). */
function dummyAudioTrack() {
  if (dummyAudio && dummyAudio.readyState === 'live') return dummyAudio;
  const ctx = new AudioContext();
  const osc = ctx.createOscillator();
  const gain = ctx.createGain();
  gain.gain.value = 0.001;
  const out = ctx.createMediaStreamDestination();
  osc.connect(gain).connect(out);
  osc.start();
  ctx.resume().catch(() => {});
  dummyAudio = out.stream.getAudioTracks()[0];
  return dummyAudio;
}

/**
 * The received video as one local track for every track-relay sender, its frames stamped
 * with this page's clock. A received track's frames carry the capture time estimated from
 * the parent's RTCP sender reports, and a sender's encoder drops every frame whose capture
 * time is not after the last one it encoded ("Same/old NTP timestamp", libwebrtc). A new
 * parent's estimates can lag the old one's by seconds (a pass-through relay's reports map
 * its own clock to timestamps its encoder did not make), and so can the received track's
 * against the dummy's local frames: a sender switched over froze until they caught up, or
 * for good. Fed through here, a sender keeps one track across parent changes and its
 * capture times only move forward.
 *
 * The pixels are copied in `worker` (relay-worker.js, an instance apart from the relay's),
 * never on the page's thread: the processor's readable and the generator's writable are
 * handed over to it.
 */
class RetimedVideo {
  static supported() {
    return typeof MediaStreamTrackProcessor === 'function' && typeof MediaStreamTrackGenerator === 'function' &&
      typeof VideoFrame === 'function' && typeof Worker === 'function';
  }

  constructor(worker) {
    this.worker = worker;
    this.generator = new MediaStreamTrackGenerator({ kind: 'video' });
    this.track = this.generator;
    this.source = null;
    const writable = this.generator.writable;
    // The worker stamps frames with this page's clock (its own performance.now() has
    // another origin).
    worker.postMessage({ type: 'retime', writable, origin: performance.timeOrigin }, [writable]);
  }

  /** Takes its frames from `track` from now on. */
  feed(track) {
    if (!track || track === this.source) return;
    this.source = track;
    const readable = new MediaStreamTrackProcessor({ track }).readable;
    this.worker.postMessage({ type: 'retimeFeed', readable }, [readable]);
  }

  close() {
    this.worker.postMessage({ type: 'retimeStop' });
    this.generator.stop();
  }
}

/**
 * The relay of one page: frames from the parent connection to every child connection.
 *   new EncodedRelay({onStats, onEvent, passThrough})  one worker; passThrough false forces
 *                                     track relay for every child (what other browsers do)
 *   prepareUpstream({video, audio})   a parent link's RTCRtpReceivers, before its answer
 *                                     (standby parent links too): frames go via the worker
 *   setUpstream({video, audio})       they are the parent's now (prepares them if needed: in
 *                                     time only before the answer); on a new parent, children
 *                                     switch at its first key frame and notice nothing else
 *   addChild(id, pc, {video, audio}, {mode, standby}) → Promise<{video, audio}> (each
 *                                     'pass-through' or 'track') once the self-test decided;
 *                                     call it right after addTransceiver, before the offer;
 *                                     a standby child gets nothing (no track, no frames)
 *                                     until activate(id)
 *   activate(id), useTrack(id, kind?), removeChild(id), mode(id, kind), measure(), close()
 */
export class EncodedRelay {
  constructor({ onStats = null, onEvent = null, passThrough = passThroughSupported() } = {}) {
    this.passThrough = passThrough;
    this.onStats = onStats;
    this.onEvent = onEvent;
    this.children = new Map(); // id -> {pc, senders, modes, stats}
    this.receivers = { video: null, audio: null };
    this.gen = 0;
    this.genOf = new WeakMap(); // receiver -> its transform's generation
    this.seq = 0;
    this.replies = new Map();
    this.worker = null;
    if (passThrough) {
      this.worker = new Worker(new URL('./relay-worker.js', import.meta.url));
      this.worker.onmessage = (e) => this.fromWorker(e.data);
    }
    this.statsTimer = onStats ? setInterval(() => this.measure(), STATS_EVERY_MS) : null;
  }

  fromWorker(m) {
    if (m.seq !== undefined && this.replies.has(m.seq)) {
      this.replies.get(m.seq)(m);
      this.replies.delete(m.seq);
      return;
    }
    if (m.type === 'childFailed') {
      const c = this.children.get(m.id);
      if (c && c.modes[m.kind] === 'pass-through') this.useTrack(m.id, m.kind, m.why);
    }
    if (this.onEvent) this.onEvent(m);
  }

  ask(msg) {
    const seq = ++this.seq;
    return new Promise((ok) => { this.replies.set(seq, ok); this.worker.postMessage({ ...msg, seq }); });
  }

  /**
   * Routes a parent connection's receivers ({video, audio}) through the worker. Call it
   * for every parent link before its answer (from ontrack or right after
   * setRemoteDescription), standby links included: Chromium 156 ignores a transform set on
   * a receiver of a connection already set up (the transformer is created, no frame reaches
   * it). Frames of a prepared link only play locally until setUpstream takes it.
   */
  prepareUpstream(receivers) {
    if (!this.worker) return;
    for (const kind of ['video', 'audio']) {
      const r = receivers[kind];
      if (!r || this.genOf.has(r)) continue;
      const gen = ++this.gen;
      this.genOf.set(r, gen);
      r.transform = new RTCRtpScriptTransform(this.worker, { kind, gen });
    }
  }

  /** These receivers ({video, audio}, either may be missing) are now the parent's: children
   *  get their frames (from the first key frame on, one is asked for), track-relay children
   *  their tracks. Prepares them if that was not done (see prepareUpstream). */
  setUpstream(receivers) {
    this.prepareUpstream(receivers);
    for (const kind of ['video', 'audio']) {
      const r = receivers[kind];
      if (!r) continue;
      this.receivers[kind] = r;
      if (this.worker) this.worker.postMessage({ type: 'upstream', kind, gen: this.genOf.get(r) });
    }
    if (receivers.video && this.retimed) this.retimed.feed(receivers.video.track);
    for (const [id, c] of this.children) {
      for (const kind of ['video', 'audio']) {
        if (receivers[kind] && !c.standby) this.setSenderTrack(id, c, kind);
      }
    }
  }

  /** What a child's sender carries: the received track (track relay; video through
   *  `retimed`, see RetimedVideo) or a dummy. */
  setSenderTrack(id, c, kind) {
    const sender = c.senders[kind];
    if (!sender) return;
    const received = this.receivers[kind]?.track || null;
    let track = received;
    if (c.modes[kind] === 'pass-through') {
      track = kind === 'video' ? dummyVideoTrack() : (received || dummyAudioTrack());
    } else if (kind === 'video' && received && RetimedVideo.supported()) {
      // A worker of its own: pixel copies must not hold up the pass-through frames.
      this.retimeWorker ??= new Worker(new URL('./relay-worker.js', import.meta.url));
      this.retimed ??= new RetimedVideo(this.retimeWorker);
      this.retimed.feed(received);
      track = this.retimed.track;
    }
    if (track && sender.track !== track) sender.replaceTrack(track).catch(() => {});
  }

  /**
   * A child connection and its two senders (from addTransceiver on `pc`). `opts.mode`:
   * 'track' forces track relay. Resolves to each kind's mode once its self-test decided:
   * the sender sent packets within SELF_TEST_MS of the connection carrying frames, or the
   * kind falls back to track relay by itself (the caller has nothing to do).
   */
  addChild(id, pc, senders, opts = {}) {
    const want = this.passThrough && opts.mode !== 'track' ? 'pass-through' : 'track';
    const c = { pc, senders, modes: {}, prev: null, standby: !!opts.standby, tests: null };
    this.children.set(id, c);
    for (const t of pc.getTransceivers()) if (t.sender === senders.video) preferRelayCodec(t);
    for (const kind of ['video', 'audio']) {
      const sender = senders[kind];
      if (!sender) continue;
      c.modes[kind] = want;
      if (this.worker) {
        let streams = null;
        try { streams = sender.createEncodedStreams(); } catch (e) {
          // Too late (the sender already started) or unsupported: plain track relay.
          c.modes[kind] = 'track';
          c[`${kind}Error`] = String(e);
        }
        if (streams) {
          this.worker.postMessage({ type: 'child', id, kind, mode: c.modes[kind], standby: c.standby,
            readable: streams.readable, writable: streams.writable }, [streams.readable, streams.writable]);
        }
      }
      if (!c.standby) this.setSenderTrack(id, c, kind);
    }
    c.tests = new Promise((ok) => { c.testsReady = ok; });
    if (!c.standby) this.startSelfTests(id, c);
    return c.tests;
  }

  startSelfTests(id, c) {
    const tests = ['video', 'audio'].filter((k) => c.modes[k] === 'pass-through').map((k) => this.selfTest(id, c, k));
    Promise.all(tests).then(() => c.testsReady({ ...c.modes }));
  }

  /** A standby child becomes a child: its senders get their tracks, frames flow from the
   *  next key frame on (one is asked for), and its self-test runs. */
  activate(id) {
    const c = this.children.get(id);
    if (!c || !c.standby) return;
    c.standby = false;
    for (const kind of ['video', 'audio']) this.setSenderTrack(id, c, kind);
    if (this.worker) this.worker.postMessage({ type: 'activate', id });
    this.startSelfTests(id, c);
  }

  /** Packets must leave a pass-through sender once frames were written to it. */
  async selfTest(id, c, kind) {
    // Wait for a live connection and for frames handed to this child.
    for (;;) {
      if (this.children.get(id) !== c || c.modes[kind] !== 'pass-through') return;
      if (c.pc.connectionState === 'closed' || c.pc.connectionState === 'failed') return;
      const n = await this.ask({ type: 'count', id });
      if (c.pc.connectionState === 'connected' && n[kind] > 0) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    const sent = async () => {
      let packets = 0;
      const stats = await c.pc.getStats();
      stats.forEach((s) => { if (s.type === 'outbound-rtp' && s.kind === kind) packets += s.packetsSent || 0; });
      return packets;
    };
    const start = await sent();
    const deadline = performance.now() + SELF_TEST_MS;
    while (performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      if (this.children.get(id) !== c || c.modes[kind] !== 'pass-through') return;
      if ((await sent()) > start) return;
    }
    this.useTrack(id, kind, `no ${kind} packets within ${SELF_TEST_MS} ms`);
  }

  /** Falls back to track relay for one child (`kind` null: video and audio): its leg gets
   *  the received tracks, re-encoded under WebRTC's congestion control, from its encoder's
   *  next key frame on (RTP timestamps continued, see relay-worker.js). There is no way
   *  back to pass-through. */
  useTrack(id, kind = null, why = 'asked') {
    if (!kind) { for (const k of ['video', 'audio']) this.useTrack(id, k, why); return; }
    const c = this.children.get(id);
    if (!c || !c.modes[kind] || c.modes[kind] === 'track') return;
    c.modes[kind] = 'track';
    if (this.worker) this.worker.postMessage({ type: 'mode', id, kind, mode: 'track' });
    if (!c.standby) this.setSenderTrack(id, c, kind);
    if (this.onEvent) this.onEvent({ type: 'fallback', id, kind, why });
  }

  removeChild(id) {
    if (!this.children.delete(id)) return;
    if (this.worker) this.worker.postMessage({ type: 'remove', id });
  }

  /** 'pass-through' or 'track' (null for an unknown child or kind). */
  mode(id, kind = 'video') {
    return this.children.get(id)?.modes[kind] ?? null;
  }

  /** Per child: what its link can carry against what is sent on it, for moving a child
   *  whose link cannot carry the stream (pass-through frames ignore rate control). */
  async measure() {
    const out = [];
    for (const [id, c] of this.children) {
      if (c.pc.connectionState === 'closed') continue;
      let stats;
      try { stats = await c.pc.getStats(); } catch { continue; }
      const m = { id, modes: { ...c.modes }, at: performance.now(), availableOutgoingBitrate: null,
        bytesSent: 0, retransmittedBytesSent: 0, nackCount: 0, packetsLost: 0, fractionLost: null, rttMs: null };
      stats.forEach((s) => {
        if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded' && s.availableOutgoingBitrate !== undefined) {
          m.availableOutgoingBitrate = s.availableOutgoingBitrate;
        }
        if (s.type === 'outbound-rtp') {
          m.bytesSent += s.bytesSent || 0;
          m.retransmittedBytesSent += s.retransmittedBytesSent || 0;
          m.nackCount += s.nackCount || 0;
        }
        if (s.type === 'remote-inbound-rtp') {
          m.packetsLost += s.packetsLost || 0;
          if (s.kind === 'video') {
            m.fractionLost = s.fractionLost ?? null;
            m.rttMs = s.roundTripTime !== undefined ? s.roundTripTime * 1000 : null;
          }
        }
      });
      // Bit rate sent since the previous measurement (what the link is asked to carry).
      m.sendBitrate = c.prev ? Math.round((8 * (m.bytesSent - c.prev.bytesSent) * 1000) / (m.at - c.prev.at)) : null;
      c.prev = m;
      out.push(m);
    }
    if (this.onStats && out.length) this.onStats(out);
    return out;
  }

  /** Records every frame the relay forwards (RTP timestamp, arrival time, CRC-32 of the
   *  payload) from now until `stopTrace` returns them: for tests and measurements. */
  startTrace() {
    if (this.worker) this.worker.postMessage({ type: 'trace', start: true });
  }
  async stopTrace() { return this.worker ? (await this.ask({ type: 'trace' })).frames : []; }

  close() {
    if (this.statsTimer) clearInterval(this.statsTimer);
    if (this.retimed) this.retimed.close();
    for (const id of [...this.children.keys()]) this.removeChild(id);
    if (this.retimeWorker) this.retimeWorker.terminate();
    if (this.worker) this.worker.terminate();
    this.worker = null;
    this.retimeWorker = null;
  }
}
