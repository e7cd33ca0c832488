// The DAC gateway page: threads, a composer, and answers streamed over SSE.
//
// Sending uses API.md's mode 3: POST the message with `stream: true` and
// `Accept: application/json`, get `202 {stream_id, stream_url, ...}` at once,
// then follow the answer with an EventSource. Text from the server (user or
// model) only ever reaches the page through textContent and DOM nodes.

const $ = (id) => document.getElementById(id);
const ui = {
  org: $('org'),
  orgLabel: document.querySelector('label[for="org"]'),
  keyForm: $('key-form'),
  keyInput: $('key-input'),
  toggle: $('threads-toggle'),
  sidebar: $('sidebar'),
  newThread: $('new-thread'),
  threadList: $('thread-list'),
  title: $('thread-title'),
  messages: $('messages'),
  notice: $('notice'),
  form: $('composer'),
  input: $('composer-input'),
  provider: $('provider'),
  model: $('model'),
  send: $('send'),
  stop: $('stop'),
};

const RETRY_MAX = 6;
const SYNC_AFTER_STOP_MS = 700;
const BADGES = { follower: 'joined in progress', cache: 'from cache' };
const STATES = { cancelled: 'stopped', error: 'failed', interrupted: 'interrupted' };

const saved = {
  get(key, fallback) {
    try { return localStorage.getItem(key) || fallback; } catch { return fallback; }
  },
  set(key, value) {
    try { localStorage.setItem(key, value); } catch { /* private mode: keep it for this visit */ }
  },
};

/** The API key lives in this tab's sessionStorage only: it leaves with the tab. */
const session = {
  get(key) {
    try { return sessionStorage.getItem(key) || null; } catch { return null; }
  },
  set(key, value) {
    try {
      if (value) sessionStorage.setItem(key, value);
      else sessionStorage.removeItem(key);
    } catch { /* storage refused: the key lasts until the page is left */ }
  },
};

/** A key handed over in the address (`/#key=...`, as `make run` prints it) is taken once,
 * then removed from the address so it stays out of the history and of shared links. */
function takeKeyFromAddress() {
  const match = /^#(?:.*&)?key=([^&]+)/.exec(location.hash);
  if (!match) return;
  session.set('dac.key', decodeURIComponent(match[1]));
  const rest = location.hash.slice(1).split('&').filter((part) => !part.startsWith('key=')).join('&');
  history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
}
takeKeyFromAddress();

const state = {
  org: saved.get('dac.org', 'org_demo'),
  key: session.get('dac.key'),
  threadId: null,
  sending: false,
};
/** stream_id -> Stream, for every answer this page is following. */
const live = new Map();

class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

/** Who is asking: the API key when there is one (it decides the org), else the org's name. */
function credentials(org = state.org) {
  return state.key ? { Authorization: `Bearer ${state.key}` } : { 'x-org-id': org };
}

async function api(method, path, body, org = state.org) {
  const headers = { ...credentials(org), Accept: 'application/json' };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const err = data && data.error ? data.error : {};
    if (res.status === 401) askForKey(state.key ? 'The API key was refused.' : 'This gateway needs an API key.');
    throw new ApiError(res.status, err.type || 'http_error', err.message || `The server answered ${res.status}.`);
  }
  return data;
}

/** Show the key form; a refused key is forgotten. */
function askForKey(why) {
  if (state.key) {
    state.key = null;
    session.set('dac.key', null);
  }
  ui.keyForm.hidden = false;
  showOrg();
  notify(`${why} Enter one (python -m server keys create --org ORG prints one).`, true);
  ui.keyInput.focus();
}

function useKey(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  session.set('dac.key', key);
  location.reload(); // start over as the key's org: its threads, its streams
}

/** With a key the org is the key's: the org field is only for gateways that trust x-org-id. */
function showOrg() {
  ui.org.hidden = Boolean(state.key);
  if (ui.orgLabel) ui.orgLabel.hidden = Boolean(state.key);
}

function notify(text, isError = false) {
  ui.notice.textContent = text;
  ui.notice.classList.toggle('error', isError);
}

// ---------------------------------------------------------------- rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

/** A paragraph line with `inline code` spans, built from text nodes only. */
function appendInline(parent, line) {
  line.split('`').forEach((part, i) => {
    if (!part) return;
    parent.append(i % 2 ? el('code', '', part) : document.createTextNode(part));
  });
}

/**
 * Render `text` into `body` as paragraphs, line breaks, `inline code` and
 * ``` fenced blocks. Only DOM APIs and text nodes are used, never innerHTML,
 * so a `<script>` in the text shows as those characters. User and assistant
 * messages both go through this one function.
 */
function renderText(body, text) {
  const frag = document.createDocumentFragment();
  let para = [];
  let code = null;
  const flushPara = () => {
    if (!para.length) return;
    const p = el('p');
    para.forEach((line, i) => {
      if (i) p.append(el('br'));
      appendInline(p, line);
    });
    frag.append(p);
    para = [];
  };
  const flushCode = () => {
    const pre = el('pre');
    pre.append(el('code', '', code.join('\n')));
    frag.append(pre);
    code = null;
  };
  for (const line of text.split('\n')) {
    if (line.startsWith('```')) {
      if (code === null) {
        flushPara();
        code = [];
      } else {
        flushCode();
      }
    } else if (code !== null) {
      code.push(line);
    } else if (line.trim() === '') {
      flushPara();
    } else {
      para.push(line);
    }
  }
  if (code !== null) flushCode(); // a block still being written
  flushPara();
  body.replaceChildren(frag);
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function messageView(message) {
  const view = el('article', `msg ${message.role}`);
  view.dataset.id = message.message_id;
  const meta = el('p', 'msg-meta');
  const badge = el('span', 'badge');
  badge.hidden = true;
  meta.append(
    el('span', 'who', message.role === 'user' ? 'You' : 'Answer'),
    el('span', 'model', message.role === 'assistant' ? `${message.provider} · ${message.model}` : ''),
    badge,
    el('span', 'state'),
  );
  view.append(meta, el('div', 'msg-body'));
  renderText(view.querySelector('.msg-body'), message.content || '');
  const extra = message.meta || {};
  renderExtras(view, extra.reasoning || '', extra.tool_calls || [], extra.refusal || '');
  setStatus(view, message.status);
  return view;
}

/** A collapsed block before the answer's text, made on first use. */
function block(view, className, title) {
  let details = view.querySelector(`details.${className}`);
  if (!details) {
    details = el('details', `msg-extra ${className}`);
    details.append(el('summary', '', title), el('div', 'msg-extra-body'));
    view.querySelector('.msg-body').before(details);
  }
  return details;
}

/** The model's reasoning and its tool calls (whole: `{id, function: {name, arguments}}`)
 * as collapsed blocks, and a refusal as text; all as text nodes, never HTML. */
function renderExtras(view, reasoning, toolCalls, refusal) {
  if (reasoning) {
    const details = block(view, 'msg-reasoning', 'Reasoning');
    details.querySelector('.msg-extra-body').textContent = reasoning;
  }
  if (toolCalls.length) {
    const details = block(view, 'msg-tools', '');
    details.querySelector('summary').textContent =
      toolCalls.length === 1 ? 'Tool call' : `Tool calls (${toolCalls.length})`;
    const body = details.querySelector('.msg-extra-body');
    body.replaceChildren(...toolCalls.map((call) => {
      const fn = call.function || {};
      const row = el('pre', 'tool-call');
      row.append(el('code', '', `${fn.name || '?'}(${fn.arguments || ''})`));
      return row;
    }));
  }
  let p = view.querySelector('.msg-refusal');
  if (refusal) {
    if (!p) {
      p = el('p', 'msg-refusal');
      view.querySelector('.msg-body').after(p);
    }
    p.textContent = refusal;
  }
}

/** Whole tool calls from their streamed pieces: by index, id and name from the first
 * piece, arguments appended. */
function assembleToolCalls(pieces) {
  const calls = new Map();
  for (const piece of pieces) {
    const fn = piece.function || {};
    const call = calls.get(piece.index);
    if (!call) {
      calls.set(piece.index, { id: piece.id, function: { name: fn.name || '', arguments: fn.arguments || '' } });
    } else {
      call.function.arguments += fn.arguments || '';
    }
  }
  return [...calls.keys()].sort((a, b) => a - b).map((i) => calls.get(i));
}

function setStatus(view, status) {
  view.dataset.status = status;
  view.setAttribute('aria-busy', String(status === 'streaming'));
  view.querySelector('.state').textContent = STATES[status] || '';
}

function setBadge(view, coalesce) {
  const badge = view.querySelector('.badge');
  const text = BADGES[coalesce];
  if (!text) return;
  badge.textContent = text;
  badge.hidden = false;
}

function showError(view, text) {
  let p = view.querySelector('.msg-error');
  if (!p) {
    p = el('p', 'msg-error');
    view.append(p);
  }
  p.textContent = text;
}

/** The element for `message` in the open thread, added at the end if missing. */
function ensureMessage(message) {
  const found = ui.messages.querySelector(`article[data-id="${CSS.escape(message.message_id)}"]`);
  if (found) return found;
  ui.messages.querySelector('.empty')?.remove();
  const stick = nearBottom();
  const view = live.get(message.message_id)?.view || messageView(message);
  ui.messages.append(view);
  if (stick) scrollToEnd();
  return view;
}

// ---------------------------------------------------------------- streams

/**
 * One answer followed over SSE. Deltas carry ids 1, 2, 3...; a delta whose id
 * is not past the last one applied is dropped, so a resumed or replayed
 * stream never shows a word twice.
 */
class Stream {
  constructor({ view, id, url, threadId, org }) {
    this.view = view;
    this.body = view.querySelector('.msg-body');
    this.id = id;
    this.url = url;
    this.threadId = threadId;
    this.org = org;
    this.seq = 0;
    this.text = '';
    this.reasoning = '';
    this.refusal = '';
    this.toolPieces = [];
    this.es = null;
    this.retries = 0;
    this.timer = 0;
    this.frame = 0;
    this.closed = false;
    live.set(id, this);
  }

  open() {
    // EventSource sends no custom headers: the stream_url's signed token stands for the
    // caller, and the resume point goes in the query.
    const params = [];
    if (!/[?&](org|token)=/.test(this.url)) params.push(`org=${encodeURIComponent(this.org)}`);
    if (this.seq > 0) params.push(`last_event_id=${this.seq}`);
    const sep = this.url.includes('?') ? '&' : '?';
    const url = params.length ? `${this.url}${sep}${params.join('&')}` : this.url;
    const es = new EventSource(url);
    this.es = es;
    const on = (name, fn) => es.addEventListener(name, (event) => {
      if (this.es === es) fn(event);
    });
    on('meta', (e) => this.onMeta(JSON.parse(e.data)));
    on('delta', (e) => this.onText(Number(e.lastEventId), JSON.parse(e.data), false));
    on('snapshot', (e) => this.onText(Number(e.lastEventId), JSON.parse(e.data), true));
    on('done', (e) => this.finish(JSON.parse(e.data).message));
    // The server's `error` event carries data; the browser's own `error`
    // (connection lost or refused) is a plain Event.
    on('error', (e) => {
      if (e instanceof MessageEvent && e.data) {
        const err = JSON.parse(e.data).error || {};
        this.fail(err.message || 'The provider failed.', err.retryable);
      } else {
        this.onConnectionError();
      }
    });
  }

  onMeta(meta) {
    // This connection's own Stop call: DELETE it to abort at once, with no grace.
    if (meta.stop_url) this.stopUrl = meta.stop_url;
    if (meta.provider && meta.model) {
      this.view.querySelector('.model').textContent = `${meta.provider} · ${meta.model}`;
    }
  }

  /** A delta (pieces to append) or a snapshot (everything so far): the answer text,
   * and beside it, when present, reasoning, refusal and tool-call pieces. */
  onText(seq, data, replace) {
    if (!(seq > this.seq) && !(replace && seq === this.seq)) return;
    this.seq = seq;
    const text = data.text || '';
    this.text = replace ? text : this.text + text;
    if (replace) {
      this.reasoning = data.reasoning || '';
      this.refusal = data.refusal || '';
      this.toolPieces = [...(data.tool_calls || [])];
    } else {
      this.reasoning += data.reasoning || '';
      this.refusal += data.refusal || '';
      this.toolPieces.push(...(data.tool_calls || []));
    }
    this.retries = 0;
    this.view.querySelector('.state').textContent = '';
    this.paint();
  }

  /** Render at most once a frame; at once when the tab is hidden (no frames then). */
  paint() {
    if (document.visibilityState === 'hidden') {
      this.render();
    } else if (!this.frame) {
      this.frame = requestAnimationFrame(() => this.render());
    }
  }

  render() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    const stick = this.view.isConnected && nearBottom();
    renderText(this.body, this.text);
    renderExtras(this.view, this.reasoning, assembleToolCalls(this.toolPieces), this.refusal);
    if (stick) scrollToEnd();
  }

  onConnectionError() {
    this.view.querySelector('.state').textContent = 'reconnecting…';
    // CONNECTING: the browser retries by itself and sends Last-Event-ID.
    // CLOSED: it gave up (the server answered with an error status).
    if (this.es.readyState === EventSource.CLOSED) this.recover();
  }

  /** Reopen after `last_event_id`, or show how the answer ended if it is over. */
  recover() {
    this.es?.close();
    this.es = null;
    if (this.retries >= RETRY_MAX) {
      this.fail('Lost the connection to this answer. Open the thread again to see how it ended.');
      return;
    }
    const delay = Math.min(8000, 500 * 2 ** this.retries++);
    this.timer = setTimeout(async () => {
      this.timer = 0;
      if (this.closed) return;
      let message;
      try {
        message = await findMessage(this.org, this.threadId, this.id);
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) {
          this.fail('This thread no longer exists.');
        } else {
          this.recover();
        }
        return;
      }
      if (this.closed) return;
      if (!message) this.fail('This answer is no longer available.');
      else if (message.status !== 'streaming') this.finish(message);
      else this.open();
    }, delay);
  }

  close(status) {
    this.closed = true;
    this.es?.close();
    this.es = null;
    clearTimeout(this.timer);
    live.delete(this.id);
    setStatus(this.view, status);
    updateControls();
  }

  finish(message) {
    this.text = message.content || '';
    const extra = message.meta || {};
    this.reasoning = extra.reasoning || this.reasoning;
    this.refusal = extra.refusal || this.refusal;
    this.toolPieces = (extra.tool_calls || []).map((call, index) => ({ index, ...call }));
    this.render();
    this.close(message.status);
    if (message.status === 'error') showError(this.view, 'The provider failed before finishing this answer.');
  }

  fail(text, retryable = false) {
    this.render();
    this.close('error');
    const hint = retryable ? ' Sending the message again may work.' : '';
    showError(this.view, text + hint);
    notify(`Error: ${text}`, true);
  }

  /** Stop button: say so (DELETE the stop_url: the upstream is aborted at once when
   * nobody else listens), then leave the stream. */
  stop() {
    const stopUrl = this.stopUrl || this.url;
    if (/[?&]token=/.test(stopUrl)) {
      fetch(stopUrl, { method: 'DELETE', headers: credentials(this.org) }).catch(() => {});
    }
    this.render();
    this.close('cancelled');
    // Show what was saved: a few words may have arrived upstream meanwhile.
    setTimeout(async () => {
      const message = await findMessage(this.org, this.threadId, this.id).catch(() => null);
      if (message && message.status !== 'streaming' && this.view.isConnected) {
        renderText(this.body, message.content || '');
        setStatus(this.view, message.status);
      }
    }, SYNC_AFTER_STOP_MS);
  }
}

async function findMessage(org, threadId, messageId) {
  const thread = await api('GET', `/api/threads/${encodeURIComponent(threadId)}`, undefined, org);
  return thread.messages.find((m) => m.message_id === messageId) || null;
}

function follow(view, { id, url, threadId, coalesce }) {
  setBadge(view, coalesce);
  const stream = live.get(id) || new Stream({ view, id, url, threadId, org: state.org });
  if (!stream.es && !stream.timer) stream.open();
  updateControls();
  return stream;
}

function streamsHere() {
  return [...live.values()].filter((s) => s.threadId === state.threadId);
}

function updateControls() {
  const streaming = streamsHere().length > 0;
  ui.send.disabled = state.sending || streaming;
  ui.stop.disabled = !streaming;
}

// ---------------------------------------------------------------- threads

function threadLink(thread) {
  const a = el('a', '', thread.title || 'Untitled thread');
  a.href = `#thread=${encodeURIComponent(thread.thread_id)}`;
  a.dataset.id = thread.thread_id;
  if (thread.thread_id === state.threadId) a.setAttribute('aria-current', 'page');
  const li = el('li');
  li.append(a);
  return li;
}

async function loadThreads() {
  try {
    const { threads } = await api('GET', '/api/threads/');
    ui.threadList.replaceChildren(...threads.map(threadLink));
  } catch (err) {
    notify(`Could not load threads: ${err.message}`, true);
  }
}

function markCurrent() {
  for (const a of ui.threadList.querySelectorAll('a')) {
    if (a.dataset.id === state.threadId) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function showEmpty(title) {
  ui.title.textContent = title;
  const p = el('p', 'empty', 'Ask something to start a thread. Answers stream in as they are written; the same question asked at the same time is answered once for everyone.');
  ui.messages.replaceChildren(p);
}

function newThread() {
  state.threadId = null;
  if (location.hash) history.pushState(null, '', location.pathname + location.search);
  showEmpty('New thread');
  markCurrent();
  updateControls();
  closeDrawer();
  ui.input.focus();
}

async function openThread(threadId) {
  state.threadId = threadId;
  markCurrent();
  updateControls();
  let thread;
  try {
    thread = await api('GET', `/api/threads/${encodeURIComponent(threadId)}`);
  } catch (err) {
    if (state.threadId !== threadId) return;
    showEmpty('New thread');
    state.threadId = null;
    notify(err.status === 404 ? `No such thread in org ${state.org}.` : `Could not open the thread: ${err.message}`, true);
    updateControls();
    return;
  }
  if (state.threadId !== threadId) return; // another thread was chosen meanwhile
  ui.title.textContent = thread.title || 'Untitled thread';
  if (!thread.messages.length) {
    showEmpty(ui.title.textContent);
  } else {
    ui.messages.replaceChildren(...thread.messages.map((m) => live.get(m.message_id)?.view || messageView(m)));
    // An answer still being written (in another tab, say): follow it too.
    for (const m of thread.messages) {
      if (m.role === 'assistant' && m.status === 'streaming' && !live.has(m.message_id)) {
        const view = ui.messages.querySelector(`article[data-id="${CSS.escape(m.message_id)}"]`);
        const url = m.stream_url || `/api/streams/${encodeURIComponent(m.message_id)}`;
        follow(view, { id: m.message_id, url, threadId, coalesce: 'follower' });
      }
    }
    scrollToEnd();
  }
  updateControls();
}

function routeFromHash() {
  const match = /^#thread=(.+)$/.exec(location.hash);
  if (match) openThread(decodeURIComponent(match[1]));
  else if (state.threadId) newThread();
}

// ---------------------------------------------------------------- sending

async function send(event) {
  event.preventDefault();
  const content = ui.input.value.trim();
  if (!content || state.sending || streamsHere().length) return;
  const provider = ui.provider.value.trim();
  const model = ui.model.value.trim();
  saved.set('dac.provider', provider);
  saved.set('dac.model', model);
  state.sending = true;
  updateControls();
  notify('');
  try {
    if (!state.threadId) {
      const thread = await api('POST', '/api/threads/', { title: content.slice(0, 80) });
      state.threadId = thread.thread_id;
      history.pushState(null, '', `#thread=${encodeURIComponent(thread.thread_id)}`);
      ui.title.textContent = thread.title || 'Untitled thread';
      ui.threadList.prepend(threadLink(thread));
      markCurrent();
    }
    const threadId = state.threadId;
    const body = { content, stream: true };
    if (provider) body.provider = provider;
    if (model) body.model = model;
    const res = await api('POST', `/api/threads/${encodeURIComponent(threadId)}/messages`, body);
    ui.input.value = '';
    if (state.threadId !== threadId) return; // the user moved on; the answer is in its thread
    ensureMessage(res.user_message);
    const view = ensureMessage({
      message_id: res.stream_id, role: 'assistant', content: '', status: 'streaming',
      provider: provider || '…', model: model || '…',
    });
    follow(view, { id: res.stream_id, url: res.stream_url, threadId, coalesce: res.coalesce });
  } catch (err) {
    notify(`Error: ${err.message}`, true);
  } finally {
    state.sending = false;
    updateControls();
  }
}

function stopAll() {
  for (const stream of streamsHere()) stream.stop();
  ui.input.focus();
}

// ---------------------------------------------------------------- wiring

function closeDrawer() {
  ui.sidebar.classList.remove('open');
  ui.toggle.setAttribute('aria-expanded', 'false');
}

function setOrg() {
  const org = ui.org.value.trim();
  if (!org) {
    ui.org.value = state.org;
    return;
  }
  if (org === state.org) return;
  // Another org is another tenant: leave its streams and threads behind.
  for (const stream of live.values()) stream.close('cancelled');
  state.org = org;
  saved.set('dac.org', org);
  newThread();
  loadThreads();
}

ui.org.value = state.org;
showOrg();
ui.provider.value = saved.get('dac.provider', 'mock');
ui.model.value = saved.get('dac.model', 'mock');

ui.form.addEventListener('submit', send);
ui.stop.addEventListener('click', stopAll);
ui.newThread.addEventListener('click', newThread);
ui.org.addEventListener('change', setOrg);
ui.keyForm.addEventListener('submit', useKey);
ui.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.form.requestSubmit();
  }
});
document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape') return;
  if (ui.sidebar.classList.contains('open')) {
    closeDrawer();
    ui.toggle.focus();
  } else if (!ui.stop.disabled) {
    stopAll();
  }
});
ui.toggle.addEventListener('click', () => {
  const open = ui.sidebar.classList.toggle('open');
  ui.toggle.setAttribute('aria-expanded', String(open));
  if (open) ui.newThread.focus();
});
ui.threadList.addEventListener('click', (e) => {
  if (e.target.closest('a') && ui.sidebar.classList.contains('open')) {
    closeDrawer();
    ui.title.focus();
  }
});
ui.title.tabIndex = -1;
// Links, typed URLs and Back/Forward all change the hash; pushState does not fire this.
window.addEventListener('hashchange', routeFromHash);

loadThreads();
routeFromHash();
