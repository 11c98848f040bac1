// The worker of web/relay.js: it sees every encoded frame the parent connection delivers
// (RTCRtpScriptTransform on the receivers) and writes a copy of each into every child's
// sender (createEncodedStreams), so frames travel down the tree unchanged; and it restamps
// the decoded video that track-relay legs re-encode (RetimedVideo). See relay.js.
'use strict';

const KEY_REQUEST_EVERY_MS = 300; // at most one key-frame request upstream per kind per 300 ms
const TRACE_MAX = 2000;           // frames remembered for trace() (tests, measurements)

/** Per kind: the upstream receivers' transformers (by generation) and the current one. */
const upstream = {
  video: { gens: new Map(), current: -1, pending: -1, lastKeyRequest: -Infinity },
  audio: { gens: new Map(), current: -1, pending: -1, lastKeyRequest: -Infinity },
};
/** Per child id and kind: {writer, mode, frames, failed, payloadType}. */
const children = new Map();
let trace = null; // [{kind, ts, at, crc, key, size}] when tracing

const Frame = { video: self.RTCEncodedVideoFrame, audio: self.RTCEncodedAudioFrame };

// Audio waits for video. Chromium holds each received video frame until the next tick of
// its 64 Hz metronome before this transform sees it, and hands audio over at once. Below
// depth 1 receivers cannot line the two up (a pass-through relay's sender reports describe
// its own encoders' clocks, not the forwarded frames'), so without this wait video falls
// about 15 ms further behind audio at every hop (docs/performance.md, "Audio/video sync
// below depth 1"). The video hold is smoothed and the children's audio waits that long,
// so both kinds cost about the same per hop and the skew stays near what it is at depth 2.
// (Audio's own receiveTime reads a few ms before this transform, yet audio crosses a hop
// in under a millisecond end to end: subtracting it under-compensated by 5 ms per hop.)
const hold = { video: null }; // ms, smoothed
const HOLD_WEIGHT = 1 / 32;
const AUDIO_WAIT_MAX_MS = 20; // more than a tick would be a measuring error
const audioQueue = [];        // [{at, write}], in order: the release times only grow
let audioTimer = null;
let lastRelease = 0;

function noteHold(kind, md, now) {
  if (kind !== 'video') return;
  const h = md.receiveTime > 0 ? now - md.receiveTime : NaN;
  if (!(h >= 0 && h < 100)) return;
  hold[kind] = hold[kind] === null ? h : hold[kind] + (h - hold[kind]) * HOLD_WEIGHT;
}

function audioWait() {
  if (hold.video === null) return 0;
  return Math.min(AUDIO_WAIT_MAX_MS, Math.max(0, hold.video));
}

/** Runs the audio `write` after `wait` ms, never before an earlier one. */
function later(wait, write) {
  if (wait < 1 && audioQueue.length === 0) { write(); return; }
  lastRelease = Math.max(performance.now() + wait, lastRelease);
  audioQueue.push({ at: lastRelease, write });
  if (audioTimer === null) drainLater();
}

function drainLater() {
  audioTimer = setTimeout(() => {
    audioTimer = null;
    const now = performance.now();
    while (audioQueue.length && audioQueue[0].at <= now + 0.5) audioQueue.shift().write();
    if (audioQueue.length) drainLater();
  }, Math.max(0, audioQueue[0].at - performance.now()));
}
// RTP timestamp step put between the last frame a child got and the first one from a new
// source (a new parent, or its own encoder after a fallback): 1/30 s of video, 20 ms of audio.
const STEP = { video: 3000, audio: 960 };

/**
 * The frame to write for child `c`: the RTP timestamps each child sees must only move
 * forward. Streams from different senders (another branch of the tree, the relay's own
 * encoder) have unrelated timestamps and picture ids; a receiver that already decoded a
 * higher picture id drops a key frame whose timestamp is not ahead either, and stays frozen
 * (seen in Chromium 156). So at each change of source the child's offset is set to continue
 * its timestamps, and frames are copied with the shifted timestamp.
 */
function stamped(c, kind, frame, copy) {
  if (c.rebase) {
    c.offset = c.lastOut === null ? 0 : (c.lastOut + STEP[kind] - frame.timestamp) >>> 0;
    c.rebase = false;
  }
  c.lastOut = (frame.timestamp + c.offset) >>> 0;
  if (c.offset === 0) return copy ? new Frame[kind](frame) : frame;
  const md = frame.getMetadata();
  return new Frame[kind](frame, { metadata: { ...md, rtpTimestamp: (md.rtpTimestamp + c.offset) >>> 0 } });
}

function post(msg) { self.postMessage(msg); }

function requestKeyFrame(kind, why) {
  if (kind !== 'video') return; // every audio frame stands alone
  const up = upstream[kind];
  const now = performance.now();
  if (now - up.lastKeyRequest < KEY_REQUEST_EVERY_MS) return;
  // Ask the newest receiver: after a switch the pending one is the one whose key frame matters.
  const gen = up.pending >= 0 ? up.pending : up.current;
  const t = up.gens.get(gen);
  if (!t || typeof t.sendKeyFrameRequest !== 'function') return;
  up.lastKeyRequest = now;
  t.sendKeyFrameRequest().then(() => post({ type: 'keyRequest', kind, why }),
    (e) => post({ type: 'keyRequest', kind, why, error: String(e) }));
}

function isKey(kind, frame) {
  return kind === 'audio' || frame.type === 'key';
}

/** CRC-32 of a frame's payload (tests compare frames across hops by it). */
const CRC_TABLE = (() => {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
})();
function crc32(buf) {
  const b = new Uint8Array(buf);
  let c = -1;
  for (let i = 0; i < b.length; i++) c = CRC_TABLE[(c ^ b[i]) & 0xff] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

/** One upstream receiver's frames: copies to the children, the original to local playback. */
async function pumpUpstream(transformer, kind, gen) {
  const up = upstream[kind];
  up.gens.set(gen, transformer);
  const reader = transformer.readable.getReader();
  const writer = transformer.writable.getWriter();
  for (;;) {
    let r;
    try { r = await reader.read(); } catch { break; }
    if (r.done) break;
    const frame = r.value;
    // A new parent takes over at its first key frame (audio: at once), so children never
    // get delta frames that refer to pictures they did not see.
    if (gen === up.pending && isKey(kind, frame)) {
      up.current = gen;
      up.pending = -1;
      for (const perKind of children.values()) if (perKind[kind]) perKind[kind].rebase = true;
      post({ type: 'upstreamSwitched', kind, gen });
    }
    if (gen === up.current) {
      const md = frame.getMetadata();
      const now = performance.now();
      noteHold(kind, md, now);
      if (trace && trace.length < TRACE_MAX) {
        // hold: ms from the frame's last packet to this transform (Chromium holds received
        // video frames for a tick of its 64 Hz metronome; audio frames are not held).
        trace.push({ kind, ts: frame.timestamp, at: performance.timeOrigin + now,
          crc: crc32(frame.data), key: frame.type === 'key', size: frame.data.byteLength, pt: md.payloadType,
          hold: md.receiveTime > 0 ? now - md.receiveTime : null });
      }
      forward(kind, frame);
    }
    // Not awaited: the children's copies must not wait for this page's own decoding.
    writer.write(frame).catch(() => { /* receiver gone */ });
  }
  if (up.gens.get(gen) === transformer) up.gens.delete(gen);
}

function forward(kind, frame) {
  const wait = kind === 'audio' ? audioWait() : 0;
  for (const [id, perKind] of children) {
    const c = perKind[kind];
    if (!c || c.mode !== 'pass-through' || c.failed || c.standby) continue;
    // The child's sender must have negotiated the frame's payload type (its own encoder's
    // first frame tells which it uses): otherwise the child falls back to track relay.
    if (c.payloadType === null) continue;
    const pt = frame.getMetadata().payloadType;
    if (pt !== undefined && pt !== c.payloadType) { fail(id, kind, c, `payload type ${pt}, child sends ${c.payloadType}`); continue; }
    if (!c.started) {
      // Start a child at a key frame: anything before it would not decode.
      if (!isKey(kind, frame)) { requestKeyFrame(kind, 'new child'); continue; }
      c.started = true;
    }
    let copy;
    try { copy = stamped(c, kind, frame, true); } catch (e) { fail(id, kind, c, 'copy: ' + e); continue; }
    c.frames++;
    const write = () => {
      if (c.removed || c.failed) return;
      c.writer.write(copy).catch((e) => fail(id, kind, c, 'write: ' + e));
    };
    if (kind === 'audio') later(wait, write); else write();
  }
}

function fail(id, kind, c, why) {
  if (c.failed) return;
  c.failed = true;
  post({ type: 'childFailed', id, kind, why: String(why) });
}

/** A child's sender: its own encoder's frames come out of `readable`. In pass-through mode
 *  they are dropped (a key frame among them means the child asked for one); in track mode
 *  they are passed on unchanged (the sender then carries the remote track, re-encoded). */
async function pumpChild(id, kind, c, readable) {
  const reader = readable.getReader();
  for (;;) {
    let r;
    try { r = await reader.read(); } catch { break; }
    if (r.done) break;
    const frame = r.value;
    if (c.removed) break;
    if (c.mode === 'pass-through' && !c.failed) {
      if (c.payloadType === null) c.payloadType = frame.getMetadata().payloadType ?? null;
      if (kind === 'video' && frame.type === 'key') requestKeyFrame(kind, `child ${id}`);
      continue;
    }
    // After a switch from pass-through, the child has seen none of this encoder's frames:
    // start at its first key frame (the switch from the dummy's size makes one).
    if (c.awaitKey) {
      if (frame.type !== 'key') continue;
      c.awaitKey = false;
    }
    let out = frame;
    try { out = stamped(c, kind, frame, false); } catch { /* unchanged */ }
    c.writer.write(out).catch(() => {});
  }
}

/**
 * Track-relay video (RetimedVideo in relay.js): every received frame's pixels copied into a
 * new frame stamped with the page's clock (µs, only moving forward), written to the
 * page's generator track. Here so that the copies never hold up the page's thread.
 */
const retime = { writer: null, reader: null, origin: 0, last: 0 };

async function pumpRetime(reader) {
  for (;;) {
    let r;
    try { r = await reader.read(); } catch { return; }
    if (r.done) return;
    const frame = r.value;
    if (retime.reader !== reader || !retime.writer) { frame.close(); return; }
    const now = Math.round((performance.timeOrigin + performance.now() - retime.origin) * 1000);
    const ts = Math.max(retime.last + 1000, now);
    retime.last = ts;
    let out = null;
    try { out = await copyFrame(frame, ts); } catch { /* closed meanwhile */ }
    frame.close();
    if (out && retime.writer) retime.writer.write(out).catch(() => out.close());
    else if (out) out.close();
  }
}

/**
 * A copy of `frame`'s pixels stamped `timestamp` (µs). Only the pixels: a frame built from
 * the received one (new VideoFrame(frame, …)) keeps its capture time, which the encoder
 * goes by.
 */
async function copyFrame(frame, timestamp) {
  const init = { format: frame.format, codedWidth: frame.codedWidth, codedHeight: frame.codedHeight,
    visibleRect: frame.visibleRect, displayWidth: frame.displayWidth, displayHeight: frame.displayHeight,
    colorSpace: frame.colorSpace, timestamp };
  if (frame.format) {
    const buf = new Uint8Array(frame.allocationSize());
    const layout = await frame.copyTo(buf);
    return new VideoFrame(buf, { ...init, layout });
  }
  // Pixels that cannot be read as planes (a GPU frame): through a canvas.
  const canvas = new OffscreenCanvas(frame.displayWidth, frame.displayHeight);
  canvas.getContext('2d').drawImage(frame, 0, 0);
  return new VideoFrame(canvas, { timestamp });
}

self.onrtctransform = (e) => {
  const t = e.transformer;
  const { kind, gen } = t.options;
  pumpUpstream(t, kind, gen);
};

self.onmessage = (e) => {
  const m = e.data;
  if (m.type === 'upstream') {
    const up = upstream[m.kind];
    // The first parent is used at once; a later one from its first key frame on.
    if (up.current < 0) up.current = m.gen; else if (m.gen !== up.current) up.pending = m.gen;
    up.lastKeyRequest = -Infinity;
    // Transformers arrive shortly after the message; ask once they do.
    setTimeout(() => requestKeyFrame(m.kind, 'new parent'), 50);
    setTimeout(() => requestKeyFrame(m.kind, 'new parent'), 400);
  } else if (m.type === 'child') {
    const perKind = children.get(m.id) || {};
    const c = { writer: m.writable.getWriter(), mode: m.mode, frames: 0, failed: false,
      started: false, payloadType: null, removed: false, standby: !!m.standby,
      offset: 0, lastOut: null, rebase: false };
    perKind[m.kind] = c;
    children.set(m.id, perKind);
    if (m.mode === 'pass-through' && !Frame[m.kind]) fail(m.id, m.kind, c, `no ${m.kind} frame constructor`);
    pumpChild(m.id, m.kind, c, m.readable);
  } else if (m.type === 'mode') {
    const c = children.get(m.id)?.[m.kind];
    if (c) { c.mode = m.mode; c.failed = false; c.started = false; c.awaitKey = m.kind === 'video' && m.mode === 'track'; c.rebase = true; }
  } else if (m.type === 'activate') {
    for (const c of Object.values(children.get(m.id) || {})) { c.standby = false; c.started = false; }
    requestKeyFrame('video', `child ${m.id} activated`);
  } else if (m.type === 'remove') {
    const perKind = children.get(m.id);
    children.delete(m.id);
    for (const c of Object.values(perKind || {})) { c.removed = true; c.writer.close().catch(() => {}); }
  } else if (m.type === 'count') {
    const perKind = children.get(m.id) || {};
    post({ type: 'count', seq: m.seq, video: perKind.video?.frames ?? 0, audio: perKind.audio?.frames ?? 0 });
  } else if (m.type === 'retime') {
    retime.writer = m.writable.getWriter();
    retime.origin = m.origin;
  } else if (m.type === 'retimeFeed') {
    if (retime.reader) retime.reader.cancel().catch(() => {});
    retime.reader = m.readable.getReader();
    pumpRetime(retime.reader);
  } else if (m.type === 'retimeStop') {
    if (retime.reader) retime.reader.cancel().catch(() => {});
    retime.reader = null;
    if (retime.writer) retime.writer.close().catch(() => {});
    retime.writer = null;
  } else if (m.type === 'trace') {
    if (m.start) trace = [];
    else { post({ type: 'trace', seq: m.seq, frames: trace || [] }); trace = null; }
  }
};
