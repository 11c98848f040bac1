// A static server for the relay bench: /assets/* from web/, everything else from this folder.
// No signaller is needed: the bench page signals between its own connections.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { join, normalize, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const web = resolve(here, '..', '..', '..', 'web');
const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.html': 'text/html; charset=utf-8' };

/** Starts the server on a free loopback port; resolves to {base, stop}. */
export function serveBench() {
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    const [root, rel] = path.startsWith('/assets/') ? [web, path.slice(8)] : [here, path === '/' ? 'page.html' : path.slice(1)];
    if (rel.includes('..')) { res.writeHead(404).end(); return; }
    try {
      const body = await readFile(join(root, rel));
      const ext = rel.slice(rel.lastIndexOf('.'));
      res.writeHead(200, { 'content-type': TYPES[ext] || 'application/octet-stream', 'cache-control': 'no-cache' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok({
    base: `http://127.0.0.1:${server.address().port}`,
    stop: () => new Promise((r) => server.close(r)),
  })));
}
