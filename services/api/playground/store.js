/**
 * What the page keeps in the browser: the API key in sessionStorage only (this tab, gone when it closes),
 * and the streams of this browser in localStorage (the list, and each session's rendered state with the
 * index of its last event, so that a reload resumes right after it). Media bytes are never stored.
 */

const KEY_NAME = "playground.apiKey";
const LIST_NAME = "playground.sessions";
const STATE_PREFIX = "playground.session.";
const MAX_SESSIONS = 30;

export function loadKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function saveKey(key) {
  if (key) {
    sessionStorage.setItem(KEY_NAME, key);
  } else {
    sessionStorage.removeItem(KEY_NAME);
  }
}

function readJson(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(name) || "null");
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

/** The session list, newest first: [{id, title, created, status}]. */
export function listSessions() {
  const list = readJson(LIST_NAME, []);
  return Array.isArray(list) ? list.filter((entry) => entry && typeof entry.id === "string") : [];
}

/** A session's saved state, or null. */
export function loadState(id) {
  const state = readJson(STATE_PREFIX + id, null);
  return state && state.id === id ? state : null;
}

/** Save a session's state and its list entry (moved to the top when new); old sessions are forgotten. */
export function saveState(state) {
  const entry = { id: state.id, title: state.title, created: state.created, status: state.status };
  const list = listSessions();
  const at = list.findIndex((item) => item.id === state.id);
  if (at === -1) {
    list.unshift(entry);
  } else {
    list[at] = entry;
  }
  for (const old of list.splice(MAX_SESSIONS)) {
    localStorage.removeItem(STATE_PREFIX + old.id);
  }
  try {
    localStorage.setItem(STATE_PREFIX + state.id, JSON.stringify(state));
    localStorage.setItem(LIST_NAME, JSON.stringify(list));
  } catch {
    // Quota exceeded: the stream goes on; only a reload would replay it from the start.
  }
}
