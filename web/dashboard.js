// Operator dashboard: every room, and for the chosen room its live tree, counts and
// recent repairs (from the room's server-sent events).
import { drawTree, describeTree, followRoom } from '/assets/tree.js';

const $ = (id) => document.getElementById(id);
let selected = new URLSearchParams(location.search).get('room');
let stop = null;
const MAX_LOG = 50;

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
    default: return `${kind} ${JSON.stringify(d)}`;
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
    onSnapshot: (s) => {
      $('summary').textContent = describeTree(s);
      $('histogram').textContent = 'Peers per depth: ' + (s.depth_histogram || []).map((n, d) => `${d}: ${n}`).join(', ');
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
  try { rooms = await (await fetch('/api/rooms')).json(); } catch { return; }
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

if (selected) select(selected); else refresh();
setInterval(refresh, 3000);
