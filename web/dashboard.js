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

// Who a peer is, for an operator: the broadcaster, or a viewer by number.
let broadcasterId = null;
const who = (id) => (id === broadcasterId ? 'the broadcaster' : `viewer ${id}`);
// The last departure, so that the repair it causes can say why.
let lastLeft = null;

const LEFT = {
  left: 'left',
  lost: 'lost its connection and did not come back',
  failed: 'stopped sending (its page crashed or its network went down)',
  overflow: 'was disconnected: it fell too far behind with its messages',
  room_ended: 'left as the broadcast ended',
};
const ENDED = {
  broadcaster_left: 'the broadcaster ended it',
  broadcaster_lost: 'the broadcaster\'s connection was lost',
  expired: 'no broadcaster came',
  shutdown: 'the server is shutting down',
};

/** One plain sentence per event, or null for those an operator need not read. */
function describeEvent(kind, d) {
  if (kind === 'lagged') return 'Some events were missed; the drawing was refreshed.';
  if (!d || typeof d !== 'object') return null;
  switch (kind) {
    case 'joined':
      if (d.role === 'broadcaster') broadcasterId = d.peer;
      return d.resumed ? `${who(d.peer)} reconnected and kept its place` :
        d.role === 'broadcaster' ? 'the broadcaster went live' :
        `viewer ${d.peer} joined (can feed ${d.capacity} other${d.capacity === 1 ? '' : 's'})`;
    case 'left':
      lastLeft = d;
      return `${who(d.peer)} ${LEFT[d.cause] || 'left'}`;
    case 'disconnected': return `${who(d.peer)} lost its connection to the server; its place is kept for a few seconds`;
    case 'repaired': {
      const n = d.subtrees === 1 ? 'a viewer (with those it feeds)' : `${d.subtrees} viewers (with those they feed)`;
      const from = lastLeft ? who(lastLeft.peer) : 'their source';
      const why = {
        parent_left: lastLeft && lastLeft.cause !== 'left' ? `after ${from} ${lastLeft.cause === 'failed' ? 'crashed or lost its network' : 'was lost'}` : `after ${from} left`,
        parent_stalled: 'after its picture froze',
        parent_capacity: 'because its source can feed fewer viewers now',
        link_failed: 'because it could not connect to its source',
        rebalance: 'to keep the tree shallow',
      }[d.cause] || `(${d.cause})`;
      lastLeft = null;
      return `moved ${n} to a new source ${why}`;
    }
    case 'capacity': return `${who(d.peer)} can now feed ${d.capacity} viewer${d.capacity === 1 ? '' : 's'}`;
    case 'tree':
      if (d.event === 'linked') {
        return d.parent === broadcasterId || d.depth === 1 ? `viewer ${d.child} now watches directly from the broadcaster` :
          `viewer ${d.child} now watches through viewer ${d.parent}, ${d.depth} hops from the broadcaster`;
      }
      if (d.event === 'waiting') return `viewer ${d.peer} waits for a free place`;
      return null; // unlinks and depth changes are told by the move they belong to
    case 'refused': return `refused a request (${d.code})`;
    case 'ended': return `the broadcast ended: ${ENDED[d.reason] || d.reason}`;
    default: return null;
  }
}

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
      broadcasterId = (s.peers || []).find((p) => p.role === 'broadcaster')?.id ?? broadcasterId;
      $('summary').textContent = describeTree(s);
      $('histogram').textContent = 'Peers per depth: ' + (s.depth_histogram || []).map((n, d) => `${d}: ${n}`).join(', ');
      drawTree($('tree'), s, null);
    },
    onEvent: (kind, d) => {
      // A viewer's media state shows on its node; the log would drown in it.
      if (kind === 'media') return;
      const text = describeEvent(kind, d);
      if (!text) return;
      if (kind === 'repaired') log($('repairs'), text);
      log($('events'), text);
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
