// Draws a room's relay tree as an accessible SVG, layer by layer (depth), and keeps it
// live from the room's server-sent events (/api/rooms/{room}/events).
//
// The snapshot and the event stream may need credentials (the operator secret, or the
// room's broadcaster token) in an Authorization header. EventSource cannot send headers,
// and a secret must never go in a URL, so the stream is read with fetch() instead.

const NS = 'http://www.w3.org/2000/svg';
// A relay passes the stream on either unchanged or decoded and encoded again (drawn dashed).
const MODE_WORDS = {
  pass_through: 'passed on unchanged (same picture as the broadcaster sent)',
  track: 're-encoded by the relay (some quality lost at this hop)',
};

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
  // …nor blow a small tree up to the box's width (one huge disc right after going live).
  svg.style.maxWidth = `${Math.round(width * 1.25)}px`;
  const desc = document.createElementNS(NS, 'desc');
  desc.textContent = describeTree(snapshot);
  svg.append(desc);
  // How each relay feeds each child, as the relay reported it (none from the broadcaster).
  const modes = new Map();
  for (const p of peers) for (const m of p.relay_modes || []) modes.set(m.peer, m.mode);
  for (const p of peers) {
    if (p.parent === null || p.parent === undefined) continue;
    const a = pos.get(p.parent), b = pos.get(p.id);
    if (!a || !b) continue;
    const line = document.createElementNS(NS, 'line');
    Object.entries({ x1: a.x, y1: a.y, x2: b.x, y2: b.y }).forEach(([k, v]) => line.setAttribute(k, v));
    const mode = modes.get(p.id);
    line.setAttribute('class', 'edge' + (p.media === 'stalled' ? ' stalled' : '') + (mode === 'track' ? ' track' : ''));
    if (mode) line.dataset.mode = mode;
    const title = document.createElementNS(NS, 'title');
    title.textContent = `${p.parent} → ${p.id}: ` + (MODE_WORDS[mode] || 'sent by the broadcaster');
    line.append(title);
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
      (p.latency_ms != null ? `, ~${p.latency_ms} ms behind` : '') + (p.connected ? '' : ', signalling lost') +
      (p.parent != null && modes.get(p.id) ? `; gets the video ${MODE_WORDS[modes.get(p.id)]}` : '');
    g.append(title, c, t);
    svg.append(g);
  }
}

/** One sentence in plain words, for the caption and screen readers. */
export function describeTree(s) {
  const n = s.viewers || 0;
  const depth = s.max_depth ?? 0;
  let text = n === 0 ? 'No viewers yet' : `${n} viewer${n === 1 ? '' : 's'}`;
  if (n > 0 && depth > 1) text += `, the farthest ${depth} steps from the broadcaster`;
  else if (n > 0 && depth === 1) text += ', all watching directly from the broadcaster';
  if (s.waiting) text += `, ${s.waiting} waiting for a place`;
  if (s.ended) return text + '. The broadcast has ended.';
  return text + (s.live ? '.' : '. The broadcaster is offline.');
}

const EVENT_KINDS = ['joined', 'disconnected', 'left', 'repaired', 'capacity', 'tree', 'refused', 'ended', 'media', 'lagged', 'reconfigured'];

/** Request headers carrying `auth` (a secret or token), if any. */
export function authHeaders(auth) {
  return auth ? { Authorization: 'Bearer ' + auth } : {};
}

/**
 * Reads server-sent events from `url` with fetch (so `headers` can carry credentials) and
 * calls onEvent(name, data) for each. Reconnects after a dropped stream; calls onRefused
 * with the response on a 4xx answer and stops. Returns a function that stops reading.
 */
export function streamEvents(url, headers, { onEvent, onRefused }) {
  const abort = new AbortController();
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const res = await fetch(url, { headers: { ...headers, Accept: 'text/event-stream' }, signal: abort.signal, cache: 'no-store' });
        if (res.status >= 400 && res.status < 500) { if (onRefused) onRefused(res); return; }
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, '\n');
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let name = 'message';
            const data = [];
            for (const line of block.split('\n')) {
              if (line.startsWith('event:')) name = line.slice(6).trim();
              else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
            }
            if (data.length) onEvent(name, data.join('\n'));
          }
        }
      } catch { /* dropped or aborted: retry below unless stopped */ }
      if (!stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  })();
  return () => { stopped = true; abort.abort(); };
}

/**
 * Follows a room: calls onSnapshot with fresh snapshots (on connect and, debounced, after
 * every change) and onEvent with each event. `auth` is the operator secret or the room's
 * broadcaster token, when the server asks for one; onRefused is called if it is refused.
 * Returns a function that stops following.
 */
export function followRoom(room, { onSnapshot, onEvent, onRefused, auth }) {
  const base = '/api/rooms/' + encodeURIComponent(room);
  const headers = authHeaders(auth);
  let pending = null, stopped = false;
  const refresh = () => {
    if (pending || stopped) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        const res = await fetch(base, { headers });
        if (res.ok && !stopped) onSnapshot(await res.json());
      } catch { /* next event retries */ }
    }, 250);
  };
  const stopStream = streamEvents(base + '/events', headers, {
    onRefused,
    onEvent: (kind, text) => {
      if (kind === 'snapshot') { try { onSnapshot(JSON.parse(text)); } catch { /* ignore */ } return; }
      if (!EVENT_KINDS.includes(kind)) return;
      let data = null;
      try { data = JSON.parse(text); } catch { /* lagged carries a number */ }
      if (onEvent) onEvent(kind, data);
      refresh();
    },
  });
  return () => { stopped = true; stopStream(); clearTimeout(pending); };
}
