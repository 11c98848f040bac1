// treecast browser client: the I/O shell around the wasm agent (client-wasm, which is
// core::agent compiled to WebAssembly). The agent decides; this file owns the WebSocket
// and the RTCPeerConnections and carries out the agent's actions:
//   open_socket / close_socket / send      the signalling WebSocket
//   open_parent {peer}                     receiving connection; the parent sends the offer
//   open_child {peer}                      sending connection with the current tracks; offer
//   open_standby {peer, role}              an idle link prepared in advance (warm standby):
//                                          role "parent": receiving, like open_parent;
//                                          role "child": sending without tracks, offer
//   use_standby {peer}                     that link becomes the parent or a child link;
//                                          a child's senders get the current tracks
//   close {peer}                           close that media or standby connection
//   signal {from, data}                    SDP / ICE for a connection
//   sample_media                           sample the parent connection now (a watchdog
//                                          deadline passed; only samples decide a stall)
//   status {...}                           what the page shows
// Relaying (relay.js): a viewer passes what it receives from its parent on to every child.
// In Chromium the encoded frames go through unchanged ("pass-through": no decode, no
// re-encode, the same picture at every depth); elsewhere, and for a child whose
// pass-through leg fails its self-test or cannot carry the stream (weak child, see
// watchChildren), the received tracks are re-encoded per child ("track" relay). Each child
// connection keeps its two senders for its whole life; when the parent changes, the relay
// switches them over, so children never renegotiate. Every hop prefers VP8: pass-through
// frames keep their codec and payload type.
// Warm standby: a peer the room would name in place of a relay holds idle connections to
// that relay's parent and children, negotiated exactly like the real links (same
// transceivers, codecs and encodings, only without tracks), so taking over needs no ICE,
// DTLS or SDP round: the tracks are put on (or taken from) a connection already up.
// Networks: once welcomed, the page learns its NAT class from the signaller's two STUN
// ports (probeNat) and tells the room, which places it under peers it can reach; it
// reports the candidate-pair type of its parent link and an ICE failure toward the parent.

import { EncodedRelay, preferRelayCodec } from './relay.js';

const STATS_EVERY_MS = 200;      // watchdog sampling of the parent connection (the agent's
                                 // max_sample_gap, 1.5 s, tolerates a background tab's 1/s)
const MEASURE_EVERY_MS = 2000;   // loss / latency / delivered bitrate for reports
const VIDEO_MAX_BITRATE = 450_000; // bit/s per child when the room does not say its stream_kbps
const AUDIO_KBPS = 32;             // the audio's share of the room's stream_kbps (Opus voice)
const PROBE_TIMEOUT_MS = 3000;   // longest wait for the STUN answers of the NAT probe
// A pass-through child whose link does not keep up (loss above this, or the congestion
// controller's estimate under this share of what is sent) in WEAK_SAMPLES relay
// measurements in a row (2 s apart) gets a re-encoded leg under congestion control.
const WEAK_LOSS = 0.1;
const WEAK_SHARE = 0.8;
const WEAK_SAMPLES = 2;

let wasmModule = null;

/** The client is missing from this server: scripts/build-client was not run. */
export class ClientMissing extends Error {}

/** Loads the wasm client once. */
export async function loadClient() {
  if (wasmModule) return wasmModule;
  let mod;
  try {
    mod = await import('/assets/pkg/treecast_client.js');
    await mod.default();
  } catch (e) {
    throw new ClientMissing('The treecast browser client is not built on this server. ' +
      'Its operator should run scripts/build-client (scripts/run does it) and restart it. (' + e.message + ')');
  }
  wasmModule = mod;
  return mod;
}

/** Times a short upload to the signaller; kbit/s, or undefined if it could not. */
export async function measureUplink(bytes = 256 * 1024) {
  const body = new Uint8Array(bytes);
  crypto.getRandomValues(body.subarray(0, 65536));
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 3000);
  const start = performance.now();
  try {
    const res = await fetch('/api/uplink', { method: 'POST', body, signal: abort.signal });
    if (!res.ok) return undefined;
    await res.json();
  } catch {
    return undefined;
  } finally {
    clearTimeout(timer);
  }
  const ms = Math.max(1, performance.now() - start);
  return Math.round(Math.min(1_000_000, Math.max(100, (bytes * 8) / ms)));
}

/** One peer in one room: the broadcaster (with a stream) or a viewer that relays. */
export class Peer {
  /**
   * @param {object} o
   * @param {string} o.room
   * @param {'broadcaster'|'viewer'} o.role
   * @param {string} [o.token] broadcaster token
   * @param {string} [o.link] a private room's signed viewer link token (hello.link)
   * @param {number} [o.uplinkKbps]
   * @param {MediaStream} [o.stream] what the broadcaster sends
   * @param {(status: object) => void} [o.onStatus]
   * @param {(stream: MediaStream) => void} [o.onMedia] a viewer's playable stream changed
   * @param {(info: object) => void} [o.onStats] measurements for an overlay
   * @param {{relay?: 'track', iceOnly?: string}} [o.test] test switches: `relay: 'track'`
   *   feeds this page's children by track relay; `iceOnly` offers only host candidates
   *   with that address (tests route one link through a capped interface)
   */
  constructor(wasm, o) {
    this.wasm = wasm;
    this.room = o.room;
    this.role = o.role;
    this.onStatus = o.onStatus || (() => {});
    this.onMedia = o.onMedia || (() => {});
    this.onStats = o.onStats || (() => {});
    this.client = new wasm.Client(o.room, o.role, o.token ?? undefined, o.uplinkKbps ?? undefined);
    if (o.link) this.client.set_link(o.link);
    this.parent = null;            // {peer, pc, chain, pending, hasRemote, receiving, held, tracks}
    this.previous = null;          // the parent being left, still feeding until the server drops it
    this.children = new Map();     // peer -> {pc, senders, chain, pending, hasRemote, prevBytes, prevAt}
    this.standby = new Map();      // peer -> idle conn of a standby link: a parent's (receiving) or a child's
    this.tracks = { video: null, audio: null };
    this.outStream = new MediaStream();
    this.test = o.test || {};
    this.weakPeers = new Set();  // children whose link could not carry a pass-through leg
    // Every viewer relays through one EncodedRelay (pass-through where the browser can);
    // the broadcaster sends its own tracks.
    this.relay = this.role === 'viewer'
      ? new EncodedRelay({ onStats: (s) => this.watchChildren(s), onEvent: (e) => this.relayEvent(e) })
      : null;
    if (o.stream) for (const t of o.stream.getTracks()) this.setTrack(t);
    this.ws = null;
    this.timer = null;
    this.status = null;
    this.info = { depth: null, latencyMs: null, kbpsIn: null, loss: null, framesDecoded: 0, firstFrameAt: null,
      // Standby links: prepared so far, held now, closed on ICE failure, and how each
      // use_standby found its link: connected (warm), still connecting, or broken (cold).
      standby: { opened: 0, held: 0, failed: 0, usedConnected: 0, usedConnecting: 0, usedCold: 0, uses: [] },
      // How each child is fed ('pass-through' or 'track'), and the fallbacks so far.
      relay: { modes: {}, fallbacks: [] } };
    this.prevIn = null;
    this.lastMeasure = performance.now();
    this.closed = false;
    this.probed = false;
    this.statsTimer = setInterval(() => this.sample(), STATS_EVERY_MS);
    this.pump();
  }

  now() { return performance.now(); }

  /** Carries out every pending action, then re-arms the timer. */
  pump() {
    let json;
    while ((json = this.client.poll_action()) !== undefined && json !== null) {
      try { this.act(JSON.parse(json)); } catch (e) { console.error('treecast action failed', e); }
    }
    clearTimeout(this.timer);
    const due = this.client.poll_timeout();
    if (due !== undefined && due !== null) {
      this.timer = setTimeout(() => { this.client.timeout(this.now()); this.pump(); },
        Math.max(0, due - this.now()));
    }
  }

  act(a) {
    switch (a.kind) {
      case 'open_socket': return this.openSocket();
      case 'close_socket': if (this.ws) { const ws = this.ws; this.ws = null; ws.close(1000); } return;
      case 'send': if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(a.text); return;
      case 'open_parent': return this.openParent(a.peer);
      case 'open_child': return this.openChild(a.peer);
      case 'open_standby': return this.openStandby(a.peer, a.role);
      case 'use_standby': return this.useStandby(a.peer);
      case 'close': return this.closeConn(a.peer);
      case 'signal': return this.onSignal(a.from, a.data);
      // An in-flight sample answers it too: sample() runs one at a time.
      case 'sample_media': return void this.sample();
      case 'status':
        this.status = a;
        this.info.depth = a.depth;
        if (a.phase === 'joined' && !this.probed) { this.probed = true; this.probe(); }
        if (a.phase === 'ended' || a.phase === 'failed' || a.phase === 'left') this.shutdown();
        this.onStatus(a);
        return;
    }
  }

  openSocket() {
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => { if (this.ws === ws) { this.info.socketOpenedAt ??= performance.now(); this.client.socket_opened(this.now()); this.pump(); } };
    ws.onmessage = (e) => { if (this.ws === ws) { this.client.text(this.now(), e.data); this.pump(); } };
    ws.onclose = () => { if (this.ws === ws) { this.ws = null; this.client.socket_closed(this.now()); this.pump(); } };
  }

  newConnection(peer) {
    let servers = [];
    try { servers = JSON.parse(this.client.ice_servers()); } catch { /* none */ }
    const pc = new RTCPeerConnection({ iceServers: servers });
    pc.onicecandidate = (e) => {
      if (!e.candidate) return;
      if (this.test.iceOnly && e.candidate.address !== this.test.iceOnly) return;
      this.sendSignal(peer, e.candidate.toJSON());
    };
    return pc;
  }

  sendSignal(peer, data) {
    if (this.closed) return;
    this.client.send_signal(this.now(), peer, JSON.stringify(data));
    this.pump();
  }

  /** Learns the NAT class once and tells the room (see probeNat). */
  async probe() {
    let servers = [];
    try { servers = JSON.parse(this.client.ice_servers()); } catch { /* none */ }
    const result = await probeNat(servers);
    this.info.nat = result;
    if (result && !this.closed) { this.client.connectivity(this.now(), result, false); this.pump(); }
  }

  openParent(peer) {
    this.becomeParent(this.receivingConn(peer));
  }

  /** A receiving connection to `peer` (the upstream end sends the offer). Its tracks are
   *  kept on it; they are played and relayed only while it is the parent. */
  receivingConn(peer) {
    const pc = this.newConnection(peer);
    const conn = { peer, pc, chain: Promise.resolve(), pending: [], hasRemote: false,
      receiving: true, held: [], tracks: [] };
    pc.ontrack = (e) => {
      conn.tracks.push(e.track);
      if (this.parent !== conn) return;
      if (this.previous) conn.held.push(e.track); else this.setTrack(e.track);
    };
    this.watchIce(conn);
    return conn;
  }

  /**
   * Makes `conn` the parent. While the old parent still feeds us (a move without drop),
   * its tracks stay on screen and on the children's senders; the new ones (those already
   * received, and any still to come) take over when the old connection closes, on the
   * server's drop (once this peer reported the new parent's media and nobody above it is
   * still switching).
   */
  becomeParent(conn) {
    if (this.parent) {
      if (this.previous) this.closeConn(this.parent.peer);
      else this.previous = this.parent;
    }
    this.parent = conn;
    this.prevIn = null;
    // The last few parents, when each was taken (wall clock: comparable across pages).
    this.info.parents = [...(this.info.parents || []).slice(-4), { peer: conn.peer, at: Date.now() }];
    for (const track of conn.tracks) {
      if (this.previous) conn.held.push(track); else this.setTrack(track);
    }
  }

  /**
   * ICE failure: no candidate pair works. On the parent link, tell the room, which never
   * pairs the two again. A standby link that fails is only closed here (it carries
   * nothing; if the room uses it later, the link is opened cold).
   */
  watchIce(conn) {
    const pc = conn.pc;
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState !== 'failed' || this.closed) return;
      if (this.parent === conn) {
        this.client.link_failed(this.now(), conn.peer);
        this.pump();
      } else if (this.standby.get(conn.peer) === conn) {
        // Kept in the map, closed: a use_standby for it then knows which link to open.
        this.info.standby.failed++;
        pc.close();
      }
    };
  }

  openChild(peer) {
    const conn = this.sendingConn(peer, true);
    this.children.set(peer, conn);
    this.offer(conn);
  }

  /** Bit/s per child for each kind: the room's stream bitrate (welcome.limits), the audio's
   *  share off the video's. Null audio: the browser's default. */
  bitrates() {
    let kbps = 0;
    try { kbps = JSON.parse(this.client.stream())?.stream_kbps || 0; } catch { /* not said */ }
    if (!kbps) return { video: VIDEO_MAX_BITRATE, audio: null };
    return { video: Math.max(100, kbps - AUDIO_KBPS) * 1000, audio: AUDIO_KBPS * 1000 };
  }

  /** A sending connection to `peer` with its two senders, carrying the current tracks
   *  when `withTracks`, else none yet (a standby link: the same transceivers, codecs and
   *  encodings, so replaceTrack later needs no renegotiation). */
  sendingConn(peer, withTracks) {
    const pc = this.newConnection(peer);
    const senders = {};
    const rates = this.bitrates();
    for (const kind of ['video', 'audio']) {
      const init = { direction: 'sendonly', streams: [this.outStream] };
      if (rates[kind]) init.sendEncodings = [{ maxBitrate: rates[kind] }];
      // A relay's senders get their tracks from the relay.
      const track = !this.relay && withTracks && this.tracks[kind];
      const t = pc.addTransceiver(track || kind, init);
      if (kind === 'video') preferRelayCodec(t);
      senders[kind] = t.sender;
    }
    keepResolution(senders.video);
    const conn = { peer, pc, senders, chain: Promise.resolve(), pending: [], hasRemote: false,
      prevBytes: 0, prevWire: 0, prevAt: performance.now(), weak: 0 };
    this.watchIce(conn);
    if (this.relay) {
      // Before the offer: the sender's encoded streams cannot be had after it.
      // A child found weak before gets a track leg at once (the room may move it back here).
      const mode = this.test.relay === 'track' || this.weakPeers.has(peer) ? 'track' : undefined;
      this.relay.addChild(peer, pc, senders, { mode, standby: !withTracks }).then((modes) => {
        if (this.relay && this.relay.children.has(peer)) this.info.relay.modes[peer] = modes.video;
      });
      this.info.relay.modes[peer] = this.relay.mode(peer, 'video');
    }
    return conn;
  }

  offer(conn) {
    const { peer, pc } = conn;
    conn.chain = conn.chain.then(async () => {
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      this.sendSignal(peer, { type: 'offer', sdp: pc.localDescription.sdp });
    }).catch((e) => console.warn('treecast: offer to', peer, 'failed', e));
  }

  /** Prepares an idle standby link (see the top of this file). */
  openStandby(peer, role) {
    const old = this.standby.get(peer);
    if (old) old.pc.close();
    let conn;
    if (role === 'parent') {
      conn = this.receivingConn(peer);
    } else if (role === 'child') {
      conn = this.sendingConn(peer, false);
      this.offer(conn);
    } else {
      return;
    }
    conn.role = role;
    this.standby.set(peer, conn);
    this.info.standby.opened++;
    this.info.standby.held = this.standby.size;
  }

  /** The standby link to `peer` becomes the parent or a child link; opened cold if it is
   *  missing or broke. */
  useStandby(peer) {
    const conn = this.standby.get(peer);
    this.standby.delete(peer);
    this.info.standby.held = this.standby.size;
    if (!conn) { console.warn('treecast: no standby link to', peer); return; }
    const pc = conn.pc;
    const broken = pc.signalingState === 'closed' || pc.connectionState === 'failed' ||
      pc.connectionState === 'closed' || pc.iceConnectionState === 'failed';
    if (broken) {
      pc.close();
      this.info.standby.usedCold++;
      return conn.role === 'parent' ? this.openParent(peer) : this.openChild(peer);
    }
    if (pc.connectionState === 'connected') this.info.standby.usedConnected++;
    else this.info.standby.usedConnecting++;
    // The last few uses, with the wall clock (comparable across pages, for tests).
    this.info.standby.uses = [...this.info.standby.uses.slice(-9),
      { peer, role: conn.role, state: pc.connectionState, at: Date.now() }];
    if (conn.role === 'parent') return this.becomeParent(conn);
    if (this.relay) {
      this.relay.activate(peer);
    } else {
      for (const kind of ['video', 'audio']) {
        const track = this.tracks[kind];
        if (track) conn.senders[kind].replaceTrack(track).catch(() => {});
      }
    }
    conn.prevAt = performance.now();
    this.children.set(peer, conn);
  }

  closeConn(peer) {
    if (this.previous && this.previous.peer === peer) {
      this.previous.pc.close();
      this.previous = null;
      if (this.parent) for (const track of this.parent.held.splice(0)) this.setTrack(track);
    }
    if (this.parent && this.parent.peer === peer) {
      this.parent.pc.close();
      this.parent = null;
    }
    const child = this.children.get(peer);
    if (child) { child.pc.close(); this.children.delete(peer); }
    const standby = this.standby.get(peer);
    if (standby) { standby.pc.close(); this.standby.delete(peer); this.info.standby.held = this.standby.size; }
    if ((child || standby?.role === 'child') && this.relay) {
      this.relay.removeChild(peer);
      delete this.info.relay.modes[peer];
    }
  }

  onSignal(from, data) {
    const conn = [this.parent, this.previous].find((c) => c && c.peer === from) || this.children.get(from) ||
      this.standby.get(from);
    if (!conn || !data) return;
    conn.chain = conn.chain.then(async () => {
      const pc = conn.pc;
      if (pc.signalingState === 'closed') return;
      if (data.type === 'offer' && conn.receiving) {
        await pc.setRemoteDescription({ type: 'offer', sdp: data.sdp });
        conn.hasRemote = true;
        if (this.relay) {
          // Before the answer: a receiver transform set later is ignored (Chromium 156).
          preferRelayCodec(pc);
          this.relay.prepareUpstream(receiversOf(pc));
        }
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        this.sendSignal(from, { type: 'answer', sdp: pc.localDescription.sdp });
      } else if (data.type === 'answer' && !conn.receiving) {
        await pc.setRemoteDescription({ type: 'answer', sdp: data.sdp });
        conn.hasRemote = true;
      } else if (data.candidate !== undefined) {
        if (!conn.hasRemote) { conn.pending.push(data); return; }
        await pc.addIceCandidate(data);
        return;
      } else {
        return;
      }
      for (const c of conn.pending.splice(0)) await pc.addIceCandidate(c).catch(() => {});
    }).catch((e) => console.warn('treecast: signal from', from, 'failed', e));
  }

  /** A new source track (captured, or received from a new parent): send it everywhere. */
  setTrack(track) {
    const old = this.tracks[track.kind];
    this.tracks[track.kind] = track;
    if (old) this.outStream.removeTrack(old);
    this.outStream.addTrack(track);
    if (this.relay) {
      const receiver = this.parent?.pc.getReceivers().find((r) => r.track === track);
      if (receiver) this.relay.setUpstream({ [track.kind]: receiver });
    } else {
      for (const child of this.children.values()) {
        const sender = child.senders[track.kind];
        if (sender && sender.track !== track) sender.replaceTrack(track).catch(() => {});
      }
    }
    if (this.role === 'viewer') {
      this.onMedia(new MediaStream([this.tracks.video, this.tracks.audio].filter(Boolean)));
    }
  }

  /** Watchdog sample of the parent connection, and the periodic measurements. */
  async sample() {
    if (this.closed || this.sampling) return;
    this.sampling = true;
    try { await this.sampleOnce(); } finally { this.sampling = false; }
  }

  async sampleOnce() {
    const now = this.now();
    const parent = this.parent;
    let hopLatency, loss, kbpsIn, link;
    if (parent) {
      let frames, decoded, bytes = 0, lost = 0, received = 0, rtt, jitterMs;
      try {
        const stats = await parent.pc.getStats();
        link = selectedLinkKind(stats);
        stats.forEach((s) => {
          if (s.type === 'inbound-rtp') {
            bytes += s.bytesReceived || 0;
            lost += Math.max(0, s.packetsLost || 0);
            received += s.packetsReceived || 0;
            if (s.kind === 'video') {
              // The watchdog counts frames received (assembled from packets off the main
              // thread), not decoded: a decoder starved by this page's own busy CPU is
              // this viewer's problem, not a sign that its parent stopped sending.
              frames = s.framesReceived ?? s.framesDecoded ?? 0;
              decoded = s.framesDecoded || 0;
              if (s.jitterBufferEmittedCount) jitterMs = 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount;
            }
          } else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
            if (s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime * 1000;
          }
        });
      } catch { return; }
      if (this.parent !== parent || this.closed) return;
      if (decoded > 0 && this.info.firstFrameAt === null) this.info.firstFrameAt = performance.now();
      this.info.framesDecoded = decoded || 0;
      this.client.media_progress(now, frames, bytes);
      if (this.prevIn) {
        const dt = now - this.prevIn.at;
        if (dt >= 900) {
          kbpsIn = Math.round(((bytes - this.prevIn.bytes) * 8) / dt);
          const dl = lost - this.prevIn.lost, dr = received - this.prevIn.received;
          loss = dl + dr > 0 ? Math.min(1, Math.max(0, dl / (dl + dr))) : 0;
          this.info.kbpsIn = kbpsIn;
          this.info.loss = loss;
          this.prevIn = { at: now, bytes, lost, received };
        }
      } else {
        this.prevIn = { at: now, bytes, lost, received };
      }
      if (rtt !== undefined || jitterMs !== undefined) {
        hopLatency = Math.round((rtt || 0) / 2 + (jitterMs || 0));
        this.info.hopLatencyMs = hopLatency;
        this.info.latencyMs = hopLatency * Math.max(1, this.info.depth || 1);
      }
    }
    if (now - this.lastMeasure >= MEASURE_EVERY_MS) {
      this.lastMeasure = now;
      const delivered = [];
      const estimates = [];
      for (const [peer, child] of this.children) {
        try {
          const stats = await child.pc.getStats();
          let sent = 0, onWire = 0, pairId, available;
          const pairs = new Map();
          stats.forEach((s) => {
            if (s.type === 'outbound-rtp') { sent += s.bytesSent || 0; onWire += (s.bytesSent || 0) + (s.headerBytesSent || 0); }
            else if (s.type === 'transport') pairId = s.selectedCandidatePairId;
            else if (s.type === 'candidate-pair') pairs.set(s.id, s);
          });
          // The congestion controller's estimate lives on the selected candidate pair.
          const pair = pairs.get(pairId) || [...pairs.values()].find((p) => p.nominated && p.state === 'succeeded');
          if (pair && pair.availableOutgoingBitrate > 0) available = Math.round(pair.availableOutgoingBitrate / 1000);
          const t = performance.now();
          const dt = Math.max(1, t - child.prevAt);
          const mode = this.relay?.mode(peer, 'video');
          delivered.push([peer, Math.max(0, Math.round(((sent - child.prevBytes) * 8) / dt)),
            mode ? mode.replace('-', '_') : null]);
          estimates.push([peer, available ?? null, Math.max(0, Math.round(((onWire - (child.prevWire || 0)) * 8) / dt))]);
          child.prevBytes = sent;
          child.prevWire = onWire;
          child.prevAt = t;
        } catch { /* closed meanwhile */ }
      }
      this.info.delivered = delivered;
      this.info.estimates = estimates;
      if (!this.closed) {
        this.info.link = link ?? null;
        this.client.measured(this.now(), this.role === 'viewer' ? this.info.loss ?? undefined : undefined,
          hopLatency, JSON.stringify(delivered), link);
        // WebRTC's own bandwidth estimate may update the uplink the server knows; the rule
        // (when it may raise or lower it) is client-wasm's uplink module.
        const perChild = Math.round((this.bitrates().video + (this.bitrates().audio || 0)) / 1000);
        const uplink = this.client.uplink(this.now(), JSON.stringify(estimates), perChild);
        if (uplink !== undefined && uplink !== null) this.info.uplinkReports = [...(this.info.uplinkReports || []).slice(-9), uplink];
        this.info.uplinkEstimateKbps = this.client.uplink_estimate() ?? null;
      }
    }
    if (!this.closed) { this.pump(); this.onStats(this.info); }
  }

  /**
   * Leaves the room now (page unload); the broadcaster's leave ends the broadcast for
   * everyone. Cuts a graceful leave short.
   */
  leave() {
    if (this.closed) return;
    this.client.leave(this.now());
    this.pump();
  }

  /**
   * Leaves from the page's own control: a relay keeps feeding its children (phase
   * 'leaving') until the server has moved each to a new parent that delivers, so they
   * see no break; then the phase is 'left'. Leaves at once when it feeds nobody.
   */
  leaveGracefully() {
    if (this.closed) return;
    this.client.leave_gracefully(this.now());
    this.pump();
  }

  shutdown() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.statsTimer);
    clearTimeout(this.timer);
    for (const peer of [...this.children.keys()]) this.closeConn(peer);
    for (const peer of [...this.standby.keys()]) this.closeConn(peer);
    if (this.previous) this.closeConn(this.previous.peer);
    if (this.parent) this.closeConn(this.parent.peer);
    if (this.relay) this.relay.close();
  }

  /**
   * Pass-through frames bypass WebRTC's rate control: a child whose link cannot carry the
   * stream would get a flood of retransmissions and almost no pictures. Such a child gets
   * a track leg instead (re-encoded under its own congestion control).
   */
  watchChildren(samples) {
    this.info.relay.samples = samples.map((m) => ({ peer: m.id, mode: m.modes.video, lost: m.fractionLost,
      available: m.availableOutgoingBitrate, sent: m.sendBitrate, weak: this.children.get(m.id)?.weak ?? null }));
    for (const m of samples) {
      const child = this.children.get(m.id);
      if (!child || m.modes.video !== 'pass-through') continue;
      const lossy = m.fractionLost !== null && m.fractionLost > WEAK_LOSS;
      const short = m.availableOutgoingBitrate !== null && m.sendBitrate !== null && m.sendBitrate > 0 &&
        m.availableOutgoingBitrate < WEAK_SHARE * m.sendBitrate;
      child.weak = lossy || short ? child.weak + 1 : 0;
      if (child.weak >= WEAK_SAMPLES) {
        this.weakPeers.add(m.id);
        this.relay.useTrack(m.id, null, `weak link: loss ${m.fractionLost}, ` +
          `available ${Math.round((m.availableOutgoingBitrate ?? 0) / 1000)} of ${Math.round(m.sendBitrate / 1000)} kbit/s sent`);
      }
    }
  }

  relayEvent(e) {
    if (e.type !== 'fallback') return;
    if (this.relay.children.has(e.id)) this.info.relay.modes[e.id] = this.relay.mode(e.id, 'video');
    this.info.relay.fallbacks = [...this.info.relay.fallbacks.slice(-9), { peer: e.id, kind: e.kind, why: e.why, at: Date.now() }];
    console.info('treecast: child', e.id, e.kind, 'now by track relay:', e.why);
  }
}

/** A connection's receivers by kind. */
function receiversOf(pc) {
  const out = {};
  for (const t of pc.getTransceivers()) {
    const kind = t.receiver.track?.kind;
    if (kind && !out[kind]) out[kind] = t.receiver;
  }
  return out;
}

/**
 * The room's picture is the broadcaster's choice: when bandwidth or CPU run short the
 * encoder drops frames rather than scaling the picture down (a track-relayed leg would
 * otherwise re-encode at a lower resolution at every hop).
 */
function keepResolution(sender) {
  try {
    const p = sender.getParameters();
    p.degradationPreference = 'maintain-resolution';
    sender.setParameters(p).catch(() => {});
  } catch { /* not supported: the browser's default */ }
}

/**
 * The type of the candidate pair ICE selected ('host', 'srflx', 'prflx' or 'relay': the
 * weaker of the two ends), or undefined before one is selected.
 */
export function selectedLinkKind(stats) {
  let pairId;
  stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId; });
  const pair = pairId ? stats.get(pairId)
    : [...stats.values()].find((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded');
  if (!pair) return undefined;
  const local = stats.get(pair.localCandidateId), remote = stats.get(pair.remoteCandidateId);
  if (!local || !remote) return undefined;
  const rank = ['host', 'srflx', 'prflx', 'relay'];
  const r = Math.max(rank.indexOf(local.candidateType), rank.indexOf(remote.candidateType));
  return r < 0 ? undefined : rank[r];
}

/**
 * RFC 5780's mapping test, as far as a page can run it: gathers candidates against the
 * signaller's STUN server on its two ports (the ICE server entry with two stun: URLs) and
 * compares the reflexive ports. Returns 'public' (the reflexive address is a host
 * address, or equals one so Chromium dropped it), 'cone' (one mapping for both ports;
 * a page cannot test filtering), 'symmetric' (a mapping per destination), 'blocked' (no
 * STUN answer at all), or undefined when there is no such server to ask.
 */
export async function probeNat(servers) {
  const stun = (servers || []).find((s) => (s.urls || []).filter((u) => u.startsWith('stun:')).length >= 2);
  if (!stun || typeof RTCPeerConnection === 'undefined') return undefined;
  const urls = stun.urls.filter((u) => u.startsWith('stun:'));
  const pc = new RTCPeerConnection({ iceServers: [{ urls }] });
  const hosts = new Set(), reflexive = [], failed = new Set();
  try {
    pc.createDataChannel('probe');
    const done = new Promise((resolve) => {
      const timer = setTimeout(resolve, PROBE_TIMEOUT_MS);
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') { clearTimeout(timer); resolve(); } };
    });
    pc.onicecandidate = (e) => {
      const c = e.candidate;
      if (!c || !c.candidate || (c.protocol && c.protocol !== 'udp')) return;
      if (c.type === 'host') hosts.add(c.address);
      if (c.type === 'srflx') reflexive.push(c);
    };
    pc.onicecandidateerror = (e) => { if (e.url) failed.add(e.url); };
    await pc.setLocalDescription(await pc.createOffer());
    await done;
  } catch {
    return undefined;
  } finally {
    pc.close();
  }
  if (reflexive.length === 0) return failed.size >= urls.length ? 'blocked' : 'public';
  const ports = new Map();
  for (const c of reflexive) {
    const base = `${c.relatedAddress}:${c.relatedPort}`;
    if (!ports.has(base)) ports.set(base, new Set());
    ports.get(base).add(c.port);
  }
  if ([...ports.values()].some((p) => p.size > 1)) return 'symmetric';
  if (reflexive.every((c) => hosts.has(c.address))) return 'public';
  return 'cone';
}

/** Tells a status in one short sentence for people. */
export function describe(status) {
  if (!status) return 'Starting…';
  switch (status.phase) {
    case 'joining': return 'Connecting to the server…';
    case 'reconnecting': return 'Connection to the server lost; reconnecting (the video keeps playing)…';
    case 'ended': return 'The broadcast has ended.';
    case 'leaving': return 'Leaving: handing the viewers you relay to over to another source…';
    case 'left': return 'You left.';
    case 'failed': return status.error ? status.error.message : 'Could not join.';
  }
  if (status.depth === 0) return status.live ? 'Live.' : 'Connecting…';
  if (status.parent == null && status.live && status.waiting === 'no_route') {
    return 'Your network cannot connect directly to the viewers who could pass the stream on to you, ' +
      'and this server has no relay for such networks. Waiting for a viewer you can reach…';
  }
  if (status.parent == null) return status.live ? 'Waiting for a free place in the relay tree…' : 'Waiting for the broadcaster…';
  if (status.media === 'receiving') return 'Playing.';
  if (status.media === 'stalled') return 'The stream stopped upstream; switching to another relay…';
  return 'Connecting to the stream…';
}
