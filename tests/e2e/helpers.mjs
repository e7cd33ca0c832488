// What the browser tests share: the gateway's API and metrics, polling with a
// deadline, page set-up, and a TCP proxy that can drop a live stream.
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import { DESKTOP } from './browser.mjs';

export const BASE = new URL(process.env.BASE_URL || 'http://127.0.0.1:8000/');
const REQUEST_TIMEOUT_MS = 10_000;

export function uniqueOrg(tag) {
  return `org_e2e_${tag}_${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

const keys = new Map();

/** An API key of `org`, made once with `python -m server keys create` on the server's database. */
export function keyFor(org) {
  if (!keys.has(org)) {
    const out = execFileSync(process.env.DAC_E2E_PYTHON || 'python3', ['-m', 'server', 'keys', 'create', '--org', org],
      { env: { ...process.env, DAC_DB: process.env.DAC_E2E_DB, DAC_DATABASE_URL: '' }, encoding: 'utf8', timeout: 30_000 });
    keys.set(org, out.trim().split('\n').at(-1));
  }
  return keys.get(org);
}

export async function api(org, method, path, body) {
  const res = await fetch(new URL(path, BASE), {
    method,
    headers: { authorization: `Bearer ${keyFor(org)}`, 'content-type': 'application/json', accept: 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
  const data = res.status === 204 ? null : await res.json();
  if (!res.ok) throw new Error(`${method} ${path} -> ${res.status} ${JSON.stringify(data)}`);
  return data;
}

export const getThread = (org, threadId) => api(org, 'GET', `/api/threads/${threadId}`);

/** Sum of the Prometheus samples named `name` whose labels include `labels`. */
export async function metric(name, labels = {}) {
  const res = await fetch(new URL('/metrics', BASE), { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
  const text = await res.text();
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] || '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
  }
  return sum;
}

/** Poll `fn` until it returns something truthy; fail after `timeout` ms showing the last value. */
export async function until(fn, { timeout = 15_000, interval = 100, what = 'a condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/**
 * Records every distinct text the last answer on the page has shown, in
 * order, and adds up the page's layout shifts (with or without input).
 */
function recordAnswerTexts() {
  window.__texts = [];
  window.__shift = 0;
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) window.__shift += entry.value;
  }).observe({ type: 'layout-shift', buffered: true });
  const start = () => {
    const log = document.getElementById('messages');
    new MutationObserver(() => {
      const answers = log.querySelectorAll('.msg.assistant .msg-body');
      const body = answers[answers.length - 1];
      if (body && body.textContent !== window.__texts.at(-1)) window.__texts.push(body.textContent);
    }).observe(log, { childList: true, subtree: true, characterData: true });
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
}

/** A new tab for `org` in `context` (made from `browser` when not given) at `url`; the tab holds the
 * org's key as the page keeps it (`key: null`: none). */
export async function openPage(browser, org, { url = BASE.href, context, form = DESKTOP, key = keyFor(org) } = {}) {
  if (!context) {
    context = await browser.newContext(form);
    await context.addInitScript(([o, k]) => {
      localStorage.setItem('dac.org', o);
      if (k && !sessionStorage.getItem('dac.key')) sessionStorage.setItem('dac.key', k);
    }, [org, key]);
    await context.addInitScript(recordAnswerTexts);
  }
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  await page.goto(url);
  return { context, page, errors };
}

export const answer = (page) => page.locator('#messages article.assistant').last();
export const answerText = (page) => answer(page).locator('.msg-body').textContent();

export function threadIdOf(page) {
  const m = /#thread=(.+)$/.exec(page.url());
  if (!m) throw new Error(`no thread in the page's address: ${page.url()}`);
  return decodeURIComponent(m[1]);
}

/** Wait until the answer on `page` shows at least `n` words. */
export function waitForWords(page, n, timeout = 20_000) {
  return page.waitForFunction((count) => {
    const bodies = document.querySelectorAll('#messages article.assistant .msg-body');
    const body = bodies[bodies.length - 1];
    return body && body.textContent.split(' ').filter(Boolean).length >= count;
  }, n, { timeout });
}

export async function send(page, content, model) {
  if (model) await page.fill('#model', model);
  await page.fill('#composer-input', content);
  await page.press('#composer-input', 'Enter');
}

/**
 * A TCP proxy in front of the gateway. `drop()` cuts the browser's side of
 * every live stream the way a lost network does: the browser sees the
 * connection fail, while the gateway's side stays open and unread-from, so
 * the gateway does not learn of it before the browser comes back.
 * `refuseStreams(n)` answers the next `n` stream requests with a 503.
 */
export async function startDropProxy(target = BASE) {
  const sockets = new Set();
  const streams = new Set();
  const streamRequests = [];
  let refuse = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    const pair = { client, upstream, dropped: false };
    sockets.add(client).add(upstream);
    client.on('data', (buf) => {
      const head = buf.toString('latin1');
      const m = /^GET (\/api\/streams\/\S*) HTTP\/1\.1\r\n/.exec(head);
      if (m) {
        const lastEventId = /\r\nlast-event-id: *(\S+)/i.exec(head)?.[1] || null;
        streamRequests.push({ path: m[1], lastEventId, refused: refuse > 0 });
        if (refuse > 0) {
          refuse -= 1;
          client.end('HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
          upstream.destroy();
          return;
        }
        streams.add(pair);
      }
      upstream.write(buf);
    });
    upstream.on('data', (buf) => {
      if (!pair.dropped) client.write(buf);
    });
    client.on('close', () => {
      if (!pair.dropped) upstream.destroy();
    });
    upstream.on('close', () => client.destroy());
    client.on('error', () => {});
    upstream.on('error', () => {});
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    streamRequests,
    refuseStreams(n) {
      refuse = n;
    },
    drop() {
      let n = 0;
      for (const pair of streams) {
        if (pair.client.destroyed) continue;
        pair.dropped = true;
        pair.client.resetAndDestroy();
        n += 1;
      }
      streams.clear();
      return n;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
