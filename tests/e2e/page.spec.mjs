// The page in real headless Chromium against a running gateway.
//   BASE_URL=http://127.0.0.1:8000/ node --test tests/e2e/page.spec.mjs
// Each test uses an org of its own, so they share one server without seeing
// each other's threads. The mock provider needs no key.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { launch, PHONE } from './browser.mjs';
import {
  answer, answerText, api, getThread, keyFor, metric, openPage, send, startDropProxy,
  threadIdOf, uniqueOrg, until, waitForWords,
} from './helpers.mjs';

const TEST_TIMEOUT = 120_000;
let browser;

before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

const words = (text) => text.split(' ').filter(Boolean).length;
const texts = (page) => page.evaluate(() => window.__texts);

function assertNeverDuplicated(seen, final) {
  const bad = seen.filter((t) => !final.startsWith(t));
  assert.deepEqual(bad, [], 'every text the answer showed is a prefix of the stored answer');
}

test('a message is sent and its answer streams in', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('send');
  // On a phone, with an answer longer than the screen.
  const { context, page, errors } = await openPage(browser, org, { form: PHONE });
  try {
    await send(page, 'How does coalescing work?', 'mock:ttft=300,itl=25,n=150');
    await page.locator('#messages article.assistant[aria-busy="true"]').waitFor();
    await page.locator('#stop:enabled').waitFor();
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();

    const thread = await getThread(org, threadIdOf(page));
    assert.equal(thread.messages.length, 2);
    const [user, assistant] = thread.messages;
    assert.equal(user.content, 'How does coalescing work?');
    assert.equal(assistant.status, 'complete');
    assert.equal(words(assistant.content), 150);
    assert.equal(await answerText(page), assistant.content);
    assert.equal(await page.locator('#messages article.user .msg-body').textContent(), user.content);

    const seen = await texts(page);
    assertNeverDuplicated(seen, assistant.content);
    assert.ok(seen.filter(Boolean).length >= 3, `the answer grew in steps, not at once: ${JSON.stringify(seen)}`);
    const shift = await page.evaluate(() => window.__shift);
    assert.ok(shift < 0.01, `nothing moved while the answer streamed (layout shift ${shift})`);
    // Kept in view: the end of the answer is on screen.
    assert.ok(await page.evaluate(() => {
      const log = document.getElementById('messages');
      return log.scrollHeight > log.clientHeight && log.scrollHeight - log.scrollTop - log.clientHeight < 4;
    }), 'the message log overflows and is scrolled to its end');

    assert.equal(await page.inputValue('#composer-input'), '');
    assert.ok(await page.locator('#send').isEnabled());
    assert.ok(await page.locator('#stop').isDisabled());
    // The phone's thread drawer lists the new thread; Escape closes it.
    await page.click('#threads-toggle');
    await page.locator('#thread-list a[aria-current="page"]', { hasText: 'How does coalescing work?' }).waitFor();
    await page.keyboard.press('Escape');
    await page.locator('#sidebar').waitFor({ state: 'hidden' });
    assert.equal(await page.getAttribute('#threads-toggle', 'aria-expanded'), 'false');

    await page.reload();
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    assert.equal(await answerText(page), assistant.content);
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('two tabs asking the same thing share one provider call', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('tabs');
  const { thread_id: threadId } = await api(org, 'POST', '/api/threads/', { title: 'Shared' });
  const url = new URL(`#thread=${threadId}`, process.env.BASE_URL || 'http://127.0.0.1:8000/').href;
  const a = await openPage(browser, org, { url });
  const b = await openPage(browser, org, { url, context: a.context });
  try {
    for (const { page } of [a, b]) await page.locator('#thread-title', { hasText: 'Shared' }).waitFor();
    const callsBefore = await metric('dac_upstream_calls_total', { provider: 'mock' });
    // A long time to first token keeps the first flight running while the second tab asks.
    const model = 'mock:ttft=3000,itl=30,n=25';
    await send(a.page, 'Is this asked twice?', model);
    await answer(a.page).waitFor();
    await send(b.page, 'Is this asked twice?', model);

    for (const { page } of [a, b]) {
      await page.locator('#messages article.assistant[data-status="complete"]').waitFor({ timeout: 30_000 });
    }
    const thread = await getThread(org, threadId);
    assert.deepEqual(thread.messages.map((m) => m.role), ['user', 'assistant']);
    const stored = thread.messages[1].content;
    assert.equal(await answerText(a.page), stored);
    assert.equal(await answerText(b.page), stored);
    assert.ok(await answer(a.page).locator('.badge').isHidden(), 'the first tab led the flight');
    assert.equal(await answer(b.page).locator('.badge').textContent(), 'joined in progress');
    for (const { page } of [a, b]) assert.equal(await page.locator('#messages article').count(), 2);

    const calls = await until(async () => (await metric('dac_upstream_calls_total', { provider: 'mock' })) - callsBefore,
      { what: 'the upstream call to be counted' });
    assert.equal(calls, 1, 'one provider call for two tabs');

    // A third tab asking after the answer is done gets it from the cache.
    const c = await openPage(browser, org, { url, context: a.context });
    await c.page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    await send(c.page, 'Is this asked twice?', model);
    await c.page.locator('#messages .badge', { hasText: 'from cache' }).waitFor();
    await c.page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    assert.equal(await c.page.locator('#messages article').count(), 2);
    assert.equal(await answerText(c.page), stored);
    assert.equal((await getThread(org, threadId)).messages.length, 2);
    assert.equal((await metric('dac_upstream_calls_total', { provider: 'mock' })) - callsBefore, 1);
    assert.deepEqual([...a.errors, ...b.errors, ...c.errors], []);
  } finally {
    await a.context.close();
  }
});

test('Stop leaves a cancelled message and closes the provider stream', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('stop');
  const { context, page, errors } = await openPage(browser, org);
  try {
    const cancelsBefore = await metric('dac_upstream_calls_total', { provider: 'mock', outcome: 'cancelled' });
    // 400 tokens 50 ms apart: 20 s if nobody stops it.
    await send(page, 'Tell me a long story', 'mock:ttft=100,itl=50,n=400');
    await waitForWords(page, 5);
    const stoppedAt = Date.now();
    await page.click('#stop');
    await page.locator('#messages article.assistant[data-status="cancelled"] .state', { hasText: 'stopped' }).waitFor();
    const shown = await answerText(page);
    assert.ok(await page.locator('#send').isEnabled());
    assert.ok(await page.locator('#stop').isDisabled());

    const threadId = threadIdOf(page);
    const assistant = await until(async () => {
      const m = (await getThread(org, threadId)).messages[1];
      return m && m.status !== 'streaming' && m;
    }, { what: 'the answer to be saved' });
    assert.equal(assistant.status, 'cancelled');
    assert.ok(assistant.content.startsWith(shown), 'the saved text begins with what the page showed');
    assert.ok(words(assistant.content) < 400, `cut short: ${words(assistant.content)} of 400 words`);
    assert.ok(Date.now() - stoppedAt < 10_000, 'cancelled long before the stream would have ended');

    await until(async () => (await metric('dac_active_flights')) === 0, { what: 'no upstream stream open' });
    assert.equal((await metric('dac_upstream_calls_total', { provider: 'mock', outcome: 'cancelled' })) - cancelsBefore, 1);
    // The page settles on what was saved.
    await until(async () => (await answerText(page)) === assistant.content, { what: 'the page to show the saved text' });
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('a dropped connection resumes without duplicated text', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('drop');
  const proxy = await startDropProxy();
  const { context, page, errors } = await openPage(browser, org, { url: proxy.url });
  try {
    // 120 tokens 60 ms apart: the answer is still streaming when the page comes back.
    await send(page, 'Keep talking while the network fails', 'mock:ttft=100,itl=60,n=120');
    await waitForWords(page, 8);
    // Cut the stream; the browser's own retry (with Last-Event-ID) is refused
    // once, so the page has to reopen the stream itself with ?last_event_id=.
    proxy.refuseStreams(1);
    assert.equal(proxy.drop(), 1);
    await answer(page).locator('.state', { hasText: 'reconnecting' }).waitFor();
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor({ timeout: 60_000 });

    const assistant = (await getThread(org, threadIdOf(page))).messages[1];
    assert.equal(assistant.status, 'complete');
    assert.equal(words(assistant.content), 120);
    assert.equal(await answerText(page), assistant.content);
    assertNeverDuplicated(await texts(page), assistant.content);

    const [first, retry, reopened] = proxy.streamRequests;
    assert.equal(proxy.streamRequests.length, 3, JSON.stringify(proxy.streamRequests));
    assert.equal(first.lastEventId, null);
    assert.ok(Number(retry.lastEventId) >= 8 && retry.refused, JSON.stringify(retry));
    assert.match(reopened.path, new RegExp(`[?&]last_event_id=${retry.lastEventId}(&|$)`));
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
    await proxy.close();
  }
});

test('text from the server is shown as text, never run', { timeout: TEST_TIMEOUT }, async () => {
  // The mock answers with words derived from the prompt, so the markup goes
  // in the user message: the page renders user and assistant messages with
  // the same function (renderText in static/app.js).
  const org = uniqueOrg('xss');
  const evil = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">';
  const { context, page, errors } = await openPage(browser, org);
  try {
    await send(page, evil, 'mock:ttft=50,itl=10,n=10');
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    for (let round = 0; round < 2; round += 1) {
      assert.equal(await page.locator('#messages article.user .msg-body').textContent(), evil);
      assert.equal(await page.locator('#messages script, #messages img').count(), 0);
      assert.equal(await page.evaluate(() => window.__xss), undefined);
      assert.equal(await page.locator('#thread-list a').first().textContent(), evil);
      // Again, as rendered from the stored thread.
      if (round === 0) {
        await page.reload();
        await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
      }
    }
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('tool calls and reasoning are shown as collapsed blocks', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('tools');
  const { context, page, errors } = await openPage(browser, org);
  try {
    await send(page, 'Weather in Paris?', 'mock:ttft=50,itl=20,n=6,think=5,tool=get_weather');
    const answer = page.locator('#messages article.assistant');
    // the reasoning streams in before the answer's text
    await answer.locator('details.msg-reasoning').waitFor({ state: 'attached' });
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();

    const thread = await getThread(org, threadIdOf(page));
    const { meta, content } = thread.messages[1];
    assert.equal(meta.finish_reason, 'tool_calls');
    assert.equal(meta.tool_calls.length, 1);
    const call = meta.tool_calls[0].function;
    assert.equal(call.name, 'get_weather');
    for (let round = 0; round < 2; round += 1) {
      const reasoning = answer.locator('details.msg-reasoning');
      const tools = answer.locator('details.msg-tools');
      assert.equal(await reasoning.getAttribute('open'), null, 'the reasoning is collapsed');
      assert.equal(await tools.getAttribute('open'), null, 'the tool calls are collapsed');
      assert.equal(await reasoning.locator('summary').textContent(), 'Reasoning');
      assert.equal(await tools.locator('summary').textContent(), 'Tool call');
      assert.ok(!(await reasoning.locator('.msg-extra-body').isVisible()), 'hidden until opened');
      assert.equal(await answerText(page), content);
      // opened on a click, showing the text as it was stored
      await reasoning.locator('summary').click();
      assert.equal(await reasoning.locator('.msg-extra-body').textContent(), meta.reasoning);
      await tools.locator('summary').click();
      assert.equal(await tools.locator('.tool-call').textContent(), `get_weather(${call.arguments})`);
      if (round === 0) {  // again, as rendered from the stored thread
        await page.reload();
        await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
      }
    }
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('a provider error is shown and the stream is not reopened', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('error');
  const { context, page, errors } = await openPage(browser, org);
  const streamRequests = [];
  page.on('request', (req) => {
    if (new URL(req.url()).pathname.startsWith('/api/streams/')) streamRequests.push(req.url());
  });
  try {
    await send(page, 'This one fails', 'mock:ttft=50,itl=10,n=10,fail=1');
    await page.locator('#messages article.assistant[data-status="error"] .msg-error').waitFor();
    assert.match(await answer(page).locator('.msg-error').textContent(), /fail/i);
    assert.match(await page.locator('#notice.error').textContent(), /^Error: /);
    assert.ok(await page.locator('#send').isEnabled());
    // Nothing to wait for here but time: the browser would retry a closed
    // stream after about 3 s on its own; none may come.
    await page.waitForTimeout(4_500);
    assert.equal(streamRequests.length, 1, JSON.stringify(streamRequests));
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('the printed address opens the page with its key, once', { timeout: TEST_TIMEOUT }, async () => {
  // What `make run` prints: http://127.0.0.1:PORT/#key=... for org_demo.
  const printed = process.env.DAC_E2E_PAGE_URL;
  assert.ok(printed && printed.includes('#key='), `the server printed ${printed}`);
  const key = decodeURIComponent(printed.split('#key=')[1]);
  const { context, page, errors } = await openPage(browser, 'org_demo', { url: printed, key: null });
  try {
    await page.waitForFunction(() => !location.hash.includes('key='));
    assert.equal(await page.evaluate(() => sessionStorage.getItem('dac.key')), key);
    assert.ok(await page.locator('#key-form').isHidden(), 'no key is asked for');
    assert.ok(await page.locator('#org').isHidden(), 'the key decides the org');
    await send(page, 'Hello with the printed key', 'mock:ttft=50,itl=10,n=20');
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    const thread = await fetch(new URL(`/api/threads/${threadIdOf(page)}`, page.url()), {
      headers: { authorization: `Bearer ${key}` }, signal: AbortSignal.timeout(10_000),
    }).then((r) => r.json());
    assert.equal(thread.messages[1].status, 'complete');
    assert.equal(await answerText(page), thread.messages[1].content);
    // Every call of the page carried the key; no address it opened does.
    assert.ok(!page.url().includes(key));
    // A reload keeps the key (sessionStorage) and the thread.
    await page.reload();
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test('without a key the page asks for one', { timeout: TEST_TIMEOUT }, async () => {
  const org = uniqueOrg('ask');
  const { context, page, errors } = await openPage(browser, org, { key: null });
  try {
    await page.locator('#key-form').waitFor();
    assert.match(await page.locator('#notice.error').textContent(), /API key/);
    await page.fill('#key-input', 'dac_not_a_key');
    await page.press('#key-input', 'Enter');
    await page.locator('#key-form').waitFor(); // refused: asked again
    assert.equal(await page.evaluate(() => sessionStorage.getItem('dac.key')), null);
    await page.fill('#key-input', keyFor(org));
    await page.press('#key-input', 'Enter');
    await page.locator('#key-form').waitFor({ state: 'hidden' });
    await send(page, 'Hello after asking', 'mock:ttft=50,itl=10,n=5');
    await page.locator('#messages article.assistant[data-status="complete"]').waitFor();
    assert.equal((await getThread(org, threadIdOf(page))).messages.length, 2);
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});
