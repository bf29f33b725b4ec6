// Add a voice: upload a clip, or record one with the microphone (where the
// browser allows it: localhost or HTTPS) and send it as 16-bit WAV, which
// the server reads whatever the browser recorded in.

import { api } from "./api.js";
import { toWav } from "./audio.js";
import { $, clearError, say, showError } from "./ui.js";
import { canUpload, loadVoices } from "./voices.js";

let recording = null; // {blob, seconds}: the last recording, as WAV
const recorder = { media: null, timer: 0, startedAt: 0 };

function stem(fileName) {
  return fileName.replace(/\.[^.]*$/, "");
}

export async function upload(event) {
  event.preventDefault();
  clearError();
  const file = $("voice-file").files[0];
  const clip = file || (recording && recording.blob);
  if (!clip) {
    showError("Choose a clip, or record one, to upload.");
    return;
  }
  const name = $("voice-name").value.trim() || (file ? stem(file.name) : "");
  if (!name) {
    showError("Give the new voice a name.");
    $("voice-name").focus();
    return;
  }
  const form = new FormData();
  form.append("name", name);
  form.append("file", clip, file ? file.name : `${name}.wav`);
  $("upload-fields").disabled = true;
  say("voices-status", "Uploading…");
  try {
    const result = await api("/api/voices", { method: "POST", body: form });
    say("voices-status", `Added the voice ${result.voice.name}.`);
    $("upload-form").reset();
    forgetRecording();
    await loadVoices(result.voice.name);
  } catch (error) {
    say("voices-status", "");
    showError(`The voice could not be added: ${error.message}`);
  } finally {
    $("upload-fields").disabled = !canUpload;
  }
}

export function recordingAllowed() {
  return Boolean(
    window.isSecureContext && navigator.mediaDevices &&
    navigator.mediaDevices.getUserMedia && window.MediaRecorder
  );
}

export async function toggleRecording() {
  if (recorder.media) {
    recorder.media.stop();
    return;
  }
  clearError();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    showError(`The microphone is not available: ${error.message}`);
    return;
  }
  const media = new MediaRecorder(stream);
  const chunks = [];
  media.ondataavailable = (event) => chunks.push(event.data);
  media.onstop = () => {
    stream.getTracks().forEach((track) => track.stop());
    clearInterval(recorder.timer);
    recorder.media = null;
    setRecordButton(false);
    finishRecording(new Blob(chunks, { type: media.mimeType }));
  };
  recorder.media = media;
  recorder.startedAt = performance.now();
  media.start(250);
  setRecordButton(true);
  recorder.timer = setInterval(() => {
    const seconds = (performance.now() - recorder.startedAt) / 1000;
    say("record-status", `Recording… ${seconds.toFixed(0)} s`);
  }, 250);
}

function setRecordButton(on) {
  const button = $("record-button");
  button.textContent = on ? "Stop recording" : "Record clip";
  button.setAttribute("aria-pressed", String(on));
}

async function finishRecording(blob) {
  try {
    recording = await toWav(blob);
  } catch (error) {
    showError(`The recording could not be read: ${error.message}`);
    return;
  }
  $("voice-file").value = "";
  const player = $("record-player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(recording.blob);
  player.hidden = false;
  say("record-status", `Recorded ${recording.seconds.toFixed(1)} s; "Upload voice" sends it.`);
}

export function forgetRecording() {
  recording = null;
  const player = $("record-player");
  if (player.src) URL.revokeObjectURL(player.src);
  player.removeAttribute("src");
  player.hidden = true;
  say("record-status", "");
}
