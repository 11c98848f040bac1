// An operator retunes a running room from the dashboard: the Settings form shows the
// room's settings, a value beyond the server's limit is refused with a sentence naming it,
// and lowering the relay fan-out to 1 (with fewer viewers allowed, so that a chain can hold
// them) reshapes the tree into a chain (each surplus child moved
// make-before-break) while every viewer keeps playing; the drawing and the children-per-peer
// line follow.
//
// Liveness bounds are generous (a loaded 2-core CI box); the longest frame gap during the
// change is measured and written to target/browser-tuning.json, not asserted tight.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { liveSuite, waitFor, recordFrames, playingAgain, longestGapAfter, broadcastWithViewers } from './harness.mjs';

const VIEWERS = 3;
const LIVE_BOUND_MS = 60000;
const SETTLE_BOUND_MS = 60000;

describe('retuning a live room from the dashboard', { timeout: 300000 }, () => {
  let room, dashboard;
  const viewers = [];
  let broadcaster;
  const suite = liveSuite({
    it, before, after,
    serverArgs: ['--root-fanout', '1', '--relay-fanout', '3'],
    measurementsFile: 'browser-tuning.json',
    pages: () => [broadcaster, dashboard, ...viewers],
  });
  const { step, measured } = suite;
  const snapshot = async () => (await fetch(`${suite.server.base}/api/rooms/${room}`)).json();

  step('a broadcast with three viewers below one relay; the dashboard shows its settings', async () => {
    ({ broadcaster, room } = await broadcastWithViewers(suite.browser, suite.server.base, VIEWERS, LIVE_BOUND_MS, viewers));
    await waitFor('one relay feeding the others', async () => {
      const s = await snapshot();
      return s.max_depth === 2 && s.waiting === 0;
    }, LIVE_BOUND_MS);
    dashboard = await suite.browser.open(`${suite.server.base}/dashboard?room=${room}`, 'dashboard');
    const d = dashboard.page;
    await waitFor('the settings in the form', () => d.evaluate(() => document.getElementById('set-relay').value === '3'), 15000);
    assert.equal(await d.inputValue('#set-root'), '1');
    assert.match(await d.textContent('#fanout'), /children fed/);
  });

  step('a relay fan-out beyond the server\'s limit is refused in words', async () => {
    const d = dashboard.page;
    await d.fill('#set-relay', '9');
    await d.click('#apply');
    await waitFor('the refusal', () => d.evaluate(() => /relay_fanout/.test(document.getElementById('tuning-status').textContent)), 15000);
    assert.match(await d.textContent('#tuning-status'), /allows 0 to 3/);
    assert.equal((await snapshot()).settings.relay_fanout, 3, 'nothing changed');
  });

  step('relay fan-out 1, at most 10 viewers: the tree becomes a chain and every viewer keeps playing', async () => {
    const d = dashboard.page;
    await Promise.all(viewers.map((v) => recordFrames(v.page)));
    const changedAt = Date.now();
    await d.fill('#set-relay', '1');
    await d.fill('#set-viewers', '10');
    await d.click('#apply');
    await waitFor('applied', () => d.evaluate(() => /^Applied/.test(document.getElementById('tuning-status').textContent)), 15000);
    const s = await waitFor('every relay within its new fan-out', async () => {
      const snap = await snapshot();
      const ok = snap.settings.relay_fanout === 1 && snap.shedding === 0 && snap.waiting === 0 &&
        snap.peers.every((p) => p.role === 'broadcaster' || p.children.length <= 1);
      return ok ? snap : null;
    }, SETTLE_BOUND_MS);
    assert.equal(s.max_depth, VIEWERS, 'a chain');
    measured.settle_ms = Date.now() - changedAt;
    await playingAgain(viewers, changedAt, SETTLE_BOUND_MS);
    measured.longest_gap_ms = (await Promise.all(viewers.map((v) => longestGapAfter(v.page, changedAt)))).map((g) => g.gap);
    console.log('    settled in', measured.settle_ms, 'ms; longest frame gap per viewer', JSON.stringify(measured.longest_gap_ms));
    // The dashboard follows: no one over capacity, the chain drawn, the change logged.
    await waitFor('the dashboard line', () => d.evaluate(() => !/over capacity/.test(document.getElementById('fanout').textContent)), 15000);
    await waitFor('the drawn chain', () => d.evaluate((n) => document.querySelectorAll('#tree .node').length === n + 1, VIEWERS), 15000);
    const events = await d.$$eval('#events li:not(.muted)', (li) => li.map((x) => x.textContent));
    assert.ok(events.some((e) => /changed the settings/.test(e)), JSON.stringify(events));
  });
});
