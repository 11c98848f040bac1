// Operator dashboard: every room, and for the chosen room its live tree, counts and
// recent repairs (from the room's server-sent events).
//
// When the server asks for the operator secret, the page asks for it in a form, keeps it in
// sessionStorage (this tab only, gone when it closes) and sends it in the Authorization
// header; it never goes in a URL. Nothing about any room is shown before it is accepted.
import { drawTree, describeTree, followRoom, authHeaders } from '/assets/tree.js';

const $ = (id) => document.getElementById(id);
let selected = new URLSearchParams(location.search).get('room');
let stop = null;
let timer = null;
const MAX_LOG = 50;
const SECRET = 'treecast.operator';

function secret() { try { return sessionStorage.getItem(SECRET) || ''; } catch { return ''; } }
function keep(s) { try { if (s) sessionStorage.setItem(SECRET, s); else sessionStorage.removeItem(SECRET); } catch { /* private mode */ } }

/** Hides every room and asks for the secret; `why` explains a refusal. */
function askForSecret(why) {
  if (stop) stop();
  stop = null;
  clearInterval(timer);
  timer = null;
  keep('');
  $('rooms-view').hidden = true;
  $('rooms').replaceChildren();
  $('tree').replaceChildren();
  $('login').hidden = false;
  $('login-error').hidden = !why;
  $('login-error').textContent = why || '';
  $('secret').focus();
}

function showRooms(needsSecret) {
  $('login').hidden = true;
  $('rooms-view').hidden = false;
  $('sign-out').hidden = !needsSecret;
  if (selected) select(selected); else refresh();
  timer ??= setInterval(refresh, 3000);
}

function log(list, text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (list.firstElementChild && list.firstElementChild.classList.contains('muted')) list.replaceChildren();
  list.prepend(li);
  while (list.children.length > MAX_LOG) list.lastElementChild.remove();
}

function describeEvent(kind, d) {
  if (!d || typeof d !== 'object') return `${kind} ${d ?? ''}`;
  switch (kind) {
    case 'joined': return `peer ${d.peer} joined as ${d.role}${d.resumed ? ' (resumed)' : ''}, capacity ${d.capacity}`;
    case 'left': return `peer ${d.peer} left (${d.cause})`;
    case 'disconnected': return `peer ${d.peer} lost signalling`;
    case 'repaired': return `repaired ${d.subtrees} subtree${d.subtrees === 1 ? '' : 's'} (${d.cause.replace('_', ' ')})`;
    case 'capacity': return `peer ${d.peer} capacity now ${d.capacity}`;
    case 'tree': return d.event === 'linked' ? `${d.parent} → ${d.child} (depth ${d.depth})` :
      d.event === 'unlinked' ? `${d.parent} ↛ ${d.child}` : `${d.event} ${d.peer ?? ''}`;
    case 'ended': return `room ended (${d.reason})`;
    case 'reconfigured': return `settings changed: broadcaster fan-out ${d.root_fanout}, relay fan-out ${d.relay_fanout}, max depth ${d.max_depth}, max viewers ${d.max_peers}`;
    default: return `${kind} ${JSON.stringify(d)}`;
  }
}

/** Children per peer: how many peers feed 0, 1, 2… children, and who is still over its
 * capacity after a fan-out was lowered. */
function describeFanout(s) {
  const counts = [];
  let over = 0;
  for (const p of s.peers || []) {
    const n = (p.children || []).length;
    counts[n] = (counts[n] || 0) + 1;
    if (n > p.capacity) over += 1;
  }
  const text = 'Peers by children fed: ' + Array.from(counts, (c, n) => `${n}: ${c || 0}`).join(', ');
  return over ? `${text}; ${over} still over capacity, moving children on` : text;
}

let editing = false;

/** Puts the room's settings in the form, unless the operator is changing them. */
function showSettings(settings) {
  if (!settings || editing) return;
  $('set-root').value = settings.root_fanout;
  $('set-relay').value = settings.relay_fanout;
  $('set-depth').value = settings.max_depth;
  $('set-viewers').value = settings.max_peers;
}

$('tuning').addEventListener('focusin', () => { editing = true; });
$('tuning').addEventListener('focusout', (e) => { if (!$('tuning').contains(e.relatedTarget)) editing = false; });
$('tuning').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (!selected) return;
  const body = {};
  for (const input of $('tuning').querySelectorAll('input')) body[input.name] = Number(input.value);
  $('apply').disabled = true;
  $('tuning-status').textContent = 'Applying…';
  try {
    const res = await fetch('/api/rooms/' + encodeURIComponent(selected), {
      method: 'PATCH',
      headers: { ...authHeaders(secret()), 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    const answer = await res.json().catch(() => ({}));
    if (res.status === 401) return askForSecret('The server no longer accepts that secret.');
    if (!res.ok) { $('tuning-status').textContent = answer.message || `Refused (${res.status}).`; return; }
    editing = false;
    $('tuning-status').textContent = `Applied: broadcaster fan-out ${answer.root_fanout}, relay fan-out ${answer.relay_fanout}, max depth ${answer.max_depth}, max viewers ${answer.max_viewers}.`;
  } catch {
    $('tuning-status').textContent = 'The server could not be reached; try again.';
  } finally {
    $('apply').disabled = false;
  }
});

function select(room) {
  if (stop) stop();
  selected = room;
  history.replaceState(null, '', '?room=' + encodeURIComponent(room));
  $('detail').hidden = false;
  $('detail-h').textContent = `Room ${room}`;
  $('repairs').replaceChildren(Object.assign(document.createElement('li'), { className: 'muted', textContent: 'None yet.' }));
  $('events').replaceChildren(Object.assign(document.createElement('li'), { className: 'muted', textContent: 'None since this page opened.' }));
  stop = followRoom(room, {
    auth: secret(),
    onRefused: (res) => { if (res.status === 401) askForSecret('The server no longer accepts that secret.'); },
    onSnapshot: (s) => {
      $('summary').textContent = describeTree(s);
      $('histogram').textContent = 'Peers per depth: ' + (s.depth_histogram || []).map((n, d) => `${d}: ${n}`).join(', ');
      $('fanout').textContent = describeFanout(s);
      showSettings(s.settings);
      drawTree($('tree'), s, null);
    },
    onEvent: (kind, d) => {
      if (kind === 'repaired') log($('repairs'), describeEvent(kind, d));
      log($('events'), describeEvent(kind, d));
    },
  });
  refresh();
}

async function refresh() {
  let rooms;
  try {
    const res = await fetch('/api/rooms', { headers: authHeaders(secret()) });
    if (res.status === 401) return askForSecret(secret() ? 'That secret is not valid.' : '');
    if (!res.ok) return;
    rooms = await res.json();
  } catch { return; }
  const body = $('rooms');
  if (!rooms.length) {
    body.replaceChildren(Object.assign(document.createElement('tr'), { innerHTML: '<td colspan="4">No rooms yet. <a href="/">Go live</a> to open one.</td>' }));
    return;
  }
  body.replaceChildren(...rooms.map((r) => {
    const tr = document.createElement('tr');
    const a = document.createElement('a');
    a.href = '?room=' + encodeURIComponent(r.id);
    a.textContent = r.id;
    a.addEventListener('click', (e) => { e.preventDefault(); select(r.id); });
    if (r.id === selected) a.setAttribute('aria-current', 'true');
    const cells = [a, r.ended ? 'ended' : r.live ? 'live' : 'waiting for broadcaster', r.viewers, r.max_depth];
    cells.forEach((v, i) => {
      const td = document.createElement('td');
      if (i >= 2) td.className = 'num';
      td.append(v instanceof Node ? v : String(v));
      tr.append(td);
    });
    return tr;
  }));
  if (!selected) { const live = rooms.find((r) => r.live) || rooms[0]; select(live.id); }
}

$('login').addEventListener('submit', async (e) => {
  e.preventDefault();
  const candidate = $('secret').value.trim();
  $('sign-in').disabled = true;
  try {
    const res = await fetch('/api/rooms', { headers: authHeaders(candidate) });
    if (res.status === 401) { $('login-error').hidden = false; $('login-error').textContent = 'That secret is not valid.'; return; }
    keep(candidate);
    $('secret').value = '';
    showRooms(true);
  } catch {
    $('login-error').hidden = false;
    $('login-error').textContent = 'The server could not be reached; try again.';
  } finally {
    $('sign-in').disabled = false;
  }
});
$('sign-out').addEventListener('click', () => askForSecret(''));

async function start() {
  let needsSecret = true;
  try { needsSecret = !!(await (await fetch('/api/access')).json()).operator_required; } catch { /* ask, to be safe */ }
  if (needsSecret && !secret()) return askForSecret('');
  showRooms(needsSecret);
}
start();
