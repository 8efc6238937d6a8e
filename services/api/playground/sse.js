/**
 * A fetch-based Server-Sent Events reader. EventSource cannot send an Authorization header, so the
 * playground reads `text/event-stream` bodies itself.
 *
 * Each dispatched event is `{id, data}`: `id` is the event's own `id:` field or null when it had none (the
 * server ends a finished session's replay with a bare `data: [DONE]`), `data` the `data:` lines joined by
 * "\n". Comment lines (`: ping`) and unknown fields are ignored.
 */

const LINE_BREAK = /\r\n|\r|\n/g;

/** Incremental parser: push decoded text in any split, get whole events. */
export class SseParser {
  /** @param {(event: {id: string|null, data: string}) => void} onEvent called once per complete event */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.resetEvent();
  }

  resetEvent() {
    this.data = [];
    this.id = null;
  }

  /** @param {string} text the next piece of the body, already decoded from UTF-8 */
  push(text) {
    this.buffer += text;
    let start = 0;
    LINE_BREAK.lastIndex = 0;
    for (let match = LINE_BREAK.exec(this.buffer); match; match = LINE_BREAK.exec(this.buffer)) {
      if (match[0] === "\r" && match.index === this.buffer.length - 1) {
        break; // maybe the first half of "\r\n": wait for the next piece
      }
      this.line(this.buffer.slice(start, match.index));
      start = LINE_BREAK.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      if (this.data.length > 0) {
        this.onEvent({ id: this.id, data: this.data.join("\n") });
      }
      this.resetEvent();
      return;
    }
    if (line.startsWith(":")) {
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) {
      value = value.slice(1);
    }
    if (field === "data") {
      this.data.push(value);
    } else if (field === "id" && !value.includes("\0")) {
      this.id = value;
    }
  }
}

/**
 * Read a response body to its end, calling `onEvent` for each event in order. An exception thrown by
 * `onEvent` stops the reading (the body is cancelled) and is rethrown.
 * @param {ReadableStream<Uint8Array>} body
 * @param {(event: {id: string|null, data: string}) => void} onEvent
 */
export async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser(onEvent);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        return;
      }
      parser.push(value);
    }
  } catch (error) {
    reader.cancel().catch(() => {});
    throw error;
  }
}
