/**
 * The playground page: wiring of the composer, the session list and the stream of the open session.
 * The open session's id is in the page URL (`/?session=<id>`); reloading the page resumes it.
 */

import { cancelSession, describe, listModels } from "./api.js";
import { accepted, contentParts, toAttachment } from "./media.js";
import { listSessions, loadKey, loadState, saveKey, saveState } from "./store.js";
import { FINAL_STATUSES, newState, SessionStream } from "./stream.js";
import { $, hideTranscript, renderAttachments, renderError, renderSessions, renderState } from "./view.js";

const SAVE_EVERY_MS = 200;
const page = { key: "", attachments: [], current: null, saveTimer: null, frame: 0 };

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `pg-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function setUrl(id, push) {
  const url = id ? `/?session=${encodeURIComponent(id)}` : "/";
  if (push) {
    history.pushState({ session: id }, "", url);
  } else {
    history.replaceState({ session: id }, "", url);
  }
}

function refreshList() {
  renderSessions(listSessions(), page.current ? page.current.state.id : null, (id) => openSession(id, true));
}

function saveNow() {
  clearTimeout(page.saveTimer);
  page.saveTimer = null;
  if (page.current) {
    const state = page.current.state;
    saveState({ ...state, media: state.media.map(({ name, type, size, kind }) => ({ name, type, size, kind })) });
    refreshList();
  }
}

function updateButtons() {
  const stream = page.current ? page.current.stream : null;
  $("cancel").disabled = !(stream && stream.live);
}

function render() {
  page.frame = 0;
  if (page.current) {
    const state = page.current.state;
    renderState(state);
    if (state.error) {
      renderError(state.status === "error" ? state.error : `The generation failed: ${state.error}`);
    }
  }
  updateButtons();
}

function onChange(state) {
  if (!page.current || page.current.state !== state) {
    return;
  }
  if (!page.frame) {
    page.frame = requestAnimationFrame(render);
  }
  if (FINAL_STATUSES.has(state.status)) {
    saveNow();
  } else if (!page.saveTimer) {
    page.saveTimer = setTimeout(saveNow, SAVE_EVERY_MS);
  }
}

function onNotice(text, error) {
  renderError(error ? describe(error) : text);
}

function closeCurrent() {
  if (page.current && page.current.stream) {
    page.current.stream.stop();
  }
  saveNow();
  page.current = null;
}

function follow(state, request) {
  closeCurrent();
  const stream = FINAL_STATUSES.has(state.status)
    ? null
    : new SessionStream(state, { key: page.key, request, onChange, onNotice });
  page.current = { state, stream };
  saveNow();
  render();
  if (stream) {
    stream.run().finally(() => {
      if (page.current && page.current.stream === stream) {
        saveNow();
        render();
      }
    });
  }
}

function openSession(id, push) {
  if (page.current && page.current.state.id === id) {
    return;
  }
  renderError(null);
  setUrl(id, push);
  const saved = loadState(id);
  const prompt = "(opened by its id: the prompt is not stored in this browser)";
  const state = saved || newState(id, { title: id, prompt, media: [], params: {} });
  if (saved && !FINAL_STATUSES.has(saved.status)) {
    state.status = "reconnecting";
  }
  follow(state, null);
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function samplingParams() {
  const params = {
    max_tokens: numberField("max-tokens"),
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    seed: numberField("seed"),
  };
  return Object.fromEntries(Object.entries(params).filter(([, value]) => value !== undefined));
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && page.attachments.length === 0) {
    renderError("Write a prompt or attach a file.");
    return;
  }
  renderError(null);
  const id = newSessionId();
  const params = samplingParams();
  const model = $("model").value;
  const content = page.attachments.length ? contentParts(text, page.attachments) : text;
  const request = {
    ...(model ? { model } : {}),
    messages: [{ role: "user", content }],
    stream: true,
    stream_options: { include_usage: true },
    session_id: id,
    ...params,
  };
  const names = page.attachments.map((item) => item.name).join(", ");
  const media = page.attachments.map((item) => ({ ...item }));
  const state = newState(id, { title: (text || names).slice(0, 80), prompt: text, media, params });
  setUrl(id, true);
  follow(state, request);
}

async function cancel() {
  if (!page.current) {
    return;
  }
  $("cancel").disabled = true;
  try {
    await cancelSession(page.key, page.current.state.id); // the stream then ends with "cancelled"
  } catch (error) {
    renderError(describe(error));
    updateButtons();
  }
}

async function addFiles(files) {
  for (const file of files) {
    if (!accepted(file)) {
      renderError(`${file.name}: not an image or a video, not attached.`);
      continue;
    }
    page.attachments.push(await toAttachment(file));
  }
  renderAttachments(page.attachments, removeAttachment);
}

function removeAttachment(at) {
  page.attachments.splice(at, 1);
  renderAttachments(page.attachments, removeAttachment);
}

async function loadModels() {
  const select = $("model");
  try {
    const models = await listModels(page.key);
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    $("key-state").textContent = page.key ? "key set for this tab" : "";
  } catch (error) {
    $("key-state").textContent = error.status === 401 ? "a valid key is needed" : "models unavailable";
  }
}

function useKey(event) {
  event.preventDefault();
  page.key = $("api-key").value.trim();
  saveKey(page.key);
  loadModels();
}

function startNew() {
  closeCurrent();
  setUrl(null, true);
  hideTranscript();
  renderError(null);
  refreshList();
  $("prompt").focus();
}

function fromUrl(push) {
  const id = new URLSearchParams(location.search).get("session");
  if (id) {
    openSession(id, push);
  } else {
    closeCurrent();
    hideTranscript();
    refreshList();
  }
}

function wireDrop() {
  const zone = $("composer");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("drop-zone").classList.add("over");
  });
  zone.addEventListener("dragleave", () => $("drop-zone").classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    $("drop-zone").classList.remove("over");
    addFiles(Array.from(event.dataTransfer.files));
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
}

function main() {
  page.key = loadKey();
  $("api-key").value = page.key;
  $("key-form").addEventListener("submit", useKey);
  $("composer").addEventListener("submit", send);
  $("cancel").addEventListener("click", cancel);
  $("new-session").addEventListener("click", startNew);
  $("file-input").addEventListener("change", (event) => {
    addFiles(Array.from(event.target.files));
    event.target.value = "";
  });
  wireDrop();
  window.addEventListener("popstate", () => fromUrl(false));
  window.addEventListener("pagehide", saveNow);
  loadModels();
  fromUrl(false);
}

main();
