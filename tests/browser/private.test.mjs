// A private room in Chromium: the broadcast page shares a signed link (token in the URL's
// fragment) instead of the bare one; the watch page plays with it, and says in plain words
// what is wrong without it (in words that do not confirm the broadcast exists), with an
// expired link, and with a link used as many times as it allows.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startBrowser, waitFor, media } from './harness.mjs';

const LIVE_BOUND_MS = 60000;

/** Waits until the watch page refused with `code`; returns its title and message. */
async function refusal(page, code) {
  await waitFor(`the ${code} message`, () => page.evaluate(() => document.body.dataset.error), 30000);
  const shown = await page.evaluate(() => ({
    code: document.body.dataset.error,
    title: document.getElementById('title').textContent,
    message: document.getElementById('message').textContent,
    player: document.getElementById('player').hidden,
  }));
  assert.equal(shown.code, code, JSON.stringify(shown));
  assert.equal(shown.player, true, 'no player shown after a refusal');
  return shown;
}

describe('private rooms: signed viewer links', { timeout: 240000 }, () => {
  let server, browser;
  before(async () => {
    server = await startServer();
    browser = await startBrowser();
  });
  after(async () => {
    try { if (browser) await browser.close(); } finally { if (server) await server.stop(); }
  });

  it('shares a signed link that plays; missing, expired and used-up links are explained', async () => {
    const broadcaster = await browser.open(`${server.base}/?w=320&h=240&fps=15&private=1`, 'broadcaster');
    const b = broadcaster.page;
    await b.check('input[name=source][value=pattern]');
    await b.click('#go-live');
    await waitFor('live', () => b.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);
    const link = await waitFor('the signed link', () => b.evaluate(() => window.treecast && window.treecast.link), 15000);
    const { room, token } = await b.evaluate(() => ({
      room: window.treecast.room,
      token: JSON.parse(sessionStorage.getItem('treecast.broadcast')).token,
    }));
    const url = new URL(link);
    assert.equal(url.pathname, `/watch/${room}`);
    assert.match(url.hash, /^#t=[\w-]+\.[\w-]+\.[\w-]+$/, 'the token is in the fragment');
    assert.equal(await b.evaluate(() => document.getElementById('link').value), link, 'the share box holds the signed link');
    assert.match(await b.evaluate(() => document.getElementById('link-note').textContent), /works until/);

    // Without the token the page cannot tell a private broadcast from none at all.
    const bare = await browser.open(`${server.base}/watch/${room}`, 'no link');
    const none = await refusal(bare.page, 'unknown_room');
    assert.match(none.message, /invitation link/);
    assert.match(none.message, /does not exist/);
    await bare.page.close();

    // A tampered token: as if there were no broadcast.
    const forged = await browser.open(link.slice(0, -3) + (link.endsWith('AAA') ? 'BBB' : 'AAA'), 'forged');
    const bad = await refusal(forged.page, 'unknown_room');
    assert.match(bad.message, /does not open any broadcast/);
    await forged.page.close();

    // The signed link plays.
    const viewer = await browser.open(link, 'viewer');
    await waitFor('the viewer decoding', async () => (await media(viewer.page)).frames > 0, LIVE_BOUND_MS);

    // A link that lived one second.
    const mint = async (body) => {
      const res = await fetch(`${server.base}/api/rooms/${room}/links`, {
        method: 'POST', headers: { authorization: `Bearer ${token}` }, body: JSON.stringify(body) });
      assert.equal(res.status, 201);
      return res.json();
    };
    const short = await mint({ expires_in_s: 1 });
    await waitFor('the short link to expire', () => Date.now() / 1000 >= short.expires_at + 0.2, 10000, 100);
    const late = await browser.open(`${server.base}${short.watch_url}`, 'expired');
    const expired = await refusal(late.page, 'link_expired');
    assert.match(expired.message, /has expired/);
    assert.match(expired.title, /expired/);
    await late.page.close();

    // A link for one viewer: the first page joins; opening it again is one use too many.
    const once = await mint({ max_uses: 1 });
    const first = await browser.open(`${server.base}${once.watch_url}`, 'first use');
    await waitFor('the first use joined', () => first.page.evaluate(() => document.body.dataset.phase === 'joined'), LIVE_BOUND_MS);
    await first.page.close();
    const second = await browser.open(`${server.base}${once.watch_url}`, 'second use');
    const usedUp = await refusal(second.page, 'link_used_up');
    assert.match(usedUp.message, /used as many times/);
    await second.page.close();

    // The viewer with the good link is still playing, and no token reached the server log.
    assert.ok((await media(viewer.page)).frames > 0);
    const log = server.log();
    for (const t of [url.hash.slice(3), short.token, once.token]) assert.ok(!log.includes(t), 'a link token in the server log');
  });
});
