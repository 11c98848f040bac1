// The pages on a phone: at 390 CSS px wide (and at 1280) no page scrolls sideways, in
// every state (setting up, live with the link, QR code and tree, playing, ended, unknown
// room with the longest room id, the dashboard); the main controls are visible tap
// targets of at least 44x44 CSS px; every control has an accessible name; status text is
// in a live region; keyboard focus is visible; on a phone the stream details do not cover
// the picture.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startBrowser, waitFor, sleep, media } from './harness.mjs';

const PHONE = { width: 390, height: 844 };
const SIZES = [PHONE, { width: 1280, height: 800 }];
const LIVE_BOUND_MS = 60000;
const MIN_TAP = 44;

/** No horizontal scrolling at any of SIZES; leaves the page at phone size. */
async function noSideScroll(page, what) {
  for (const size of SIZES) {
    await page.setViewportSize(size);
    await sleep(250);
    const r = await page.evaluate(() => ({ scrollWidth: document.scrollingElement.scrollWidth, innerWidth }));
    assert.ok(r.scrollWidth <= r.innerWidth, `${what} at ${size.width} px scrolls sideways: ${JSON.stringify(r)}`);
  }
  await page.setViewportSize(PHONE);
  await sleep(250);
}

/** `selector` is visible, wholly on screen horizontally, and at least MIN_TAP square. */
async function tapTarget(page, selector) {
  const el = page.locator(selector);
  assert.ok(await el.isVisible(), `${selector} is visible`);
  const box = await el.boundingBox();
  assert.ok(box.width >= MIN_TAP && box.height >= MIN_TAP, `${selector} is ${box.width}x${box.height}`);
  assert.ok(box.x >= 0 && box.x + box.width <= PHONE.width, `${selector} is on screen: ${JSON.stringify(box)}`);
}

/** Visible controls without an accessible name (label, aria-label(ledby) or text). */
function unlabelled(page) {
  return page.evaluate(() => {
    const name = (el) => {
      if (el.getAttribute('aria-label')) return el.getAttribute('aria-label');
      const by = el.getAttribute('aria-labelledby');
      if (by) return by.split(/\s+/).map((id) => document.getElementById(id)?.textContent || '').join(' ');
      if (el.labels && el.labels.length) return [...el.labels].map((l) => l.textContent).join(' ');
      return el.matches('button, a') ? el.textContent : '';
    };
    return [...document.querySelectorAll('input, button, select, textarea, a[href]')]
      .filter((el) => el.getClientRects().length > 0 && el.type !== 'hidden')
      .filter((el) => !name(el).trim())
      .map((el) => el.outerHTML.slice(0, 100));
  });
}

/** Tabs to `selector` with the keyboard and reads the focus outline it then has. */
async function focusRing(page, selector) {
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  for (let i = 0; i < 30; i++) {
    await page.keyboard.press('Tab');
    if (await page.evaluate((s) => document.activeElement === document.querySelector(s), selector)) {
      return page.evaluate(() => {
        const cs = getComputedStyle(document.activeElement);
        return { style: cs.outlineStyle, width: parseFloat(cs.outlineWidth) };
      });
    }
  }
  throw new Error(`Tab never reached ${selector}`);
}

/** The element's nearest live region (aria-live, or the implicit one of role=status/alert). */
function liveRegion(page, selector) {
  return page.evaluate((s) => {
    const el = document.querySelector(s);
    const region = el && el.closest('[aria-live], [role=status], [role=alert]');
    return region ? (region.getAttribute('aria-live') || region.getAttribute('role')) : null;
  }, selector);
}

describe('the pages on a phone screen', { timeout: 180000 }, () => {
  let server, browser, broadcaster, viewer, link;
  let broken = false;
  const step = (name, fn) => it(name, async (t) => {
    if (broken) return t.skip('an earlier step failed');
    try { await fn(t); } catch (e) { broken = true; throw e; }
  });

  before(async () => {
    server = await startServer();
    browser = await startBrowser();
  });

  after(async () => {
    if (browser) {
      if (broken) for (const p of [broadcaster, viewer]) if (p) console.log(browser.consoleOf(p.page));
      await browser.close();
    }
    if (server) await server.stop();
  });

  step('setting up a broadcast', async () => {
    broadcaster = await browser.open(`${server.base}/?w=320&h=240&fps=15`, 'broadcaster');
    const page = broadcaster.page;
    await page.setViewportSize(PHONE);
    // Before any preview, the empty picture box says what it is for.
    assert.match(await page.textContent('#preview-empty'), /Press Preview/);
    await page.check('input[name=source][value=pattern]');
    await page.click('#preview');
    await waitFor('the preview', () => page.evaluate(() => document.getElementById('preview-video').readyState >= 2), 15000);
    assert.ok(!(await page.isVisible('#preview-empty')), 'the hint goes once the picture shows');
    await noSideScroll(page, 'the set-up page');
    await tapTarget(page, '#go-live');
    await tapTarget(page, '#preview');
    for (const label of await page.locator('fieldset label').all()) {
      const box = await label.boundingBox();
      assert.ok(box.height >= MIN_TAP, `a source or sound choice is ${box.height} px tall`);
    }
    assert.deepEqual(await unlabelled(page), []);
    const ring = await focusRing(page, '#go-live');
    assert.ok(ring.style !== 'none' && ring.width >= 2, `focus ring on Go live: ${JSON.stringify(ring)}`);
  });

  step('live: link, copy, QR code, tree and end are usable on a phone', async () => {
    const page = broadcaster.page;
    await page.click('#go-live');
    link = await waitFor('the room link', () => page.evaluate(() => window.treecast && window.treecast.link), LIVE_BOUND_MS);
    viewer = await browser.open(link, 'viewer');
    await viewer.page.setViewportSize(PHONE);
    await waitFor('the viewer decoding', async () => (await media(viewer.page)).frames > 0, LIVE_BOUND_MS);
    await waitFor('the tree with the viewer', () => page.evaluate(() => document.querySelectorAll('#tree .node').length === 2), 15000);
    await noSideScroll(page, 'the live broadcast page');
    await tapTarget(page, '#copy');
    await tapTarget(page, '#end');
    assert.ok(await page.isVisible('#link'), 'the link is shown');
    // All of it, room id included: it wraps rather than scrolling out of sight.
    const field = await page.$eval('#link', (t) => ({ sw: t.scrollWidth, cw: t.clientWidth, sh: t.scrollHeight, ch: t.clientHeight, value: t.value }));
    assert.ok(field.sw <= field.cw + 1 && field.sh <= field.ch + 1, `the whole link is visible: ${JSON.stringify(field)}`);
    // Right after going live with one viewer, the tree is a small drawing, not a huge disc.
    const root = await page.locator('#tree .node.root circle').boundingBox();
    assert.ok(root && root.width <= 60, `the broadcaster's disc is ${root && root.width} px wide`);
    assert.match(await page.textContent('#tree-summary'), /^1 viewer, all watching directly from the broadcaster\.$/);
    // "Link copied." is a confirmation that goes away.
    await page.click('#copy');
    await waitFor('the copy confirmation', () => page.evaluate(() => document.getElementById('copied').textContent !== ''), 5000);
    await waitFor('the confirmation to go', () => page.evaluate(() => document.getElementById('copied').textContent === ''), 10000);
    const qr = await page.locator('#qr svg').boundingBox();
    assert.ok(qr && qr.width >= 120 && qr.x + qr.width <= PHONE.width, `QR code on screen and scannable: ${JSON.stringify(qr)}`);
    const tree = await page.locator('#tree').boundingBox();
    assert.ok(tree.width > 0 && tree.height > 0, 'the tree is drawn');
    assert.ok(await liveRegion(page, '#status'), 'status is announced');
    assert.match(await page.textContent('#status'), /on air/i);
    assert.deepEqual(await unlabelled(page), []);
    const ring = await focusRing(page, '#copy');
    assert.ok(ring.style !== 'none' && ring.width >= 2, `focus ring on Copy link: ${JSON.stringify(ring)}`);
  });

  step('watching on a phone: the picture is clear of details, unmute is a real button', async () => {
    const page = viewer.page;
    await noSideScroll(page, 'the watch page while playing');
    await tapTarget(page, '#unmute');
    for (const control of ['#details', '#fullscreen']) await tapTarget(page, control);
    // The details are there on demand, not over the picture by default.
    assert.ok(!(await page.isVisible('#overlay')), 'details hidden until asked for');
    await page.click('#details');
    assert.equal(await page.getAttribute('#details', 'aria-expanded'), 'true');
    const video = await page.locator('#video').boundingBox();
    const details = await page.locator('#overlay').boundingBox();
    assert.ok(details.y >= video.y + video.height - 1, `stream details below the picture: ${JSON.stringify({ video, details })}`);
    const unmute = await page.locator('#unmute').boundingBox();
    assert.ok(unmute.y >= video.y && unmute.y + unmute.height <= video.y + video.height, 'unmute sits on the picture');
    assert.ok(await liveRegion(page, '#message'), 'status is announced');
    assert.deepEqual(await unlabelled(page), []);
    const ring = await focusRing(page, '#unmute');
    assert.ok(ring.style !== 'none' && ring.width >= 2, `focus ring on Unmute: ${JSON.stringify(ring)}`);
    await page.keyboard.press('Enter');
    assert.equal(await page.evaluate(() => document.getElementById('video').muted), false, 'unmuted');
    assert.match(await page.textContent('#unmute'), /^\s*Mute\s*$/);
    // The volume follows its slider.
    await page.fill('#volume', '0.4');
    assert.equal(await page.evaluate(() => document.getElementById('video').volume), 0.4);
    // The Dashboard (every room, for the operator) is not offered to viewers.
    assert.equal(await page.locator('header a[href="/dashboard"]').count(), 0);
    // At desktop width the details are an overlay on the picture again.
    await page.setViewportSize(SIZES[1]);
    await sleep(250);
    const wideVideo = await page.locator('#video').boundingBox();
    const wideDetails = await page.locator('#overlay').boundingBox();
    assert.ok(wideDetails.y < wideVideo.y + wideVideo.height, 'overlay on a wide screen');
    await page.setViewportSize(PHONE);
  });

  step('the dashboard on a phone', async () => {
    const { page } = await browser.open(`${server.base}/dashboard`, 'dashboard');
    await page.setViewportSize(PHONE);
    await waitFor('the dashboard tree', () => page.evaluate(() => document.querySelectorAll('#tree .node').length === 2), 15000);
    await noSideScroll(page, 'the dashboard');
    assert.ok(await liveRegion(page, '#summary'), 'summary is announced');
    assert.deepEqual(await unlabelled(page), []);
    const room = await page.locator('#rooms a').first().boundingBox();
    assert.ok(room.height >= MIN_TAP, `room link is ${room.height} px tall`);
    await page.close();
  });

  step('ended, and an unknown room with the longest id, fit a phone', async () => {
    await broadcaster.page.click('#end');
    await waitFor('the viewer sees the end', () => viewer.page.evaluate(() => document.body.dataset.phase === 'ended'), 15000);
    await noSideScroll(viewer.page, 'the ended watch page');
    assert.ok(await viewer.page.isVisible('#message'));
    await noSideScroll(broadcaster.page, 'the ended broadcast page');
    assert.ok(await broadcaster.page.isVisible('#over-text'));
    const { page } = await browser.open(`${server.base}/watch/${'x'.repeat(64)}`, 'unknown');
    await page.setViewportSize(PHONE);
    await waitFor('the error', () => page.evaluate(() => document.body.dataset.error), 15000);
    assert.equal(await page.evaluate(() => document.body.dataset.error), 'unknown_room');
    await noSideScroll(page, 'the unknown-room page');
    assert.ok(await liveRegion(page, '#message'), 'the error is announced');
  });
});
