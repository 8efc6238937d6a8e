/**
 * Calls to the service (same origin, through the edge) and readable errors. Every error body the service
 * and its edge send is OpenAI JSON: {"error": {"message", "type", "param", "code"}}.
 */

/** An HTTP error answer, with the OpenAI error fields and the Retry-After seconds (or null). */
export class ApiError extends Error {
  constructor(status, error, retryAfter) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.param = error.param || null;
    this.code = error.code || null;
    this.retryAfter = retryAfter;
  }
}

/** @param {string} key the API key ("" when none) @param {object} extra more headers */
export function headers(key, extra = {}) {
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

/** The ApiError of a non-2xx response (any body: a non-JSON one still gives a readable message). */
export async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  let error;
  try {
    const parsed = JSON.parse(text);
    error = parsed && typeof parsed.error === "object" && parsed.error ? parsed.error : {};
  } catch {
    error = {};
  }
  if (typeof error.message !== "string") {
    error = { message: `HTTP ${response.status} ${response.statusText}`.trim() };
  }
  const seconds = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, error, Number.isFinite(seconds) ? seconds : null);
}

const HINTS = {
  401: "Check the API key (top right).",
  404: "The session is unknown or expired.",
  413: "The request is too large: attach fewer or smaller files.",
};

/** One readable line (or two) for an ApiError or a network failure. */
export function describe(error) {
  if (!(error instanceof ApiError)) {
    return `Network error: ${error && error.message ? error.message : String(error)}`;
  }
  const head = [String(error.status), error.type].filter(Boolean).join(" ");
  const param = error.param ? ` (${error.param})` : "";
  const lines = [`${head}: ${error.message}${param}`];
  if ((error.status === 429 || error.status === 503) && error.retryAfter !== null) {
    lines.push(`Retry after ${error.retryAfter} s.`);
  } else if (HINTS[error.status]) {
    lines.push(HINTS[error.status]);
  }
  return lines.join("\n");
}

/** GET /v1/models: the served model ids. Raises ApiError. */
export async function listModels(key) {
  const response = await fetch("/v1/models", { headers: headers(key) });
  if (!response.ok) {
    throw await errorFrom(response);
  }
  const body = await response.json();
  return (body.data || []).map((model) => String(model.id));
}

/** POST /v1/cancel/{id}: the session's status after the call. Raises ApiError. */
export async function cancelSession(key, sessionId) {
  const response = await fetch(`/v1/cancel/${encodeURIComponent(sessionId)}`, {
    method: "POST",
    headers: headers(key),
  });
  if (!response.ok) {
    throw await errorFrom(response);
  }
  return (await response.json()).status;
}
