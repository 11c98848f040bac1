// The viewer's page (/watch/{room}): plays the stream, relays it to this peer's children,
// shows where it sits in the tree, and says clearly when the room is unknown or ended.
import { loadClient, measureUplink, Peer, describe, ClientMissing } from '/assets/client.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const raw = decodeURIComponent(location.pathname.replace(/^\/watch\/?/, '').replace(/\/$/, ''));
// A private room's invitation: the signed token after #t= (a fragment never reaches the
// server's logs or another site's Referer). It goes to the server in hello.link only.
const link = new URLSearchParams(location.hash.slice(1)).get('t') || null;

function fail(code, html) {
  document.body.dataset.phase = 'failed';
  $('title').textContent = {
    unknown_room: link ? 'This link does not open a broadcast' : 'No broadcast to watch here',
    link_expired: 'This invitation has expired',
    link_used_up: 'This invitation has been used up',
  }[code] || 'Cannot play this link';
  $('relay-note').hidden = true;
  document.body.dataset.error = code;
  const m = $('message');
  m.className = 'notice error';
  m.setAttribute('role', 'alert');
  m.innerHTML = html;
  $('player').hidden = true;
  $('leave').hidden = true;
  video.srcObject = null;
}

const escape = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// The broadcast's title, once the server has told it (welcome.title).
let title = null;
function showTitle(t) {
  if (!t || t === title) return;
  title = t;
  document.title = `${t} — treecast`;
  if (document.body.dataset.phase !== 'ended' && document.body.dataset.phase !== 'failed') $('title').textContent = t;
}

function ended(reason) {
  document.body.dataset.phase = 'ended';
  $('title').textContent = title ? `Ended: ${title}` : 'This broadcast has ended';
  $('relay-note').hidden = true;
  const m = $('message');
  m.className = 'notice';
  m.innerHTML = '<strong>This broadcast has ended.</strong> ' +
    (reason === 'broadcaster_lost' ? 'The broadcaster lost their connection.' : 'Thanks for watching.') +
    ' <a href="/">Start your own</a>.';
  $('player').hidden = true;
  $('leave').hidden = true;
  video.srcObject = null;
}

function show(status) {
  document.body.dataset.phase = status.phase;
  showTitle(status.title);
  if (status.phase === 'ended') return ended(status.ended);
  if (status.phase === 'failed') {
    const code = status.error ? status.error.code : 'failed';
    // A private broadcast answers a missing or wrong invitation exactly like a broadcast
    // that does not exist, so these words must not say which it is.
    if (code === 'unknown_room' && link) return fail(code, '<strong>This link does not open any broadcast on this server.</strong> It may be incomplete or mistyped, or the broadcast may be over. Ask whoever shared it to send the whole link again.');
    if (code === 'unknown_room') return fail(code, `<strong>No broadcast “${escape(raw)}” is open to watch here.</strong> It may need an invitation link: ask the broadcaster for the whole link, including the part after <code>#t=</code>. Or it does not exist or is over: check the link you were given.`);
    if (code === 'link_expired') return fail(code, '<strong>This invitation link has expired.</strong> Invitations work for a limited time; ask the broadcaster for a new link.');
    if (code === 'link_used_up') return fail(code, '<strong>This invitation link has already been used as many times as the broadcaster allowed.</strong> Ask them for a new link.');
    return fail(code, `<strong>Could not join.</strong> ${escape(describe(status))}`);
  }
  $('message').textContent = describe(status);
  if (status.phase === 'leaving' || status.phase === 'left') $('leave').disabled = true;
  if (status.phase === 'left') {
    $('player').hidden = true;
    $('leave').hidden = true;
    video.srcObject = null;
  }
  $('o-state').textContent = status.phase === 'joined' ? status.media : status.phase;
  $('o-depth').textContent = status.depth ?? '–';
  $('o-parent').textContent = status.parent == null ? '–' : (status.depth === 1 ? 'broadcaster' : `viewer ${status.parent}`);
  $('o-viewers').textContent = String(status.viewers);
}

function showStats(info) {
  $('o-latency').textContent = info.latencyMs == null ? '–' : `~${info.latencyMs} ms`;
  $('o-bitrate').textContent = info.kbpsIn == null ? '–' : `${info.kbpsIn} kbit/s`;
  $('o-picture').textContent = video.videoWidth ? `${video.videoWidth}×${video.videoHeight}` : '–';
}

async function start() {
  if (!raw) return fail('no_room', '<strong>This link has no room in it.</strong> A watch link looks like <code>/watch/q7Xc-2_kLm</code>; ask the broadcaster for theirs.');
  if (!/^[A-Za-z0-9_-]{1,64}$/.test(raw)) return fail('bad_room', `<strong>“${escape(raw)}” is not a room id.</strong> Check the link you were given.`);
  document.title = 'Live broadcast — treecast';
  $('title').textContent = 'Live broadcast';
  let snap;
  try {
    // With an invitation, only the WebSocket can tell (a private room answers no one else).
    if (link) throw new Error('ask the WebSocket');
    const res = await fetch('/api/rooms/' + encodeURIComponent(raw));
    if (res.status === 404) return show({ phase: 'failed', error: { code: 'unknown_room' } });
    // Servers with an operator secret answer 401 here: the WebSocket tells what is needed.
    snap = res.ok ? await res.json() : null;
  } catch {
    snap = null; // the WebSocket will tell
  }
  if (snap && snap.ended) return ended(snap.ended);
  let wasm;
  try {
    [wasm] = await Promise.all([loadClient()]);
  } catch (e) {
    return fail('client_missing', `<strong>The player is not available.</strong> ${escape(e instanceof ClientMissing ? e.message : String(e))}`);
  }
  const uplinkKbps = await measureUplink();
  $('player').hidden = false;
  // Switches for tests only (not linked anywhere): ?relay=track, ?ice_only=ADDRESS.
  const q = new URLSearchParams(location.search);
  const test = { relay: q.get('relay') === 'track' ? 'track' : undefined, iceOnly: q.get('ice_only') || undefined };
  const peer = new Peer(wasm, {
    room: raw, role: 'viewer', uplinkKbps, link, test,
    onStatus: show,
    onStats: showStats,
    onMedia: (stream) => {
      video.srcObject = stream;
      video.play().catch(() => {});
    },
  });
  window.treecast = { peer, room: raw };
  // When the first frame is on screen (join-to-first-frame, shown to tests and curious people).
  const firstFrame = () => { peer.info.firstFrameShownAt ??= performance.now(); };
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(firstFrame);
  else video.addEventListener('playing', firstFrame, { once: true });
  // The page's own control hands this peer's children over first; closing the page
  // cannot wait for that and leaves at once.
  $('leave').hidden = false;
  $('leave').addEventListener('click', () => peer.leaveGracefully());
  addEventListener('pagehide', () => peer.leave());
}

$('unmute').addEventListener('click', () => {
  video.muted = !video.muted;
  if (!video.muted) video.play().catch(() => {});
  $('unmute-label').textContent = video.muted ? 'Unmute' : 'Mute';
});
$('volume').addEventListener('input', () => {
  video.volume = Number($('volume').value);
  // Turning the sound up is asking for sound.
  if (video.volume > 0 && video.muted) $('unmute').click();
});
$('details').addEventListener('click', () => {
  const open = $('overlay').hidden;
  $('overlay').hidden = !open;
  $('details').setAttribute('aria-expanded', String(open));
});
$('fullscreen').addEventListener('click', () => {
  const player = $('player');
  if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  else if (player.requestFullscreen) player.requestFullscreen().catch(() => {});
  else if (video.webkitEnterFullscreen) video.webkitEnterFullscreen(); // iPhone Safari
});
document.addEventListener('fullscreenchange', () => {
  $('fullscreen').textContent = document.fullscreenElement ? 'Exit full screen' : 'Full screen';
});

start();
