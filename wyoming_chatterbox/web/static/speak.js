// Speak, Stop and Stop all. Speak POSTs /api/speak and reads its event stream
// (start, audio per piece, done or error); each piece is played as it comes,
// right after the one before. Stop silences every scheduled piece at once and
// aborts the request: the server cancels a reply whose request is closed.
//
// `state` (window.__voxState) is what the player did, for people in the
// console and for the browser tests; body[data-phase] mirrors its phase.

import { api } from "./api.js";
import { EventStreamParser, Meter, Player, decodePcm } from "./audio.js";
import { refreshStatus } from "./model.js";
import { $, clearError, say, showError } from "./ui.js";
import { selectedVoice } from "./voices.js";

export const player = new Player();
const meter = new Meter($("meter"), player);
meter.draw(null);

export const state = {
  phase: "idle", // idle | requesting | playing | done | stopped | error
  speaks: 0, // Speak presses
  piecesReceived: 0,
  piecesStarted: 0, // scheduled pieces whose start time has passed
  groupsDone: 0,
  groups: 0,
  firstAudioMs: null, // from the press to the first sound
  // When the first piece started: had the reply's last event arrived yet?
  doneBeforeFirstAudio: null,
  groupsDoneAtFirstAudio: null,
  underruns: 0, // pieces that came after the previous one had ended
  schedule: [], // [start, end] of each piece, in the audio clock's seconds
  audioSeconds: 0,
  done: null, // the done event's data
  error: null,
};
Object.defineProperty(state, "sourcesActive", {
  enumerable: true, // pieces scheduled or playing now
  get: () => player.sources.size,
});

let current = null; // the reply being read: {controller, pressedAt, ended, format}
let ticker = 0;

export function setPhase(phase) {
  state.phase = phase;
  document.body.dataset.phase = phase;
  $("stop-button").disabled = !(phase === "requesting" || phase === "playing");
}

function resetProgress() {
  Object.assign(state, {
    piecesReceived: 0, piecesStarted: 0, groupsDone: 0, groups: 0,
    firstAudioMs: null, doneBeforeFirstAudio: null, groupsDoneAtFirstAudio: null,
    underruns: 0, schedule: [], audioSeconds: 0, done: null, error: null,
  });
  showProgress();
  say("first-audio-text", "First audio: –");
}

function showProgress() {
  const progress = $("groups-progress");
  progress.max = Math.max(1, state.groups);
  progress.value = state.groupsDone;
  say("groups-text", `Groups ${state.groupsDone} / ${state.groups}`);
}

player.onStart = () => {
  state.piecesStarted += 1;
  if (state.piecesStarted === 1 && current) {
    state.firstAudioMs = Math.round(performance.now() - current.pressedAt);
    state.doneBeforeFirstAudio = current.ended;
    state.groupsDoneAtFirstAudio = state.groupsDone;
    say("first-audio-text", `First audio: ${(state.firstAudioMs / 1000).toFixed(2)} s`);
  }
  if (state.phase === "requesting") setPhase("playing");
  meter.start();
};

player.onIdle = () => {
  if (current && current.ended) finishPlayback();
};

function finishPlayback() {
  clearInterval(ticker);
  player.tick();
  current = null;
  refreshStatus();
  if (state.phase === "requesting" || state.phase === "playing") {
    setPhase(state.done ? "done" : "error");
    if (state.done) say("speak-status", `Finished. ${describeDone(state.done)}`);
  }
}

function describeDone(done) {
  const parts = [`${done.groups} group${done.groups === 1 ? "" : "s"}`];
  if (done.audio_s != null) parts.push(`${done.audio_s.toFixed(1)} s of audio`);
  if (done.first_audio_s != null)
    parts.push(`server's first audio after ${done.first_audio_s.toFixed(2)} s`);
  if (done.total_s != null) parts.push(`made in ${done.total_s.toFixed(2)} s`);
  return parts.join(", ") + ".";
}

export async function speak() {
  const text = $("text").value;
  if (!text.trim()) {
    showError("Type some text to speak.");
    $("text").focus();
    return;
  }
  stopLocal();
  clearError();
  player.open(); // inside the click, so that the browser lets it play
  const run = (current = {
    controller: new AbortController(), pressedAt: performance.now(), ended: false,
    format: { rate: 24000, channels: 1 },
  });
  state.speaks += 1;
  resetProgress();
  setPhase("requesting");
  say("speak-status", "Asking the server…");
  ticker = setInterval(() => player.tick(), 20);
  setTimeout(refreshStatus, 300); // shows this reply in progress
  const body = { text };
  const voice = selectedVoice();
  if (voice) {
    body.voice = voice.name;
    if (voice.language) body.language = voice.language;
  }
  try {
    const response = await api("/api/speak", {
      method: "POST", json: body, signal: run.controller.signal, raw: true,
    });
    await readReply(run, response);
  } catch (error) {
    if (error.name === "AbortError" || current !== run) return; // stopped
    failReply(run, error.message);
  }
}

async function readReply(run, response) {
  const parser = new EventStreamParser();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (current !== run) return;
    const text = done ? decoder.decode() + "\n\n" : decoder.decode(value, { stream: true });
    for (const event of parser.push(text)) onEvent(run, event);
    if (done) break;
  }
  if (!run.ended) failReply(run, "The server ended the reply before it was complete.");
}

function onEvent(run, { event, data }) {
  if (current !== run || run.ended) return;
  const payload = JSON.parse(data);
  if (event === "start") {
    if (payload.format && payload.format !== "s16le")
      throw new Error(`Unsupported audio format ${payload.format}`);
    run.format = { rate: payload.sample_rate, channels: payload.channels || 1 };
    say("speak-status", "Generating…");
  } else if (event === "audio") {
    onAudio(run, payload);
  } else if (event === "done") {
    run.ended = true;
    state.done = payload;
    state.groupsDone = state.groups = payload.groups;
    showProgress();
    say("speak-status", `All audio received: ${describeDone(payload)}`);
    if (!player.busy) finishPlayback();
  } else if (event === "error") {
    const error = payload.error || {};
    failReply(run, error.message || "The server could not speak this.");
  }
}

function onAudio(run, piece) {
  const channels = decodePcm(piece.pcm, run.format.channels);
  const played = player.play(channels, run.format.rate);
  state.piecesReceived += 1;
  state.audioSeconds += played.seconds;
  state.schedule.push([played.at, played.at + played.seconds]);
  if (played.underrun) state.underruns += 1;
  if (piece.groups != null) state.groups = piece.groups;
  if (piece.groups_done != null) state.groupsDone = piece.groups_done;
  showProgress();
}

function failReply(run, message) {
  run.ended = true;
  state.error = message;
  showError(message);
  say("speak-status", "The reply failed.");
  if (!player.busy) finishPlayback();
  setPhase("error");
}

// Silence at once and drop the request: closing it is what makes the server
// cancel the reply.
function stopLocal() {
  if (current) current.controller.abort();
  current = null;
  clearInterval(ticker);
  player.stop();
}

export function stop() {
  const active = state.phase === "requesting" || state.phase === "playing";
  stopLocal();
  if (active) {
    setPhase("stopped");
    say("speak-status", "Stopped.");
  }
}

export async function stopAll() {
  stop();
  clearError();
  try {
    const result = await api("/api/stop", { method: "POST" });
    const n = result.cancelled;
    say("speak-status", `Stopped. The server cancelled ${n} repl${n === 1 ? "y" : "ies"} in progress.`);
  } catch (error) {
    showError(`Stop all failed: ${error.message}`);
  }
  refreshStatus();
}
