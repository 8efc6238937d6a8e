/* global console, process, Response, setTimeout */
// Drives the playground's SessionStream (services/api/playground/stream.js) in Node with a stubbed fetch:
// a resume refused for good (404 expired, 401) must end in a final "error" state, never "reconnecting".
// Prints one JSON line per case; run by tests/browser/test_stream_refusal.py.
import { pathToFileURL } from "node:url";

const [, , playground] = process.argv;
const { SessionStream, newState, FINAL_STATUSES } = await import(
  pathToFileURL(`${playground}/stream.js`).href
);

globalThis.navigator = { onLine: true };
globalThis.window = { addEventListener() {} };

function answer(status, body) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

async function follow(status, message) {
  let calls = 0;
  globalThis.fetch = async () => {
    calls += 1;
    return answer(status, { error: { message, type: "x", param: null, code: null } });
  };
  const state = newState("pg-1", { title: "t", prompt: "p", media: [], params: {} });
  state.status = "reconnecting"; // a saved, unfinished session reopened after a reload
  state.lastIndex = 4;
  const seen = [];
  const stream = new SessionStream(state, {
    key: "k",
    request: null,
    onChange: (s) => seen.push(s.status),
    onNotice: () => {},
  });
  const done = stream.run();
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error("still running")), 5000));
  await Promise.race([done, timeout]);
  return { status, final: state.status, isFinal: FINAL_STATUSES.has(state.status), error: state.error, calls, seen };
}

for (const [status, message] of [
  [404, "session pg-1 not found"],
  [401, "invalid API key"],
]) {
  console.log(JSON.stringify(await follow(status, message)));
}
process.exit(0);
