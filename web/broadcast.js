// The broadcaster's page: capture, preview, create a room, go live, share, follow the tree.
import { loadClient, measureUplink, Peer, describe } from '/assets/client.js';
import { drawTree, describeTree, followRoom } from '/assets/tree.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const size = {
  width: Number(params.get('w')) || 640,
  height: Number(params.get('h')) || 360,
  fps: Number(params.get('fps')) || 24,
};
let stream = null;
let peer = null;
let stopFollowing = null;

function showError(text) {
  $('setup-error').textContent = text;
  $('setup-error').hidden = !text;
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
  const source = document.querySelector('input[name=source]:checked').value;
  const mic = $('mic').checked;
  const video = { width: { ideal: size.width }, height: { ideal: size.height }, frameRate: { ideal: size.fps } };
  const tracks = [];
  if (source === 'camera') {
    const s = await navigator.mediaDevices.getUserMedia({ video, audio: mic });
    tracks.push(...s.getTracks());
  } else {
    if (source === 'screen') {
      const s = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: size.fps } }, audio: false });
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
  return true;
}

async function goLive() {
  $('go-live').disabled = true;
  $('preview').disabled = true;
  try {
    if (!stream && !(await preview())) return;
    const wasm = await loadClient(); // before opening a room nobody could broadcast to
    const [uplinkKbps, res] = await Promise.all([measureUplink(), fetch('/api/rooms', { method: 'POST' })]);
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.message || `The server could not open a room (HTTP ${res.status}).`);
    }
    const room = await res.json();
    const link = new URL(room.watch_url, location.href).href;
    $('setup').hidden = true;
    $('live').hidden = false;
    $('link').value = link;
    try { $('qr').innerHTML = wasm.qr_svg(link); } catch { $('qr').hidden = true; }
    document.body.dataset.room = room.room;
    peer = new Peer(wasm, {
      room: room.room, role: 'broadcaster', token: room.token, uplinkKbps, stream,
      onStatus: (s) => {
        $('status').textContent = describe(s);
        document.body.dataset.phase = s.phase;
        if (s.phase === 'ended' || s.phase === 'left' || s.phase === 'failed') finish(s);
      },
    });
    window.treecast = { peer, room: room.room, link };
    stopFollowing = followRoom(room.room, {
      onSnapshot: (snap) => {
        $('viewers').textContent = String(snap.viewers);
        $('tree-summary').textContent = describeTree(snap);
        drawTree($('tree'), snap, snap.broadcaster);
      },
    });
  } catch (e) {
    showError(e.message);
    $('go-live').disabled = false;
    $('preview').disabled = false;
  }
}

function finish(s) {
  if (stopFollowing) stopFollowing();
  stopFollowing = null;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  $('live').hidden = true;
  $('over').hidden = false;
  $('over-text').textContent = s.phase === 'failed' ? describe(s) : 'The broadcast has ended. Viewers were told.';
}

$('preview').addEventListener('click', preview);
$('go-live').addEventListener('click', goLive);
$('end').addEventListener('click', () => { if (peer) peer.leave(); });
$('copy').addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText($('link').value);
    $('copied').textContent = 'Link copied.';
  } catch {
    $('link').select();
    $('copied').textContent = 'Select the link and copy it (Ctrl+C or long-press).';
  }
});
