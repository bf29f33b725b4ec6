// The model's status (GET /api/status, polled) and the Unload model / Load
// model buttons, which wait while replies run; the login form when the
// server wants a token.

import { api, token } from "./api.js";
import { $, clearError, say, showError } from "./ui.js";
import { loadVoices } from "./voices.js";

let lastStatus = null;
let modelBusy = false; // a load or unload request is running

function formatBytes(bytes) {
  if (bytes == null) return "– (no GPU)";
  if (bytes < 1024 ** 3) return `${(bytes / 1024 ** 2).toFixed(0)} MiB`;
  return `${(bytes / 1024 ** 3).toFixed(2)} GiB`;
}

function renderStatus(status) {
  const models = status.models || [];
  say("status-device", status.device || "–");
  const states = models.map((m) => `${m.name}: ${m.loaded ? "loaded" : "unloaded (idle)"}`);
  say("status-models", states.join(", ") || "–");
  say("status-memory", formatBytes(status.gpu_memory_bytes));
  say("status-replies", String(status.replies_in_progress ?? "–"));
  say("status-queue", String(status.queue_depth ?? "–"));
  say("status-version", status.version || "–");
  const replying = (status.replies_in_progress || 0) > 0;
  const allLoaded = models.length > 0 && models.every((m) => m.loaded);
  const why = replying ? "Wait until no reply is in progress." : "";
  $("unload-button").disabled = modelBusy || replying || !models.some((m) => m.loaded);
  $("load-button").disabled = modelBusy || replying || allLoaded;
  $("unload-button").title = why;
  $("load-button").title = why;
  if (status.token_required && !token.get()) showLogin();
}

export async function refreshStatus() {
  try {
    lastStatus = await api("/api/status");
    renderStatus(lastStatus);
  } catch (error) {
    if (error.status !== 401) say("status-device", `unknown (${error.message})`);
  }
}

// action: "load" or "unload".
export async function modelAction(action) {
  clearError();
  modelBusy = true;
  if (lastStatus) renderStatus(lastStatus);
  say("model-status", action === "load" ? "Loading the model…" : "Unloading the model…");
  try {
    const result = await api(`/api/model/${action}`, { method: "POST" });
    say("model-status", result.loaded
      ? "The model is loaded."
      : "The model is unloaded; the next reply loads it again.");
  } catch (error) {
    say("model-status", "");
    showError(`Could not ${action} the model: ${error.message}`);
  } finally {
    modelBusy = false;
    await refreshStatus();
  }
}

export function showLogin() {
  $("login").hidden = false;
  $("app").inert = true;
  $("token").focus();
}

// The token goes with every request (Authorization: Bearer) for this tab;
// /api/login also sets the server's cookie where it has one.
export async function login(event) {
  event.preventDefault();
  const value = $("token").value;
  token.set(value);
  try {
    await api("/api/login", { method: "POST", json: { token: value } });
  } catch (error) {
    if (error.status !== 404) {
      token.clear();
      showError(`Login failed: ${error.message}`);
      return;
    }
  }
  $("token").value = "";
  $("login").hidden = true;
  $("app").inert = false;
  clearError();
  await Promise.all([loadVoices(), refreshStatus()]);
}
