// The web page's entry: wires the controls to their parts and starts. Plain
// JavaScript modules, no build step, nothing loaded from elsewhere; the page
// talks only to its own server's HTTP API (docs/http-api.md).
//   speak.js   Speak / Stop / Stop all, the player's state (window.__voxState)
//   audio.js   event-stream parser, PCM player, level meter, WAV writer
//   voices.js  the voice list, Play sample, Delete voice
//   upload.js  Upload voice, Record clip
//   model.js   status, Unload model / Load model, the login form
//   api.js     requests, the token, the server's JSON errors

import { whenUnauthorized } from "./api.js";
import { EventStreamParser, decodePcm, encodeWav, toWav } from "./audio.js";
import { login, modelAction, refreshStatus, showLogin } from "./model.js";
import { player, setPhase, speak, state, stop, stopAll } from "./speak.js";
import { $, say } from "./ui.js";
import { forgetRecording, recordingAllowed, toggleRecording, upload } from "./upload.js";
import { deleteVoice, loadVoices, playSample, updateVoiceButtons } from "./voices.js";

const STATUS_EVERY_MS = 3000;

function wire() {
  $("speak-button").addEventListener("click", speak);
  $("stop-button").addEventListener("click", stop);
  $("stop-all-button").addEventListener("click", stopAll);
  $("voice").addEventListener("change", updateVoiceButtons);
  $("sample-button").addEventListener("click", playSample);
  $("delete-button").addEventListener("click", deleteVoice);
  $("upload-form").addEventListener("submit", upload);
  $("voice-file").addEventListener("change", () => {
    if ($("voice-file").files.length) forgetRecording();
  });
  $("unload-button").addEventListener("click", () => modelAction("unload"));
  $("load-button").addEventListener("click", () => modelAction("load"));
  $("login-form").addEventListener("submit", login);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      speak();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("stop-button").disabled) stop();
  });
  const record = $("record-button");
  if (recordingAllowed()) record.addEventListener("click", toggleRecording);
  else {
    record.disabled = true;
    say("record-status", "Recording needs this page over HTTPS or on localhost (the browser allows the microphone only there); upload a clip instead.");
  }
  window.addEventListener("focus", () => loadVoices());
  whenUnauthorized(showLogin);
}

// For the console and the tests: the player's state and the parts that need
// no server.
window.__voxState = state;
window.__vox = { EventStreamParser, decodePcm, encodeWav, toWav, level: () => player.level() };

wire();
setPhase("idle");
loadVoices();
refreshStatus();
setInterval(() => {
  if (!document.hidden) refreshStatus();
}, STATUS_EVERY_MS);
