#!/usr/bin/env node
// Time one gateway stream: prints one JSON line
//   {"ttft_ms", "total_ms", "deltas", "bytes", "status", "coalesce", ...}
// Node 20+, nothing to install (built-in fetch and web streams).
//
//   node sse_ttft.mjs --base http://127.0.0.1:8000 --content "What is DAC?"
//   export THREAD=$(...); seq 10 | xargs -n1 -P10 node sse_ttft.mjs
//
// TTFT is the time from sending the request to the first non-empty delta (or
// snapshot). `status` is how the stream ended: "complete" (a `done` event),
// "error" (an `error` event), "cancelled" (this script closed it, see
// --cancel-after-ms) or "incomplete" (the server ended it without either).

const DEFAULT_BASE = "http://127.0.0.1:8000";
const DEFAULT_ORG = "org_demo";
const DEFAULT_CONTENT = "What is DAC?";
// After --cancel-after-ms closes the stream, poll the message this long for `cancelled`.
const CANCEL_CONFIRM_TIMEOUT_MS = 2000;
const CANCEL_CONFIRM_POLL_MS = 10;

const HELP = `usage: node sse_ttft.mjs [options] [N]

Open one stream on the DAC gateway and print one JSON line:
  {"ttft_ms", "total_ms", "deltas", "bytes", "status", "coalesce", "http",
   "stream_id", "thread_id", "text_chars", "cancel_ms", "cancel_confirm_ms"}

options (environment variable in brackets):
  --base URL            gateway address [BASE] (default ${DEFAULT_BASE})
  --thread ID           thread to post to [THREAD] (default: create one)
  --org ORG             x-org-id [ORG] (default ${DEFAULT_ORG}), for DAC_AUTH=header
  --key KEY             API key [DAC_KEY], sent as Authorization: Bearer (DAC_AUTH=keys);
                        the key decides the org and --org is not sent
  --content TEXT        the user message [CONTENT] (default "${DEFAULT_CONTENT}")
  --provider NAME       provider [PROVIDER] (default: the server's)
  --model NAME          model [MODEL], e.g. mock:ttft=300,itl=30,n=40
  --stream-url URL      open this stream (GET, e.g. a 202's stream_url) instead of posting
  --cancel-after-ms N   close the connection N ms after the request was sent; reports
                        cancel_ms, and cancel_confirm_ms: how long until the server
                        showed the message as cancelled (null if it did not within
                        ${CANCEL_CONFIRM_TIMEOUT_MS} ms, e.g. because other listeners remain)
  --help                this text

A bare number argument is accepted and ignored, so that
  seq 10 | xargs -n1 -P10 node sse_ttft.mjs
runs ten streams at once (export THREAD first to make them share one flight).
Exit status: 0 when the stream was opened, 1 on an HTTP or network error, 2 on bad usage.`;

class UsageError extends Error {}

/** The caller's credentials: the API key, or else the org in x-org-id. */
function who(opts) {
  return opts.key ? { authorization: `Bearer ${opts.key}` } : { "x-org-id": opts.org };
}

function parseArgs(argv, env) {
  const opts = {
    base: env.BASE || DEFAULT_BASE,
    thread: env.THREAD || null,
    org: env.ORG || DEFAULT_ORG,
    key: env.DAC_KEY || null,
    content: env.CONTENT || DEFAULT_CONTENT,
    provider: env.PROVIDER || null,
    model: env.MODEL || null,
    streamUrl: env.STREAM_URL || null,
    cancelAfterMs: null,
    help: false,
  };
  const names = {
    "--base": "base", "--thread": "thread", "--org": "org", "--key": "key", "--content": "content",
    "--provider": "provider", "--model": "model", "--stream-url": "streamUrl",
    "--cancel-after-ms": "cancelAfterMs",
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value;
    if (arg === "--help" || arg === "-h") {
      opts.help = true;
      continue;
    }
    if (arg.startsWith("--") && arg.includes("=")) {
      [arg, value] = [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)];
    }
    if (arg in names) {
      if (value === undefined) {
        if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
        value = argv[++i];
      }
      opts[names[arg]] = value;
    } else if (/^\d+$/.test(arg)) {
      // xargs -n1 hands each line of `seq N` over as an argument: accepted and ignored.
    } else {
      throw new UsageError(`unknown argument ${JSON.stringify(arg)} (see --help)`);
    }
  }
  if (opts.cancelAfterMs !== null) {
    const n = Number(opts.cancelAfterMs);
    if (!Number.isFinite(n) || n < 0) throw new UsageError("--cancel-after-ms must be a number of milliseconds >= 0");
    opts.cancelAfterMs = n;
  }
  opts.base = opts.base.replace(/\/+$/, "");
  return opts;
}

class HttpError extends Error {}

// fetch, with a network failure (refused, reset, bad URL) reported as an HttpError.
async function request(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new HttpError(`${init?.method || "GET"} ${url}: ${err.cause?.message || err.message}`);
  }
}

async function errorText(resp) {
  const body = await resp.text().catch(() => "");
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error) return `${parsed.error.type}: ${parsed.error.message}`;
  } catch {}
  return body.slice(0, 300) || resp.statusText;
}

async function createThread(opts) {
  const resp = await request(`${opts.base}/api/threads/`, {
    method: "POST",
    headers: { "content-type": "application/json", ...who(opts) },
    body: JSON.stringify({ title: "sse_ttft" }),
  });
  if (resp.status !== 201) {
    throw new HttpError(`creating a thread: HTTP ${resp.status} ${await errorText(resp)}`);
  }
  return (await resp.json()).thread_id;
}

// Split an SSE byte stream into events: {event, data, id}. Comments are skipped.
async function* sseEvents(body, counter) {
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "message", data = [], id = null;
  for await (const chunk of body) {
    counter.bytes += chunk.byteLength;
    buffer += decoder.decode(chunk, { stream: true });
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) yield { event, data: data.join("\n"), id };
        event = "message"; data = []; id = null;
      } else if (line.startsWith(":")) {
        continue;
      } else {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") event = value;
        else if (name === "data") data.push(value);
        else if (name === "id") id = value;
      }
    }
  }
}

async function confirmCancelled(opts, threadId, streamId) {
  const started = performance.now();
  while (performance.now() - started < CANCEL_CONFIRM_TIMEOUT_MS) {
    const resp = await request(`${opts.base}/api/threads/${threadId}`, { method: "GET", headers: { ...who(opts) } });
    if (resp.ok) {
      const thread = await resp.json();
      const message = thread.messages.find((m) => m.message_id === streamId);
      if (message && message.status !== "streaming") {
        return message.status === "cancelled" ? performance.now() - started : null;
      }
    } else {
      await resp.body?.cancel();
    }
    await new Promise((r) => setTimeout(r, CANCEL_CONFIRM_POLL_MS));
  }
  return null;
}

async function run(opts) {
  let url, init;
  if (opts.streamUrl) {
    url = new URL(opts.streamUrl, opts.base + "/").toString();
    init = { method: "GET", headers: { accept: "text/event-stream", ...who(opts) } };
  } else {
    const thread = opts.thread || (await createThread(opts));
    opts.thread = thread;
    const body = { role: "user", content: opts.content };
    if (opts.provider) body.provider = opts.provider;
    if (opts.model) body.model = opts.model;
    url = `${opts.base}/api/threads/${thread}/messages`;
    init = {
      method: "POST",
      headers: { accept: "text/event-stream", "content-type": "application/json", ...who(opts) },
      body: JSON.stringify(body),
    };
  }
  const controller = new AbortController();
  init.signal = controller.signal;
  const result = {
    ttft_ms: null, total_ms: null, deltas: 0, bytes: 0, status: "incomplete", coalesce: null,
    http: null, stream_id: null, thread_id: opts.thread, text_chars: 0,
    cancel_ms: null, cancel_confirm_ms: null,
  };
  const round = (x) => (x === null ? null : Math.round(x * 10) / 10);
  const started = performance.now();
  let cancelTimer = null;
  let cancelled = false;
  if (opts.cancelAfterMs !== null) {
    cancelTimer = setTimeout(() => {
      cancelled = true;
      result.cancel_ms = round(performance.now() - started);
      controller.abort();
    }, opts.cancelAfterMs);
  }
  let text = "";
  try {
    const resp = await request(url, init);
    result.http = resp.status;
    if (resp.status !== 200) {
      throw new HttpError(`${init.method} ${url}: HTTP ${resp.status} ${await errorText(resp)}`);
    }
    const type = resp.headers.get("content-type") || "";
    if (!type.startsWith("text/event-stream")) {
      throw new HttpError(`${init.method} ${url}: expected text/event-stream, got ${type || "no content type"}`);
    }
    for await (const ev of sseEvents(resp.body, result)) {
      if (ev.event === "meta") {
        const meta = JSON.parse(ev.data);
        result.coalesce = meta.coalesce ?? null;
        result.stream_id = meta.stream_id ?? null;
        result.thread_id = meta.thread_id ?? result.thread_id;
      } else if (ev.event === "delta" || ev.event === "snapshot") {
        const piece = JSON.parse(ev.data).text || "";
        if (piece && result.ttft_ms === null) result.ttft_ms = round(performance.now() - started);
        if (ev.event === "delta") {
          result.deltas += 1;
          text += piece;
        } else {
          text = piece;
        }
      } else if (ev.event === "done") {
        result.status = "complete";
      } else if (ev.event === "error") {
        result.status = "error";
        result.error = JSON.parse(ev.data).error ?? null;
      }
    }
  } catch (err) {
    if (!(cancelled && err.name === "AbortError")) {
      if (err instanceof HttpError) throw err;
      throw new HttpError(`${init.method} ${url}: ${err.cause?.message || err.message}`);
    }
    result.status = "cancelled";
  } finally {
    if (cancelTimer) clearTimeout(cancelTimer);
  }
  result.total_ms = round(performance.now() - started);
  result.text_chars = text.length;
  if (result.status === "cancelled" && result.stream_id && result.thread_id) {
    result.cancel_confirm_ms = round(await confirmCancelled(opts, result.thread_id, result.stream_id));
  }
  return result;
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2), process.env);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`sse_ttft: ${err.message}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(HELP + "\n");
    return 0;
  }
  try {
    process.stdout.write(JSON.stringify(await run(opts)) + "\n");
    return 0;
  } catch (err) {
    if (!(err instanceof HttpError)) throw err;
    process.stderr.write(`sse_ttft: ${err.message}\n`);
    return 1;
  }
}

process.exitCode = await main();
