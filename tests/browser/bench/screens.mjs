// Not a test (scripts/test does not run it): screenshots of every page state at a phone
// size (390x844) and a laptop size (1280x800), for looking at the layout. Usage, after
// scripts/build-client + cargo build -p treecast-signaller:
//   node tests/browser/bench/screens.mjs [out-dir=/tmp/treecast-screens]
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, startBrowser, waitFor, media, sleep } from '../harness.mjs';

const out = process.argv[2] || '/tmp/treecast-screens';
mkdirSync(out, { recursive: true });
const sizes = [[390, 844], [1280, 800]];
const server = await startServer(['--root-fanout', '1', '--relay-fanout', '2']);
const browser = await startBrowser();

async function shoot(page, name) {
  for (const [width, height] of sizes) {
    await page.setViewportSize({ width, height });
    await sleep(400);
    const file = join(out, `${name}-${width}.png`);
    await page.screenshot({ path: file, fullPage: true });
    const overflow = await page.evaluate(() => document.scrollingElement.scrollWidth - innerWidth);
    console.log(file, overflow > 0 ? `OVERFLOWS by ${overflow} px` : '');
  }
}

try {
  const b = await browser.open(`${server.base}/?w=320&h=240&fps=15`, 'broadcaster');
  await b.page.check('input[name=source][value=pattern]');
  await b.page.click('#preview');
  await sleep(500);
  await shoot(b.page, 'broadcast-setup');
  await b.page.click('#go-live');
  const link = await waitFor('link', () => b.page.evaluate(() => window.treecast && window.treecast.link), 60000);
  const viewers = [];
  for (let i = 0; i < 3; i++) {
    const v = await browser.open(link, `viewer${i + 1}`);
    await waitFor('decoding', async () => (await media(v.page)).frames > 0, 60000);
    viewers.push(v);
  }
  await sleep(1500);
  await shoot(b.page, 'broadcast-live');
  await viewers[2].page.evaluate(() => document.activeElement.blur());
  await shoot(viewers[2].page, 'watch-playing');
  const d = await browser.open(`${server.base}/dashboard`, 'dashboard');
  await waitFor('dashboard tree', () => d.page.evaluate(() => document.querySelectorAll('#tree .node').length === 4), 15000);
  await shoot(d.page, 'dashboard');
  await b.page.click('#end');
  await waitFor('ended', () => viewers[0].page.evaluate(() => document.body.dataset.phase === 'ended'), 15000);
  await shoot(viewers[0].page, 'watch-ended');
  await shoot(b.page, 'broadcast-over');
  const u = await browser.open(`${server.base}/watch/${'NoSuchRoom'.repeat(6)}1234`, 'unknown');
  await waitFor('error', () => u.page.evaluate(() => document.body.dataset.error), 15000);
  await shoot(u.page, 'watch-unknown');
} finally {
  await browser.close();
  await server.stop();
}
