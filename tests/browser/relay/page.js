// Test bench for web/relay.js, all in one page: a source node (a 640x360 canvas clock and
// a tone) and a chain of nodes linked by RTCPeerConnections over loopback (signalling is a
// function call). Every receiving node plays what it gets and runs an EncodedRelay; a node
// with a child relays to it. relay.test.mjs drives it through window.bench.
import { EncodedRelay, newRelayConnection, preferRelayCodec, passThroughSupported } from '/assets/relay.js';

const nodes = [];

/** The broadcaster's test pattern (web/broadcast.js): the clock also drawn as 48 blocks. */
function testPattern(width, height, fps) {
  const canvas = document.createElement('canvas');
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext('2d');
  const video = canvas.captureStream(0).getVideoTracks()[0];
  let n = 0;
  const timer = setInterval(() => {
    if (video.readyState === 'ended') return clearInterval(timer);
    const now = Date.now();
    ctx.fillStyle = `hsl(${(n++ * 4) % 360} 45% 35%)`;
    ctx.fillRect(0, 0, width, height);
    const bw = width / 16, bh = Math.min(16, height / 12);
    for (let i = 0; i < 48; i++) {
      ctx.fillStyle = Math.floor(now / 2 ** i) % 2 ? '#fff' : '#000';
      ctx.fillRect((i % 16) * bw, Math.floor(i / 16) * bh, bw, bh);
    }
    ctx.fillStyle = '#fff';
    ctx.font = `bold ${Math.round(height / 8)}px sans-serif`;
    ctx.textAlign = 'center';
    ctx.fillText(new Date(now).toISOString().slice(11, 23), width / 2, height * 0.62);
    video.requestFrame();
  }, 1000 / fps);
  video.contentHint = 'motion';
  return video;
}

function tone() {
  const ctx = new AudioContext();
  const osc = ctx.createOscillator();
  const out = ctx.createMediaStreamDestination();
  osc.connect(out);
  osc.start();
  return out.stream.getAudioTracks()[0];
}

/** Node 0: the source. */
function source({ width = 640, height = 360, fps = 15 } = {}) {
  const node = { name: 'source', tracks: { video: testPattern(width, height, fps), audio: tone() }, links: new Map() };
  nodes.length = 0;
  nodes.push(node);
  return 0;
}

/** A receiving node with its own relay (its own worker). */
function addNode({ passThrough = true } = {}) {
  const video = document.createElement('video');
  video.muted = true; video.autoplay = true; video.playsInline = true; video.width = 160;
  document.getElementById('videos').append(video);
  const events = [];
  const relay = new EncodedRelay({ passThrough: passThrough && passThroughSupported(),
    onEvent: (e) => events.push({ ...e, at: Date.now() }), onStats: (s) => { node.stats.push(...s); } });
  const node = { name: `node${nodes.length}`, video, relay, events, stats: [], parent: null, links: new Map(), firstFrameAt: null };
  video.requestVideoFrameCallback(() => { node.firstFrameAt = Date.now(); });
  nodes.push(node);
  return nodes.length - 1;
}

/**
 * Links node `from` to node `to` (its new parent link). opts: mode ('track' forces track
 * relay on that child), maxBitrate (bit/s on the child's video sender), capKbps (b=AS in
 * the answer: the child's receiver asks for at most that much), addresses ({out, inc}: the
 * host addresses each end may use).
 */
async function link(from, to, opts = {}) {
  const a = nodes[from], b = nodes[to];
  const id = `${from}->${to}`;
  const out = newRelayConnection({}, { lateChildren: !!opts.late });
  const inc = new RTCPeerConnection();
  // opts.addresses {out, inc}: only those host addresses (the capped-leg bench routes one
  // child's leg through a rate-limited address).
  const keep = (c, side) => !opts.addresses || c.address === opts.addresses[side];
  out.onicecandidate = (e) => { if (e.candidate && keep(e.candidate, 'out')) inc.addIceCandidate(e.candidate).catch(() => {}); };
  inc.onicecandidate = (e) => { if (e.candidate && keep(e.candidate, 'inc')) out.addIceCandidate(e.candidate).catch(() => {}); };
  const senders = {};
  for (const kind of ['video', 'audio']) {
    const init = { direction: 'sendonly' };
    if (kind === 'video' && opts.maxBitrate) init.sendEncodings = [{ maxBitrate: opts.maxBitrate }];
    const t = out.addTransceiver(from === 0 ? a.tracks[kind] : kind, init);
    senders[kind] = t.sender;
    if (kind === 'video') preferRelayCodec(t);
  }
  let modes = null;
  if (from === 0) {
    // The source must keep its resolution (the tests compare it at every depth).
    const p = senders.video.getParameters();
    p.degradationPreference = 'maintain-resolution';
    await senders.video.setParameters(p).catch(() => {});
  } else if (!opts.late) {
    modes = a.relay.addChild(id, out, senders, { mode: opts.mode, standby: opts.standby });
  }
  if (opts.codec) {
    // A child leg negotiated with another codec than the chain's (the fallback test).
    const t = out.getTransceivers().find((x) => x.sender === senders.video);
    const caps = RTCRtpReceiver.getCapabilities('video').codecs;
    t.setCodecPreferences([...caps.filter((c) => c.mimeType === opts.codec), ...caps.filter((c) => c.mimeType !== opts.codec)]);
  }
  await out.setLocalDescription(await out.createOffer());
  await inc.setRemoteDescription(out.localDescription);
  if (opts.codec) {
    const caps = RTCRtpReceiver.getCapabilities('video').codecs;
    const t = inc.getTransceivers().find((x) => x.receiver.track.kind === 'video');
    t.setCodecPreferences([...caps.filter((c) => c.mimeType === opts.codec), ...caps.filter((c) => c.mimeType !== opts.codec)]);
  } else {
    preferRelayCodec(inc);
  }
  const receivers = {};
  for (const r of inc.getReceivers()) receivers[r.track.kind] = r;
  // A standby parent link is prepared now and taken later (activate).
  if (opts.upstreamLater) b.relay.prepareUpstream(receivers); else b.relay.setUpstream(receivers);
  const stream = new MediaStream([receivers.video.track, receivers.audio.track]);
  b.video.srcObject = stream;
  b.video.play().catch(() => {});
  const answer = await inc.createAnswer();
  let sdp = answer.sdp;
  if (opts.capKbps) sdp = sdp.replace(/(m=video[^\n]*\n(?:[^m][^\n]*\n)*?c=[^\n]*\n)/, `$1b=AS:${opts.capKbps}\n`);
  await inc.setLocalDescription({ type: 'answer', sdp });
  await out.setRemoteDescription(inc.localDescription);
  if (opts.late) {
    // The child is added once its connection is up (Chromium's encodedInsertableStreams).
    for (let k = 0; k < 100 && out.connectionState !== 'connected'; k++) await new Promise((r) => setTimeout(r, 100));
    modes = a.relay.addChild(id, out, senders, { mode: opts.mode });
  }
  const prevParent = b.parent;
  b.parent = { from, pc: inc, receivers };
  a.links.set(id, { pc: out, inc, senders, modes: null });
  if (modes) modes.then((m) => { a.links.get(id).modes = m; });
  return { id, replaced: prevParent ? prevParent.from : null };
}

/** A standby link from → to starts carrying media (`upstream`: node `to` hands its
 *  receivers to its relay only now). */
function activate(from, to, { upstream = false } = {}) {
  if (upstream) nodes[to].relay.setUpstream(nodes[to].parent.receivers);
  nodes[from].relay.activate(`${from}->${to}`);
}

/** Closes the link from → to. */
function unlink(from, to) {
  const id = `${from}->${to}`;
  const l = nodes[from].links.get(id);
  if (!l) return;
  if (nodes[from].relay) nodes[from].relay.removeChild(id);
  l.pc.close();
  l.inc.close();
  nodes[from].links.delete(id);
  if (nodes[to].parent && nodes[to].parent.from === from) nodes[to].parent = null;
}

async function inbound(i) {
  const n = nodes[i];
  const out = { width: n.video.videoWidth, height: n.video.videoHeight, framesDecoded: 0,
    audioPackets: 0, videoPackets: 0, firstFrameAt: n.firstFrameAt, keyFramesDecoded: 0, fps: 0 };
  if (!n.parent) return out;
  const stats = await n.parent.pc.getStats();
  stats.forEach((s) => {
    if (s.type !== 'inbound-rtp') return;
    if (s.kind === 'video') {
      out.freezeCount = s.freezeCount; out.totalFreezesDuration = s.totalFreezesDuration;
      out.packetsLost = s.packetsLost; out.nackCount = s.nackCount; out.pliCount = s.pliCount;
      out.framesDecoded = s.framesDecoded || 0; out.videoPackets = s.packetsReceived || 0;
      out.keyFramesDecoded = s.keyFramesDecoded || 0; out.fps = s.framesPerSecond || 0;
      out.frameWidth = s.frameWidth; out.frameHeight = s.frameHeight;
    }
    if (s.kind === 'audio') out.audioPackets = s.packetsReceived || 0;
  });
  return out;
}

/** What node `i` sends on each child link: packets and frames encoded by its own encoder. */
async function outbound(i) {
  const res = {};
  for (const [id, l] of nodes[i].links) {
    const o = { modes: l.modes, video: {}, audio: {} };
    const stats = await l.pc.getStats();
    stats.forEach((s) => {
      if (s.type !== 'outbound-rtp') return;
      o[s.kind] = { packetsSent: s.packetsSent, bytesSent: s.bytesSent, framesEncoded: s.framesEncoded,
        frameWidth: s.frameWidth, frameHeight: s.frameHeight };
    });
    res[id] = o;
  }
  return res;
}

/** Glass-to-glass latencies (ms) of `n` frames at node i, read from the test pattern's clock. */
async function glassToGlass(i, n = 60) {
  const track = nodes[i].parent.receivers.video.track.clone();
  const reader = new MediaStreamTrackProcessor({ track }).readable.getReader();
  const canvas = new OffscreenCanvas(16, 16);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const lat = [];
  for (let k = 0; k < n; k++) {
    const { value: frame, done } = await reader.read();
    if (done) break;
    const arrived = Date.now();
    const w = frame.displayWidth, h = frame.displayHeight;
    if (canvas.width !== w) { canvas.width = w; canvas.height = h; }
    ctx.drawImage(frame, 0, 0);
    frame.close();
    const bw = w / 16, bh = Math.min(16, h / 12);
    let ts = 0;
    for (let b = 0; b < 48; b++) {
      const px = ctx.getImageData(Math.floor((b % 16) * bw + bw / 2), Math.floor(Math.floor(b / 16) * bh + bh / 2), 1, 1).data;
      if (px[0] + px[1] + px[2] > 3 * 128) ts += 2 ** b;
    }
    const d = arrived - ts;
    if (d >= 0 && d < 10000) lat.push(d);
  }
  reader.cancel();
  track.stop();
  return lat;
}

function closeAll() {
  for (const n of nodes) {
    for (const l of n.links.values()) { l.pc.close(); l.inc.close(); }
    if (n.relay) n.relay.close();
    if (n.video) n.video.remove();
    for (const t of Object.values(n.tracks || {})) t.stop();
  }
  nodes.length = 0;
}

/** Source → node 1 → … → node `depth` (`size`: {width, height, fps}). */
async function chain(depth, { passThrough = true, size = { width: 640, height: 360, fps: 15 } } = {}) {
  closeAll();
  source(size);
  for (let i = 1; i <= depth; i++) addNode({ passThrough });
  for (let i = 0; i < depth; i++) await link(i, i + 1);
}

window.bench = {
  nodes, chain, source, addNode, link, activate, unlink, inbound, outbound, glassToGlass, closeAll,
  supported: passThroughSupported,
  startTrace: (i) => nodes[i].relay.startTrace(),
  stopTrace: (i) => nodes[i].relay.stopTrace(),
  events: (i) => nodes[i].events,
  stats: (i) => nodes[i].stats,
  mode: (i, id, kind) => nodes[i].relay.mode(id, kind),
  measure: (i) => nodes[i].relay.measure(),
  ready: true,
};
