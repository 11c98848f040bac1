// Access in Chromium, on a server with an operator secret: the dashboard shows no room
// until the secret is entered in its form (a wrong one is refused), then lists the room and
// follows its tree; the broadcast page keeps drawing its own tree and audience with its
// broadcaster token; a viewer needs nothing. The secret never appears in a URL.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { startServer, startBrowser, waitFor, media, repo } from './harness.mjs';

const SECRET = 'browser-test-operator-secret-7f3a';
const LIVE_BOUND_MS = 60000;

describe('access: the dashboard login and the broadcaster\'s own tree', { timeout: 180000 }, () => {
  let server, browser;
  before(async () => {
    server = await startServer([], { env: { TREECAST_ADMIN_SECRET: SECRET } });
    browser = await startBrowser();
  });
  after(async () => {
    try { if (browser) await browser.close(); } finally { if (server) await server.stop(); }
  });

  it('asks for the secret, refuses a wrong one, then shows rooms; the broadcast page draws its tree', async () => {
    const broadcaster = await browser.open(`${server.base}/?w=320&h=240&fps=15`, 'broadcaster');
    const b = broadcaster.page;
    await b.check('input[name=source][value=pattern]');
    await b.click('#go-live');
    await waitFor('the room link', () => b.evaluate(() => window.treecast && window.treecast.link), LIVE_BOUND_MS);
    const { room, link } = await b.evaluate(() => ({ room: window.treecast.room, link: window.treecast.link }));
    await waitFor('live', () => b.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);

    // Without credentials the API refuses the room's data.
    assert.equal((await fetch(`${server.base}/api/rooms`)).status, 401);
    assert.equal((await fetch(`${server.base}/api/rooms/${room}`)).status, 401);

    const viewer = await browser.open(link, 'viewer');
    await waitFor('the viewer decoding', async () => (await media(viewer.page)).frames > 0, LIVE_BOUND_MS);
    // The broadcaster's page follows its room with its token: two nodes, one viewer.
    await waitFor('the broadcaster\'s tree', () => b.evaluate(() =>
      document.querySelectorAll('#tree .node').length === 2 && document.getElementById('viewers').textContent === '1'), 15000);

    const dashboard = await browser.open(`${server.base}/dashboard?room=${room}`, 'dashboard');
    const d = dashboard.page;
    await waitFor('the login form', () => d.evaluate(() => !document.getElementById('login').hidden), 15000);
    const leaked = await d.evaluate(() => ({
      viewHidden: document.getElementById('rooms-view').hidden,
      nodes: document.querySelectorAll('#tree .node').length,
      text: document.getElementById('rooms').textContent,
    }));
    assert.equal(leaked.viewHidden, true, 'no room view before the secret');
    assert.equal(leaked.nodes, 0);
    assert.ok(!leaked.text.includes(room), 'the room id is not shown');

    await d.fill('#secret', 'not-the-secret');
    await d.click('#sign-in');
    await waitFor('the refusal', () => d.evaluate(() =>
      !document.getElementById('login-error').hidden && /not valid/.test(document.getElementById('login-error').textContent)), 15000);
    assert.equal(await d.evaluate(() => document.getElementById('rooms-view').hidden), true);

    await d.fill('#secret', SECRET);
    await d.click('#sign-in');
    await waitFor('the room list', () => d.evaluate((r) => document.getElementById('rooms').textContent.includes(r), room), 15000);
    await waitFor('the dashboard tree', () => d.evaluate(() => document.querySelectorAll('#tree .node').length === 2), 15000);
    const kept = await d.evaluate(() => ({ stored: sessionStorage.getItem('treecast.operator'), url: location.href }));
    assert.equal(kept.stored, SECRET);
    assert.ok(!kept.url.includes(SECRET), 'the secret is not in the address');
    assert.ok(!server.log().includes(SECRET), 'the secret is not in the server log');

    // Signing out hides the rooms again.
    await d.click('#sign-out');
    await waitFor('the login form again', () => d.evaluate(() =>
      !document.getElementById('login').hidden && document.getElementById('rooms-view').hidden &&
      sessionStorage.getItem('treecast.operator') === null), 15000);
  });
});

describe('access: going live where room creation needs a grant', { timeout: 180000 }, () => {
  let server, browser;
  const env = { TREECAST_ADMIN_SECRET: SECRET };
  before(async () => {
    server = await startServer(['--room-creation', 'token'], { env });
    browser = await startBrowser();
  });
  after(async () => {
    try { if (browser) await browser.close(); } finally { if (server) await server.stop(); }
  });

  it('the landing page asks for a grant, refuses a bad one and goes live with a minted one', async () => {
    const bin = process.env.TREECAST_BIN || join(repo, 'target', 'debug', 'treecast-signaller');
    const mintEnv = { ...process.env, ...env };
    delete mintEnv.TREECAST_CONFIG;
    const grant = execFileSync(bin, ['mint-token', '--ttl', '10m', '--sub', 'browser-test'], { env: mintEnv })
      .toString().trim();
    assert.equal(grant.split('.').length, 3);

    const broadcaster = await browser.open(`${server.base}/?w=320&h=240&fps=15`, 'broadcaster');
    const b = broadcaster.page;
    await waitFor('the grant field', () => b.evaluate(() => !document.getElementById('grant-box').hidden), 15000);
    await b.check('input[name=source][value=pattern]');
    await b.fill('#grant', grant.slice(0, -4) + 'AAAA');
    await b.click('#go-live');
    await waitFor('the refusal', () => b.evaluate(() =>
      /not issued/.test(document.getElementById('setup-error').textContent) && !document.getElementById('go-live').disabled), LIVE_BOUND_MS);
    await b.fill('#grant', grant);
    await b.click('#go-live');
    await waitFor('live', () => b.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);
    assert.ok(!(await b.evaluate(() => location.href)).includes(grant), 'the grant is not in the address');
  });
});
