/**
 * Following one session's stream, with resume.
 *
 * A new session starts with POST /v1/chat/completions (the page chooses the `session_id`); every later
 * connection, after a network loss or a page reload, is GET /v1/sessions/{id}/events with
 * `Last-Event-ID: <id>:<last index>`, so the server sends exactly the events after the last one applied.
 * Event ids are `<session_id>:<index>` with consecutive indexes: an index already applied is counted as a
 * duplicate and skipped, a jump is counted as a gap and the page reconnects from its last index. The state
 * (texts + last index) changes only between events, so a saved copy always resumes without gap or repeat.
 */

import { describe, errorFrom, headers } from "./api.js";
import { readEvents } from "./sse.js";

const DONE = "[DONE]";
export const FINAL_STATUSES = new Set(["completed", "cancelled", "failed", "error"]);

class GapError extends Error {}

/** A fresh state for a session: what the page renders and saves. */
export function newState(id, { title, prompt, media, params }) {
  return {
    id,
    title,
    prompt,
    media,
    params,
    created: Date.now(),
    status: "streaming",
    reasoning: "",
    answer: "",
    lastIndex: -1,
    finishReason: null,
    usage: null,
    error: null,
    sentAt: null,
    firstTokenAt: null,
    endedAt: null,
    events: 0,
    duplicates: 0,
    gaps: 0,
    resumes: 0,
  };
}

/** The index of an event id `<session>:<index>` (or a bare `<index>`), or null. */
export function eventIndex(id) {
  if (id === null) {
    return null;
  }
  const match = /^(?:[A-Za-z0-9_-]{1,128}:)?(\d{1,15})$/.exec(id);
  return match ? Number(match[1]) : null;
}

/** Apply one chunk (already parsed JSON) to the state. */
function applyChunk(state, chunk) {
  if (chunk && chunk.error) {
    state.error = String(chunk.error.message || "the generation failed");
    return;
  }
  const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
  if (choice) {
    const delta = choice.delta || {};
    const reasoning = typeof delta.reasoning_content === "string" ? delta.reasoning_content : "";
    const content = typeof delta.content === "string" ? delta.content : "";
    if ((reasoning || content) && state.firstTokenAt === null && state.sentAt !== null) {
      state.firstTokenAt = Date.now();
    }
    state.reasoning += reasoning;
    state.answer += content;
    if (choice.finish_reason) {
      state.finishReason = choice.finish_reason;
    }
  }
  if (chunk && chunk.usage) {
    state.usage = chunk.usage;
  }
}

function finish(state) {
  if (state.error) {
    state.status = "failed";
  } else {
    state.status = state.finishReason === "cancelled" ? "cancelled" : "completed";
  }
  if (state.endedAt === null && state.sentAt !== null) {
    state.endedAt = Date.now();
  }
}

/** Follows a session until its `[DONE]`, reconnecting as needed; see the module comment. */
export class SessionStream {
  /**
   * @param {object} state the session's state (newState), changed in place
   * @param {{key: string, request: object|null, onChange: (state: object) => void,
   *          onNotice: (text: string|null, error: object|null) => void}} options `request` is the POST
   *   body of a session this page starts (null to follow an existing one)
   */
  constructor(state, { key, request, onChange, onNotice }) {
    this.state = state;
    this.key = key;
    this.request = request;
    this.posted = request === null;
    this.onChange = onChange;
    this.onNotice = onNotice;
    this.stopped = false;
    this.controller = null;
    this.wake = null;
    this.retryAfter = null;
  }

  get live() {
    return !this.stopped && !FINAL_STATUSES.has(this.state.status);
  }

  /** Connect and follow; resolves when the stream is done, refused or stopped. */
  async run() {
    let failures = 0;
    while (this.live) {
      const outcome = await this.connectOnce();
      if (outcome === "stop" || !this.live) {
        return;
      }
      failures = outcome === "progress" ? 0 : failures + 1;
      this.state.status = "reconnecting";
      this.state.resumes += 1;
      this.onChange(this.state);
      await this.pause(this.delay(failures));
      await this.online();
    }
  }

  /** Stop following (the generation goes on server-side unless cancelled). */
  stop() {
    this.stopped = true;
    if (this.controller) {
      this.controller.abort();
    }
    if (this.wake) {
      this.wake();
    }
  }

  delay(failures) {
    const retryAfter = this.retryAfter;
    this.retryAfter = null;
    return retryAfter !== null ? retryAfter * 1000 : Math.min(5000, 250 * 2 ** failures);
  }

  pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  online() {
    if (navigator.onLine || this.stopped) {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      window.addEventListener("online", resolve, { once: true });
      this.wake = resolve;
    });
  }

  open(signal) {
    const state = this.state;
    const extra = state.lastIndex >= 0 ? { "Last-Event-ID": `${state.id}:${state.lastIndex}` } : {};
    if (!this.posted) {
      // Re-sending the POST with the same session_id never starts a second generation: it attaches.
      return fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(this.key, { "Content-Type": "application/json", Accept: "text/event-stream", ...extra }),
        body: JSON.stringify(this.request),
        signal,
      });
    }
    const url = `/v1/sessions/${encodeURIComponent(state.id)}/events`;
    return fetch(url, { headers: headers(this.key, { Accept: "text/event-stream", ...extra }), signal });
  }

  /** One connection: "progress" (events came), "retry" (none came), or "stop" (refused or stopped). */
  async connectOnce() {
    this.controller = new AbortController();
    const before = this.state.lastIndex;
    let response;
    try {
      if (this.state.sentAt === null && !this.posted) {
        this.state.sentAt = Date.now();
      }
      response = await this.open(this.controller.signal);
    } catch {
      return this.stopped ? "stop" : "retry";
    }
    if (!response.ok) {
      return this.refused(await errorFrom(response));
    }
    this.posted = true;
    this.state.status = "streaming";
    this.onNotice(null, null);
    this.onChange(this.state);
    try {
      await readEvents(response.body, (event) => this.handle(event));
    } catch (error) {
      if (this.stopped) {
        return "stop";
      }
      if (!(error instanceof GapError)) {
        this.onNotice("Connection lost: resuming after the last event…", null);
      }
    }
    return this.state.lastIndex > before ? "progress" : "retry";
  }

  refused(error) {
    const transient = error.status === 429 || error.status === 502 || error.status === 503;
    if (this.posted && transient) {
      this.retryAfter = error.retryAfter;
      this.onNotice(null, error);
      return "retry";
    }
    // Not retryable: the session never started, or can no longer be followed (expired or unknown: 404;
    // a key refused: 401). A final status, so the page and the saved session list stop "reconnecting".
    this.state.status = "error";
    this.state.error = describe(error);
    if (this.state.endedAt === null && this.state.sentAt !== null) {
      this.state.endedAt = Date.now();
    }
    this.onNotice(null, error);
    this.onChange(this.state);
    return "stop";
  }

  handle(event) {
    if (this.stopped) {
      throw new Error("stopped");
    }
    const state = this.state;
    const index = eventIndex(event.id);
    if (index === null) {
      if (event.data === DONE) {
        finish(state); // the bare end of an already finished session
        this.onChange(state);
      }
      return;
    }
    if (index <= state.lastIndex) {
      state.duplicates += 1;
      return;
    }
    if (index > state.lastIndex + 1) {
      state.gaps += 1;
      throw new GapError(`event ${index} after ${state.lastIndex}`);
    }
    this.apply(index, event.data);
  }

  apply(index, data) {
    const state = this.state;
    state.lastIndex = index;
    state.events += 1;
    if (data === DONE) {
      finish(state);
    } else {
      try {
        applyChunk(state, JSON.parse(data));
      } catch {
        state.error = "the service sent an event that is not JSON";
      }
    }
    this.onChange(state);
  }
}
