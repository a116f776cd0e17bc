// The JSON API under /v1: requests with the bearer token when one is kept, a prompt for the
// token on a 401 (asked once, then kept in localStorage), and server-sent events read from a
// fetch body (EventSource cannot send an Authorization header).

const TOKEN_KEY = 'lrtune.token';

/** An error answer of the API: `{"error": {"code", "message", "field"?}}`. */
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

function storedToken() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function keepToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage can be disabled: the token then lasts as long as the page.
  }
  sessionToken = token;
}

let sessionToken = storedToken();
let pendingPrompt = null;

/** Asks for the API token in a dialog; one dialog at a time, shared by all waiting requests. */
function askForToken(refused) {
  if (pendingPrompt) return pendingPrompt;
  pendingPrompt = new Promise((resolve, reject) => {
    const dialog = document.createElement('dialog');
    dialog.className = 'token-dialog';
    dialog.innerHTML = `
      <form method="dialog">
        <h2>API token</h2>
        <p>This server needs a token (<code>--api-token</code>). It is kept in this browser.</p>
        <p class="error-box" hidden></p>
        <label>Token <input name="token" type="password" autocomplete="current-password" required></label>
        <div class="dialog-buttons">
          <button value="cancel" formnovalidate class="secondary">Cancel</button>
          <button value="ok">Use token</button>
        </div>
      </form>`;
    if (refused) {
      const note = dialog.querySelector('.error-box');
      note.textContent = 'The server refused the token that was kept: enter it again.';
      note.hidden = false;
    }
    dialog.addEventListener('close', () => {
      const token = dialog.querySelector('input').value.trim();
      dialog.remove();
      pendingPrompt = null;
      if (dialog.returnValue === 'ok' && token) {
        keepToken(token);
        resolve(token);
      } else {
        reject(new ApiError(401, 'unauthorized', 'An API token is needed to use this server.'));
      }
    });
    document.body.append(dialog);
    dialog.showModal();
  });
  return pendingPrompt;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not the API's JSON (a proxy's page, say): fall back to the status line.
  }
  const detail = body && body.error;
  if (detail && typeof detail.message === 'string') {
    return new ApiError(response.status, detail.code, detail.message, detail.field);
  }
  return new ApiError(response.status, 'http_error', `HTTP ${response.status} ${response.statusText}`);
}

/**
 * Sends a request with the token, asking for one on a 401, and answers the parsed JSON.
 * `options.json` is sent as JSON; `options.body` as it is.
 */
async function send(method, path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    if (sessionToken) headers.set('Authorization', `Bearer ${sessionToken}`);
    let body = options.body;
    if (options.json !== undefined) {
      headers.set('Content-Type', 'application/json');
      body = JSON.stringify(options.json);
    }
    const response = await fetch(path, { method, headers, body, signal: options.signal });
    if (response.status === 401) {
      const refused = Boolean(sessionToken);
      if (refused) keepToken(null);
      await askForToken(refused);
      continue;
    }
    if (!response.ok) throw await errorFrom(response);
    if (options.raw) return response;
    return response.status === 204 ? null : response.json();
  }
}

export const api = {
  jobs: (query = '') => send('GET', `/v1/jobs${query}`),
  job: (id) => send('GET', `/v1/jobs/${encodeURIComponent(id)}`),
  curve: (id) => send('GET', `/v1/jobs/${encodeURIComponent(id)}/curve`),
  trials: (id) => send('GET', `/v1/jobs/${encodeURIComponent(id)}/trials`),
  submit: (spec) => send('POST', '/v1/jobs', { json: spec }),
  cancel: (id) => send('POST', `/v1/jobs/${encodeURIComponent(id)}/cancel`),
  datasets: () => send('GET', '/v1/datasets'),
  schedule: (schedule) => send('POST', '/v1/schedules', { json: schedule }),
  uploadCsv: (file, query) =>
    send('POST', `/v1/datasets?${new URLSearchParams({ format: 'csv', ...query })}`, {
      body: file,
      headers: { 'Content-Type': 'text/csv' },
    }),
};

/**
 * Reads a job's server-sent events, calling `onEvent(name, data)` for each, until the stream
 * ends (after the final `status`) or `signal` aborts. Resolves when the stream is over.
 */
export async function readEvents(id, onEvent, signal) {
  const response = await send('GET', `/v1/jobs/${encodeURIComponent(id)}/events`, {
    raw: true,
    signal,
    headers: { Accept: 'text/event-stream' },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let name = 'message';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer.startsWith('\r\n', newline) ? 2 : 1));
      if (line === '') {
        if (data.length > 0) {
          let parsed = null;
          try {
            parsed = JSON.parse(data.join('\n'));
          } catch {
            parsed = data.join('\n');
          }
          onEvent(name, parsed);
        }
        name = 'message';
        data = [];
      } else if (line.startsWith(':')) {
        // A keep-alive comment.
      } else {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') name = text;
        else if (field === 'data') data.push(text);
      }
    }
  }
}
