// Requests to the page's own server (docs/http-api.md): the access token, if
// the server asks for one, and the server's JSON errors turned into
// ApiError(message, status).

const TOKEN_KEY = "wyoming-chatterbox-token";
let onUnauthorized = () => {};

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

// What to do when the server answers 401 (show the login form).
export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// The server's errors are JSON: {"error": {"message", "type", "code"}}.
async function errorFrom(response) {
  let message = `The server answered ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const error = body && body.error;
    if (typeof error === "string") message = error;
    else if (error && error.message) message = error.message;
  } catch (_) {
    // Not JSON (a proxy's page): keep the status line.
  }
  if (response.status === 401) onUnauthorized();
  return new ApiError(message, response.status);
}

// fetch with the token; the parsed JSON (null for 204), or the Response
// itself with `raw`. Throws ApiError, or AbortError when `signal` aborts.
export async function api(path, { method = "GET", json, body, signal, raw } = {}) {
  const headers = new Headers();
  const bearer = token.get();
  if (bearer) headers.set("Authorization", `Bearer ${bearer}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, {
      method, headers, body, signal, credentials: "same-origin", cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`The server cannot be reached (${error.message}).`, 0);
  }
  if (!response.ok) throw await errorFrom(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}
