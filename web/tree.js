// Draws a room's relay tree as an accessible SVG, layer by layer (depth), and keeps it
// live from the room's server-sent events (/api/rooms/{room}/events).

const NS = 'http://www.w3.org/2000/svg';

/** Renders `snapshot` (GET /api/rooms/{room}) into `svg`; `self` is highlighted. */
export function drawTree(svg, snapshot, self) {
  const peers = snapshot.peers || [];
  const byDepth = [];
  const waiting = [];
  for (const p of peers) {
    if (p.depth === null || p.depth === undefined) waiting.push(p);
    else (byDepth[p.depth] ||= []).push(p);
  }
  const rowH = 64, colW = 52, pad = 28;
  const widest = Math.max(1, ...byDepth.map((r) => (r ? r.length : 0)), waiting.length);
  const width = Math.max(240, widest * colW + 2 * pad);
  const rows = byDepth.length + (waiting.length ? 1 : 0);
  const height = Math.max(80, rows * rowH + pad);
  const pos = new Map();
  byDepth.forEach((row, d) => {
    if (!row) return;
    row.sort((a, b) => (a.parent ?? 0) - (b.parent ?? 0) || a.id - b.id);
    row.forEach((p, i) => pos.set(p.id, { x: (width * (i + 0.5)) / row.length, y: pad + d * rowH }));
  });
  waiting.forEach((p, i) => pos.set(p.id, { x: (width * (i + 0.5)) / waiting.length, y: pad + byDepth.length * rowH }));

  svg.replaceChildren();
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  // Never shrink nodes below ~60 %: a wide tree scrolls inside its box instead.
  svg.style.minWidth = `${Math.round(width * 0.6)}px`;
  const desc = document.createElementNS(NS, 'desc');
  desc.textContent = describeTree(snapshot);
  svg.append(desc);
  for (const p of peers) {
    if (p.parent === null || p.parent === undefined) continue;
    const a = pos.get(p.parent), b = pos.get(p.id);
    if (!a || !b) continue;
    const line = document.createElementNS(NS, 'line');
    Object.entries({ x1: a.x, y1: a.y, x2: b.x, y2: b.y }).forEach(([k, v]) => line.setAttribute(k, v));
    line.setAttribute('class', 'edge' + (p.media === 'stalled' ? ' stalled' : ''));
    svg.append(line);
  }
  for (const p of peers) {
    const at = pos.get(p.id);
    if (!at) continue;
    const g = document.createElementNS(NS, 'g');
    const kind = p.role === 'broadcaster' ? 'root' : p.depth == null ? 'waiting' : p.media || 'connecting';
    g.setAttribute('class', `node ${kind}${p.connected ? '' : ' away'}${p.id === self ? ' self' : ''}`);
    const c = document.createElementNS(NS, 'circle');
    c.setAttribute('cx', at.x); c.setAttribute('cy', at.y); c.setAttribute('r', 15);
    const t = document.createElementNS(NS, 'text');
    t.setAttribute('x', at.x); t.setAttribute('y', at.y + 4); t.setAttribute('text-anchor', 'middle');
    t.textContent = p.role === 'broadcaster' ? 'B' : String(p.id);
    const title = document.createElementNS(NS, 'title');
    title.textContent = `${p.role} ${p.id}, depth ${p.depth ?? 'waiting'}, ${p.children.length}/${p.capacity} children, media ${p.media}` +
      (p.latency_ms != null ? `, ~${p.latency_ms} ms behind` : '') + (p.connected ? '' : ', signalling lost');
    g.append(title, c, t);
    svg.append(g);
  }
}

/** One sentence for screen readers and the caption. */
export function describeTree(s) {
  const depth = s.max_depth ?? 0;
  return `${s.viewers} viewer${s.viewers === 1 ? '' : 's'}, tree depth ${depth}` +
    (s.waiting ? `, ${s.waiting} waiting` : '') + (s.ended ? `; ended (${s.ended})` : s.live ? '; live' : '; broadcaster offline');
}

const EVENT_KINDS = ['joined', 'disconnected', 'left', 'repaired', 'capacity', 'tree', 'refused', 'ended', 'lagged'];

/**
 * Follows a room: calls onSnapshot with fresh snapshots (on connect and, debounced, after
 * every change) and onEvent with each event. Returns a function that stops following.
 */
export function followRoom(room, { onSnapshot, onEvent }) {
  const base = '/api/rooms/' + encodeURIComponent(room);
  let pending = null, stopped = false;
  const refresh = () => {
    if (pending || stopped) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        const res = await fetch(base);
        if (res.ok && !stopped) onSnapshot(await res.json());
      } catch { /* next event retries */ }
    }, 250);
  };
  const es = new EventSource(base + '/events');
  es.addEventListener('snapshot', (e) => { try { onSnapshot(JSON.parse(e.data)); } catch { /* ignore */ } });
  for (const kind of EVENT_KINDS) {
    es.addEventListener(kind, (e) => {
      let data = null;
      try { data = JSON.parse(e.data); } catch { /* lagged carries a number */ }
      if (onEvent) onEvent(kind, data);
      refresh();
    });
  }
  return () => { stopped = true; es.close(); clearTimeout(pending); };
}
