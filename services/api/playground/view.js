/**
 * Rendering. Everything that comes from the model, the user or a file (texts, file names, messages) is set
 * with textContent: it is never parsed as HTML.
 */

import { formatBytes } from "./media.js";

export const $ = (id) => document.getElementById(id);

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

const STATUS_TEXT = {
  idle: "idle",
  streaming: "streaming…",
  reconnecting: "reconnecting…",
  completed: "completed",
  cancelled: "cancelled",
  failed: "failed",
  error: "not started",
};

/** The status pill (data-state is the raw status, for styles and tests). */
export function renderStatus(status) {
  const pill = $("status");
  pill.dataset.state = status;
  pill.textContent = STATUS_TEXT[status] || status;
}

/** The error box: a message (kept as text, line breaks shown), or hidden when null. */
export function renderError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

function rate(state) {
  const tokens = state.usage ? state.usage.completion_tokens : null;
  if (tokens && state.firstTokenAt !== null && state.endedAt !== null && state.endedAt > state.firstTokenAt) {
    return `${(tokens / ((state.endedAt - state.firstTokenAt) / 1000)).toFixed(1)} tok/s`;
  }
  if (state.firstTokenAt !== null && state.endedAt === null) {
    const seconds = Math.max(0.001, (Date.now() - state.firstTokenAt) / 1000);
    return `${(state.events / seconds).toFixed(1)} events/s (tokens at the end)`;
  }
  return "—";
}

function usageText(usage) {
  if (!usage) {
    return "—";
  }
  return `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens}`;
}

function renderStats(state) {
  $("stat-session").textContent = state.id;
  $("stat-event").textContent = state.lastIndex >= 0 ? `${state.id}:${state.lastIndex}` : "—";
  const ttft = state.firstTokenAt !== null && state.sentAt !== null ? state.firstTokenAt - state.sentAt : null;
  $("stat-ttft").textContent = ttft === null ? "—" : `${ttft} ms`;
  $("stat-rate").textContent = rate(state);
  $("stat-usage").textContent = usageText(state.usage);
  $("stat-resumes").textContent = String(state.resumes);
}

function mediaItem(item) {
  const li = make("li");
  if (item.url && item.kind === "image") {
    const img = make("img");
    img.alt = "";
    img.src = item.url;
    li.append(img);
  } else if (item.url && item.kind === "video") {
    const video = make("video");
    video.muted = true;
    video.src = item.url;
    li.append(video);
  }
  li.append(make("span", "name", item.name), make("span", "muted", formatBytes(item.size)));
  return li;
}

/** The transcript of one session (texts, media names, stats); data-* attributes mirror the stream. */
export function renderState(state) {
  const transcript = $("transcript");
  transcript.hidden = false;
  Object.assign(transcript.dataset, {
    session: state.id,
    status: state.status,
    lastIndex: String(state.lastIndex),
    events: String(state.events),
    duplicates: String(state.duplicates),
    gaps: String(state.gaps),
  });
  $("user-text").textContent = state.prompt;
  $("user-media").replaceChildren(...state.media.map(mediaItem));
  $("reasoning").textContent = state.reasoning;
  $("answer").textContent = state.answer;
  renderStats(state);
  renderStatus(state.status);
}

export function hideTranscript() {
  $("transcript").hidden = true;
  renderStatus("idle");
}

/** The composer's pending attachments, each with a remove button. */
export function renderAttachments(items, onRemove) {
  $("attachments").replaceChildren(
    ...items.map((item, at) => {
      const li = mediaItem(item);
      const remove = make("button", "", "×");
      remove.type = "button";
      remove.title = "remove";
      remove.addEventListener("click", () => onRemove(at));
      li.append(remove);
      return li;
    }),
  );
}

/** The session list of this browser; the open one is marked. */
export function renderSessions(list, currentId, onOpen) {
  $("session-list").replaceChildren(
    ...list.map((entry) => {
      const button = make("button");
      button.type = "button";
      button.dataset.session = entry.id;
      button.setAttribute("aria-current", entry.id === currentId ? "true" : "false");
      const when = new Date(entry.created).toLocaleTimeString();
      button.append(make("span", "title", entry.title || entry.id), make("span", "meta", `${when} · ${entry.status}`));
      button.addEventListener("click", () => onOpen(entry.id));
      const li = make("li");
      li.append(button);
      return li;
    }),
  );
}
