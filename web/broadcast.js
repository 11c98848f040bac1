// The broadcaster's page: capture, preview, create a room, go live, share, follow the tree.
import { loadClient, measureUplink, Peer, describe } from '/assets/client.js';
import { drawTree, describeTree, followRoom, authHeaders } from '/assets/tree.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
/** The presets this server offers (GET /api/qualities); the first is what a server that
 *  does not say streams. */
let qualities = [{ quality: '360p', label: 'Standard', width: 640, height: 360, fps: 30, stream_kbps: 500, allowed: true }];
let offersQualities = false;

function chosenQuality() {
  const value = (document.querySelector('input[name=quality]:checked') || {}).value;
  return qualities.find((q) => q.quality === value && q.allowed) || qualities.find((q) => q.allowed) || qualities[0];
}

/** What to capture: the chosen preset; the URL's w, h, fps override it (tests, odd cameras). */
function captureSize() {
  const q = chosenQuality();
  return {
    width: Number(params.get('w')) || q.width,
    height: Number(params.get('h')) || q.height,
    fps: Number(params.get('fps')) || q.fps,
  };
}

const mbits = (kbps) => `${(kbps / 1000).toLocaleString('en', { maximumFractionDigits: 1 })} Mbit/s`;

/** Lists the server's presets; those above its limit are shown, disabled, with why. The
 *  URL's quality=… (or a broadcast being taken back) preselects one. */
async function loadQualities(preferred) {
  try {
    const res = await fetch('/api/qualities');
    if (res.ok) {
      const body = await res.json();
      if (Array.isArray(body.qualities) && body.qualities.some((q) => q.allowed)) {
        qualities = body.qualities;
        offersQualities = true;
      }
    }
  } catch { /* an older server: one quality, its default */ }
  const want = preferred || params.get('quality');
  const pick = qualities.find((q) => q.quality === want && q.allowed) || qualities.find((q) => q.allowed);
  const box = $('qualities');
  box.textContent = '';
  for (const q of qualities) {
    const label = document.createElement('label');
    const input = document.createElement('input');
    input.type = 'radio';
    input.name = 'quality';
    input.value = q.quality;
    input.disabled = !q.allowed;
    input.checked = q === pick;
    input.addEventListener('change', () => { if (stream) preview(); });
    label.append(input, ` ${q.label} (${q.quality})`);
    const note = document.createElement('span');
    note.className = 'muted small';
    note.textContent = q.allowed ? ` · ${mbits(q.stream_kbps)} per viewer` : ' · not offered by this server (too much bandwidth)';
    label.append(note);
    box.append(label);
  }
}
let stream = null;
let peer = null;
let stopFollowing = null;

function showError(text) {
  $('setup-error').textContent = text;
  $('setup-error').hidden = !text;
}

/** The room-creation grant typed into the page, on servers that ask for one. It is sent
 *  in the Authorization header only, and kept in this tab's sessionStorage. */
const GRANT = 'treecast.grant';
function grant() {
  const typed = $('grant').value.trim();
  if (typed) { try { sessionStorage.setItem(GRANT, typed); } catch { /* private mode */ } return typed; }
  try { return sessionStorage.getItem(GRANT) || ''; } catch { return ''; }
}

/** Shows the grant field; `why` says what was wrong with the last one. */
function askForGrant(why) {
  try { sessionStorage.removeItem(GRANT); } catch { /* private mode */ }
  $('grant-box').hidden = false;
  showError(why || 'This server lets only invited broadcasters go live: paste the grant you were given, then press Go live.');
  $('go-live').disabled = false;
  $('preview').disabled = false;
  $('grant').focus();
}

/** Whether the broadcast is for invited viewers only (the box, or ?private=1). */
function wantsPrivate() {
  return $('private').checked || params.get('private') === '1';
}

/** Opens the room: the stream bitrate follows the chosen quality (capacities follow from
 *  it); a grant goes along where the server restricts creation. */
function createRoom() {
  const headers = authHeaders(grant());
  const want = {};
  if (offersQualities) want.quality = chosenQuality().quality;
  if (wantsPrivate()) want.private = true;
  if (!Object.keys(want).length) return fetch('/api/rooms', { method: 'POST', headers });
  headers['content-type'] = 'application/json';
  return fetch('/api/rooms', { method: 'POST', headers, body: JSON.stringify(want) });
}

/** A fresh signed viewer link for a private room (the server's longest lifetime, any
 *  number of viewers): {link, expires_at}, or null if the server would not make one. */
async function signedLink(b) {
  try {
    const res = await fetch(`/api/rooms/${encodeURIComponent(b.room)}/links`, { method: 'POST', headers: authHeaders(b.token) });
    if (!res.ok) return null;
    const body = await res.json();
    return { link: new URL(body.watch_url, location.href).href, expiresAt: body.expires_at };
  } catch { return null; }
}

/** Puts `link` in the share box and its QR code. */
function showLink(wasm, link) {
  $('link').value = link;
  try { $('qr').innerHTML = wasm.qr_svg(link); $('qr').hidden = false; } catch { $('qr').hidden = true; }
  if (window.treecast) window.treecast.link = link;
}

/** A private room: asks for a signed link and says until when it works. */
async function showSignedLink(wasm, b) {
  $('link-intro').textContent = 'Private broadcast: only people with this link can watch. Share it with them:';
  $('link').value = '';
  $('link-note').hidden = false;
  $('link-note').textContent = 'Making a signed link…';
  const signed = await signedLink(b);
  if (!signed) {
    $('link-note').textContent = 'The server did not make a signed link; reload the page to try again.';
    return;
  }
  showLink(wasm, signed.link);
  const until = new Date(signed.expiresAt * 1000);
  $('link-note').textContent = `The link works until ${until.toLocaleString()}. Anyone you pass it to can watch; reload this page for a new link.`;
}

/** Shows the grant field at once on servers that restrict room creation. */
async function learnAccess() {
  try {
    const info = await (await fetch('/api/access')).json();
    if (info.create === 'token') $('grant-box').hidden = false;
  } catch { /* the 401 on Go live will tell */ }
}

/** A canvas with a running clock: the time is also drawn as 48 black/white blocks, which
 *  viewers (and the browser tests) read back to measure glass-to-glass latency. */
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
    ctx.font = `bold ${Math.round(height / 8)}px system-ui, sans-serif`;
    ctx.textAlign = 'center';
    ctx.fillText(new Date(now).toISOString().slice(11, 23), width / 2, height * 0.62);
    video.requestFrame();
  }, 1000 / fps);
  video.contentHint = 'motion';
  return video;
}

function toneTrack() {
  const audio = new AudioContext();
  const osc = audio.createOscillator();
  const gain = audio.createGain();
  gain.gain.value = 0.05;
  osc.frequency.value = 440;
  const out = audio.createMediaStreamDestination();
  osc.connect(gain).connect(out);
  osc.start();
  return out.stream.getAudioTracks()[0];
}

async function capture() {
  const size = captureSize();
  const source = document.querySelector('input[name=source]:checked').value;
  const mic = $('mic').checked;
  const video = { width: { ideal: size.width }, height: { ideal: size.height }, frameRate: { ideal: size.fps } };
  const tracks = [];
  if (source === 'camera') {
    const s = await navigator.mediaDevices.getUserMedia({ video, audio: mic });
    tracks.push(...s.getTracks());
  } else {
    if (source === 'screen') {
      const s = await navigator.mediaDevices.getDisplayMedia({
        video: { width: { max: size.width }, height: { max: size.height }, frameRate: { ideal: size.fps } }, audio: false });
      tracks.push(...s.getVideoTracks());
    } else if (source === 'pattern') {
      tracks.push(testPattern(size.width, size.height, size.fps));
    }
    if (mic) {
      if (source === 'pattern' && params.get('tone') !== '0') tracks.push(toneTrack());
      else tracks.push(...(await navigator.mediaDevices.getUserMedia({ audio: true })).getAudioTracks());
    }
  }
  if (!tracks.length) throw new Error('Choose a video source or the microphone: there is nothing to broadcast.');
  return new MediaStream(tracks);
}

async function preview() {
  showError('');
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  try {
    stream = await capture();
  } catch (e) {
    showError(e.name === 'NotAllowedError' ? 'The browser was not allowed to use the camera, microphone or screen. Allow it and try again.' : e.message);
    return false;
  }
  $('preview-video').srcObject = stream;
  $('preview-video').play().catch(() => {});
  $('preview-empty').hidden = true;
  return true;
}

/** The broadcast this tab runs, kept in sessionStorage so that reloading the tab takes
 *  the room back (the server hands the root to a broadcaster token without a resume token
 *  while the old session is within its grace period), while a new tab starts afresh. */
const SAVED = 'treecast.broadcast';
function saved() {
  try { return JSON.parse(sessionStorage.getItem(SAVED)) || null; } catch { return null; }
}
function save(b) { try { sessionStorage.setItem(SAVED, JSON.stringify(b)); } catch { /* private mode */ } }
function forget() { try { sessionStorage.removeItem(SAVED); } catch { /* private mode */ } }

function chosenSource() {
  return { source: document.querySelector('input[name=source]:checked').value, mic: $('mic').checked,
    quality: chosenQuality().quality };
}

async function goLive() {
  $('go-live').disabled = true;
  $('preview').disabled = true;
  try {
    if (!stream && !(await preview())) return;
    const wasm = await loadClient(); // before opening a room nobody could broadcast to
    const [uplinkKbps, res] = await Promise.all([measureUplink(), createRoom()]);
    if (res.status === 401 || res.status === 403) {
      const body = await res.json().catch(() => ({}));
      askForGrant(grant() ? (body.message || 'That grant was refused.') : '');
      return;
    }
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.message || `The server could not open a room (HTTP ${res.status}).`);
    }
    const room = await res.json();
    const b = { room: room.room, token: room.token, link: new URL(room.watch_url, location.href).href,
      private: !!room.private, uplinkKbps, ...chosenSource() };
    save(b);
    live(wasm, b, false);
  } catch (e) {
    showError(e.message);
    $('go-live').disabled = false;
    $('preview').disabled = false;
  }
}

/** Shows the live view for broadcast `b` and connects (again, when `resuming`). */
function live(wasm, b, resuming) {
  $('setup').hidden = true;
  $('intro').hidden = true;
  $('title').textContent = 'You are live';
  $('live').hidden = false;
  document.body.dataset.room = b.room;
  const q = qualities.find((x) => x.quality === b.quality);
  if (q) {
    $('quality-live').textContent = `Quality: ${q.label} (${q.width}×${q.height}), ${mbits(q.stream_kbps)} to each viewer you feed.`;
    $('quality-live').hidden = false;
  }
  window.treecast = { peer: null, room: b.room, link: b.private ? null : b.link, resumed: resuming,
    quality: b.quality, private: !!b.private };
  // A private room's bare link opens nothing: share a signed one instead.
  if (b.private) showSignedLink(wasm, b);
  else showLink(wasm, b.link);
  connect(wasm, b, resuming, 0);
  // Resumed: take the room back at once (within the grace period), and send the picture
  // as soon as it is captured again.
  if (!stream) reacquire(b).then(showStatus);
  // The room's own token opens its snapshot and events, whatever the server asks of others.
  stopFollowing = followRoom(b.room, {
    auth: b.token,
    onSnapshot: (snap) => {
      $('viewers').textContent = String(snap.viewers);
      $('tree-summary').textContent = describeTree(snap);
      drawTree($('tree'), snap, snap.broadcaster);
    },
  });
}

function showStatus() {
  const s = peer && peer.status;
  const onAir = !!(s && s.phase === 'joined' && s.live);
  let text = describe(s);
  if (onAir) text = stream ? 'On air: whoever opens the link watches.' : 'Back in your room; the picture resumes when your camera or screen is on again.';
  $('status').textContent = text;
  $('live-badge').hidden = !onAir;
}

function connect(wasm, b, resuming, attempt) {
  peer = new Peer(wasm, {
    room: b.room, role: 'broadcaster', token: b.token, uplinkKbps: b.uplinkKbps, stream,
    onStatus: (s) => {
      document.body.dataset.phase = s.phase;
      const code = s.error && s.error.code;
      // Right after a reload the server may not have noticed the old page's socket close
      // yet; a takeover is refused until it has.
      if (resuming && code === 'broadcaster_exists' && attempt < 8) {
        $('status').textContent = 'Taking the broadcast back from the previous page…';
        setTimeout(() => connect(wasm, b, resuming, attempt + 1), 750);
        return;
      }
      showStatus();
      if (s.phase === 'ended' || s.phase === 'left' || s.phase === 'failed') finish(s);
    },
  });
  window.treecast.peer = peer;
}

/** Captures the saved source again after a reload. A test pattern (or sound alone) needs
 *  no permission; the camera usually has it from before; a screen needs a click. */
async function reacquire(b) {
  const attach = () => { for (const t of stream.getTracks()) peer.setTrack(t); };
  if (b.source !== 'screen' && (await preview())) { attach(); return; }
  $('resume-text').textContent = b.source === 'screen'
    ? 'Share your screen again to resume the picture.'
    : 'Allow the camera and microphone again to resume the picture.';
  $('resume-media').hidden = false;
  return new Promise((resolve) => {
    $('resume-button').onclick = async () => {
      if (!(await preview())) { $('resume-text').textContent = $('setup-error').textContent; return; }
      $('resume-media').hidden = true;
      attach();
      resolve();
    };
  });
}

function finish(s) {
  forget();
  if (stopFollowing) stopFollowing();
  stopFollowing = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  $('live').hidden = true;
  $('title').textContent = 'Broadcast over';
  $('over').hidden = false;
  $('over-text').textContent = s.phase === 'failed'
    ? (s.error && s.error.code === 'broadcaster_exists'
      ? 'This broadcast is live in another tab or window; carry on there.' : describe(s))
    : 'The broadcast has ended. Viewers were told.';
  $('over-text').focus();
}

/** After a reload: take the room back if it is still open. */
async function resumeSaved() {
  const b = saved();
  await loadQualities(b && b.quality);
  if (!b || !b.room || !b.token) return;
  const radio = document.querySelector(`input[name=source][value="${CSS.escape(String(b.source))}"]`);
  if (radio) radio.checked = true;
  $('mic').checked = !!b.mic;
  let open = false;
  try {
    const res = await fetch('/api/rooms/' + encodeURIComponent(b.room), { headers: authHeaders(b.token) });
    open = res.ok && !(await res.json()).ended;
  } catch { open = true; /* the WebSocket will tell */ }
  if (!open) {
    forget();
    showError('Your previous broadcast has ended. Go live again to start a new one.');
    return;
  }
  let wasm;
  try { wasm = await loadClient(); } catch (e) { showError(e.message); return; }
  live(wasm, b, true);
}

$('preview').addEventListener('click', preview);
$('go-live').addEventListener('click', goLive);
$('end').addEventListener('click', () => { forget(); if (peer) peer.leave(); });
let copiedTimer = null;
$('copy').addEventListener('click', async () => {
  clearTimeout(copiedTimer);
  try {
    await navigator.clipboard.writeText($('link').value);
    $('copied').textContent = 'Link copied.';
    // A confirmation, not a state: it goes once read.
    copiedTimer = setTimeout(() => { $('copied').textContent = ''; }, 4000);
  } catch {
    $('link').select();
    $('copied').textContent = 'Select the link and copy it (Ctrl+C or long-press).';
  }
});

learnAccess();
resumeSaved();
