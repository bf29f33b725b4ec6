// The web page: speak text as the server streams it, manage voices, look after
// the model. Plain JavaScript, no build step and no external resources; it
// talks only to its own server's HTTP API (docs/http-api.md).
//
// One reply: Speak POSTs /api/speak and reads the text/event-stream itself
// (EventSource cannot POST); each audio piece becomes an AudioBuffer scheduled
// right after the previous one, so playback starts with the first piece and
// runs without gaps while later groups are made. Stop stops every scheduled
// source and aborts the request, which makes the server cancel the reply.
//
// window.__voxState holds what the page did (for people in the console and
// for the browser tests); body[data-phase] mirrors its phase.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "wyoming-chatterbox-token";
  const STATUS_EVERY_MS = 3000;

  // ---------------------------------------------------------------- state
  const state = (window.__voxState = {
    phase: "idle", // idle | requesting | playing | done | stopped | error
    speaks: 0, // Speak presses
    piecesReceived: 0,
    piecesStarted: 0, // scheduled sources whose start time has passed
    groupsDone: 0,
    groups: 0,
    firstAudioMs: null, // from the press to the first sound
    // When the first source started: had the reply's last event arrived yet?
    doneBeforeFirstAudio: null,
    groupsDoneAtFirstAudio: null,
    underruns: 0, // pieces that came after the previous one had ended
    audioSeconds: 0,
    done: null, // the done event's data
    error: null,
  });

  function setPhase(phase) {
    state.phase = phase;
    document.body.dataset.phase = phase;
    const active = phase === "requesting" || phase === "playing";
    $("stop-button").disabled = !active;
  }

  function say(id, text) {
    $(id).textContent = text;
  }

  function showError(message) {
    state.error = message;
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  // ------------------------------------------------------------------ API
  class ApiError extends Error {
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
    if (response.status === 401) showLogin();
    return new ApiError(message, response.status);
  }

  async function api(path, { method = "GET", json, body, signal, raw } = {}) {
    const headers = new Headers();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", `Bearer ${token}`);
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

  // -------------------------------------------------- server-sent events
  // The text/event-stream format (WHATWG HTML, "server-sent events"): lines
  // "field: value", an empty line ends an event; "data" lines are joined by
  // newlines, lines starting with ":" are comments.
  class EventStreamParser {
    constructor() {
      this.buffer = "";
      this.event = "";
      this.data = [];
    }

    push(text) {
      this.buffer += text;
      const events = [];
      for (;;) {
        const end = /\r\n|\r|\n/.exec(this.buffer);
        if (!end) break;
        // A lone CR at the end may be the first half of CRLF: wait for more.
        if (end[0] === "\r" && end.index === this.buffer.length - 1) break;
        const line = this.buffer.slice(0, end.index);
        this.buffer = this.buffer.slice(end.index + end[0].length);
        const event = this.line(line);
        if (event) events.push(event);
      }
      return events;
    }

    line(line) {
      if (line === "") {
        const event = this.data.length
          ? { event: this.event || "message", data: this.data.join("\n") }
          : null;
        this.event = "";
        this.data = [];
        return event;
      }
      if (line.startsWith(":")) return null;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
      return null;
    }
  }

  // base64 16-bit little-endian PCM, channels interleaved -> one Float32Array
  // per channel.
  function decodePcm(base64, channels) {
    const bytes = atob(base64);
    const frames = Math.floor(bytes.length / (2 * channels));
    const out = Array.from({ length: channels }, () => new Float32Array(frames));
    for (let frame = 0, at = 0; frame < frames; frame++) {
      for (let ch = 0; ch < channels; ch++, at += 2) {
        let value = bytes.charCodeAt(at) | (bytes.charCodeAt(at + 1) << 8);
        if (value >= 0x8000) value -= 0x10000;
        out[ch][frame] = value / 32768;
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- audio
  // Pieces are scheduled back to back: each starts at max(now, end of the
  // previous one). Stop stops every scheduled source at once.
  class Player {
    constructor() {
      this.ctx = null;
      this.analyser = null;
      this.sources = new Set();
      this.starts = []; // start times not yet reached, in context seconds
      this.nextTime = 0;
      this.onStart = null; // called as each piece's start time passes
      this.onIdle = null; // called when the last scheduled source has ended
    }

    // Call from a click: browsers let an AudioContext play only after a gesture.
    open() {
      if (!this.ctx) {
        try {
          // The server's rate: no resampling on the way.
          this.ctx = new AudioContext({ sampleRate: 24000 });
        } catch (_) {
          this.ctx = new AudioContext(); // the browser resamples each buffer
        }
        this.analyser = this.ctx.createAnalyser();
        this.analyser.fftSize = 2048;
        this.analyser.connect(this.ctx.destination);
      }
      if (this.ctx.state === "suspended") this.ctx.resume();
      return this.ctx;
    }

    play(channels, rate) {
      const ctx = this.ctx;
      const buffer = ctx.createBuffer(channels.length, channels[0].length, rate);
      channels.forEach((data, ch) => buffer.copyToChannel(data, ch));
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.analyser);
      const now = ctx.currentTime;
      const underrun = this.nextTime > 0 && this.nextTime < now;
      const at = Math.max(now, this.nextTime);
      source.start(at);
      this.nextTime = at + buffer.duration;
      this.sources.add(source);
      this.starts.push(at);
      source.onended = () => {
        source.disconnect();
        this.sources.delete(source);
        if (this.sources.size === 0 && this.onIdle) this.onIdle();
      };
      return { underrun, seconds: buffer.duration, waitMs: (at - now) * 1000 };
    }

    // Report the pieces whose start time has passed; called on a timer.
    tick() {
      if (!this.ctx) return;
      const now = this.ctx.currentTime;
      while (this.starts.length && this.starts[0] <= now) {
        this.starts.shift();
        if (this.onStart) this.onStart();
      }
    }

    stop() {
      for (const source of this.sources) {
        source.onended = null;
        try {
          source.stop();
        } catch (_) {
          // Already ended.
        }
        source.disconnect();
      }
      this.sources.clear();
      this.starts = [];
      this.nextTime = 0;
    }

    get busy() {
      return this.sources.size > 0;
    }
  }

  const player = new Player();

  // The level meter: the waveform of what plays and a bar for its level, drawn
  // only while something plays.
  const meter = {
    samples: null,
    running: false,

    start() {
      if (this.running) return;
      this.running = true;
      requestAnimationFrame(() => this.frame());
    },

    frame() {
      const analyser = player.analyser;
      if (!analyser) return;
      if (!this.samples) this.samples = new Float32Array(analyser.fftSize);
      analyser.getFloatTimeDomainData(this.samples);
      this.draw(this.samples);
      if (player.busy) requestAnimationFrame(() => this.frame());
      else {
        this.running = false;
        this.draw(null);
      }
    },

    draw(samples) {
      const canvas = $("meter");
      const width = Math.round(canvas.clientWidth * devicePixelRatio) || 600;
      const height = Math.round(canvas.clientHeight * devicePixelRatio) || 90;
      if (canvas.width !== width) canvas.width = width;
      if (canvas.height !== height) canvas.height = height;
      const g = canvas.getContext("2d");
      const style = getComputedStyle(document.body);
      g.clearRect(0, 0, width, height);
      const bar = Math.round(height * 0.12);
      const wave = height - bar - 4;
      g.strokeStyle = style.getPropertyValue("--wave").trim() || "#3b82f6";
      g.lineWidth = Math.max(1, devicePixelRatio);
      g.beginPath();
      let sum = 0;
      const count = samples ? samples.length : 2;
      for (let i = 0; i < count; i++) {
        const value = samples ? samples[i] : 0;
        sum += value * value;
        const x = (i / (count - 1)) * width;
        const y = wave / 2 - value * (wave / 2);
        if (i === 0) g.moveTo(x, y);
        else g.lineTo(x, y);
      }
      g.stroke();
      // Level: RMS in dBFS over -60..0.
      const rms = Math.sqrt(sum / count);
      const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
      const level = Math.max(0, Math.min(1, (db + 60) / 60));
      g.fillStyle = style.getPropertyValue("--track").trim() || "#ddd";
      g.fillRect(0, height - bar, width, bar);
      g.fillStyle = style.getPropertyValue("--level").trim() || "#22c55e";
      g.fillRect(0, height - bar, width * level, bar);
    },
  };

  // ---------------------------------------------------------------- speak
  let current = null; // the reply being read: {controller, pressedAt, ended}
  let ticker = 0;

  function resetProgress() {
    Object.assign(state, {
      piecesReceived: 0, piecesStarted: 0, groupsDone: 0, groups: 0,
      firstAudioMs: null, doneBeforeFirstAudio: null, groupsDoneAtFirstAudio: null,
      underruns: 0, audioSeconds: 0, done: null, error: null,
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

  function selectedVoice() {
    const option = $("voice").selectedOptions[0];
    if (!option) return null;
    return { name: option.value, language: option.dataset.language || null };
  }

  async function speak() {
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
    });
    state.speaks += 1;
    resetProgress();
    setPhase("requesting");
    say("speak-status", "Asking the server…");
    clearInterval(ticker);
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
    run.format = { rate: 24000, channels: 1 };
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
      say("speak-status", `All audio received: ${describeDone(payload)}`);
      if (!player.busy) finishPlayback();
    } else if (event === "error") {
      const message = (payload.error && payload.error.message) || "The server could not speak this.";
      failReply(run, message);
    }
  }

  function onAudio(run, piece) {
    const channels = decodePcm(piece.pcm, run.format.channels);
    const played = player.play(channels, run.format.rate);
    state.piecesReceived += 1;
    state.audioSeconds += played.seconds;
    if (played.underrun) state.underruns += 1;
    if (piece.groups != null) state.groups = piece.groups;
    if (piece.groups_done != null) state.groupsDone = piece.groups_done;
    showProgress();
  }

  function failReply(run, message) {
    run.ended = true;
    showError(message);
    say("speak-status", "The reply failed.");
    if (!player.busy) finishPlayback();
    setPhase("error");
  }

  // Stops what plays at once and drops the request: closing it is what makes
  // the server cancel the reply.
  function stopLocal() {
    if (current) current.controller.abort();
    current = null;
    clearInterval(ticker);
    player.stop();
  }

  function stop() {
    const active = state.phase === "requesting" || state.phase === "playing";
    stopLocal();
    if (active) {
      setPhase("stopped");
      say("speak-status", "Stopped.");
    }
  }

  async function stopAll() {
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

  // --------------------------------------------------------------- voices
  let voices = [];
  let canUpload = false;

  const languageNames = (() => {
    try {
      const names = new Intl.DisplayNames([navigator.language, "en"], { type: "language" });
      return (code) => {
        try {
          return `${names.of(code)} (${code})`;
        } catch (_) {
          return code;
        }
      };
    } catch (_) {
      return (code) => code;
    }
  })();

  function voiceOption(voice, language) {
    const option = document.createElement("option");
    option.value = voice.name;
    let label = voice.name;
    if (voice.builtin) label += " (built-in)";
    if (voice.description) label += ` – ${voice.description}`;
    option.textContent = label;
    if (language) option.dataset.language = language;
    return option;
  }

  // Grouped by language (an optgroup each) when the voices speak several; a
  // voice with several languages is offered in each of them.
  function renderVoices(wanted) {
    const select = $("voice");
    const previous = wanted || select.value || localStorage.getItem("voice");
    const languages = new Set(voices.flatMap((voice) => voice.languages || []));
    select.replaceChildren();
    if (languages.size > 1) {
      const groups = new Map();
      for (const voice of voices) {
        for (const code of voice.languages && voice.languages.length ? voice.languages : [""]) {
          if (!groups.has(code)) groups.set(code, []);
          groups.get(code).push(voice);
        }
      }
      const labelled = [...groups.keys()].map((code) => [code ? languageNames(code) : "Other", code]);
      labelled.sort((a, b) => a[0].localeCompare(b[0]));
      for (const [label, code] of labelled) {
        const group = document.createElement("optgroup");
        group.label = label;
        for (const voice of groups.get(code)) group.append(voiceOption(voice, code || null));
        select.append(group);
      }
    } else {
      for (const voice of voices) select.append(voiceOption(voice, null));
    }
    const options = [...select.options];
    const match =
      options.find((option) => option.value === previous) ||
      options.find((option) => previous && option.value.startsWith(`${previous}@`));
    if (match) match.selected = true;
    updateVoiceButtons();
  }

  async function loadVoices(wanted) {
    try {
      const result = await api("/api/voices");
      voices = result.voices || [];
      canUpload = Boolean(result.can_upload);
      renderVoices(wanted);
      $("upload-button").disabled = !canUpload;
      $("upload-button").title = canUpload ? "" : "The server has no writable voices folder (--voices-dir).";
    } catch (error) {
      if (error.status !== 401) showError(`The voice list could not be read: ${error.message}`);
    }
  }

  function currentVoice() {
    const selected = selectedVoice();
    return selected ? voices.find((voice) => voice.name === selected.name) : null;
  }

  function updateVoiceButtons() {
    const voice = currentVoice();
    $("sample-button").disabled = !(voice && voice.clip);
    $("delete-button").disabled = !(voice && !voice.builtin && canUpload);
    let info = "";
    if (voice) {
      info = `${voice.name}: ${voice.builtin ? "the model's built-in voice" : "cloned from a clip"}.`;
      if (voice.languages && voice.languages.length) info += ` Languages: ${voice.languages.join(", ")}.`;
      localStorage.setItem("voice", voice.name);
    }
    say("voice-info", info);
  }

  async function playSample() {
    const voice = currentVoice();
    if (!voice) return;
    clearError();
    try {
      const response = await api(`/api/voices/${encodeURIComponent(voice.name)}/clip`, { raw: true });
      const audio = $("sample-player");
      if (audio.src) URL.revokeObjectURL(audio.src);
      audio.src = URL.createObjectURL(await response.blob());
      audio.hidden = false;
      await audio.play();
    } catch (error) {
      showError(`The sample could not be played: ${error.message}`);
    }
  }

  async function deleteVoice() {
    const voice = currentVoice();
    if (!voice) return;
    const ok = confirm(
      `Delete the voice "${voice.name}"? Its clip is removed from the server's voices folder.`
    );
    if (!ok) return;
    clearError();
    try {
      await api(`/api/voices/${encodeURIComponent(voice.name)}`, { method: "DELETE" });
      say("voices-status", `Deleted the voice ${voice.name}.`);
      localStorage.removeItem("voice");
      await loadVoices();
    } catch (error) {
      showError(`The voice could not be deleted: ${error.message}`);
    }
  }

  // ------------------------------------------------------- upload, record
  let recording = null; // {blob, seconds}: the last recording, as WAV

  function stem(fileName) {
    return fileName.replace(/\.[^.]*$/, "");
  }

  async function upload(event) {
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
    $("upload-button").disabled = true;
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
      $("upload-button").disabled = !canUpload;
    }
  }

  // A WAV file (16-bit PCM, one channel) from float samples. A few lines here
  // rather than a library: the page has no build step and loads nothing else.
  function encodeWav(samples, rate) {
    const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
    const text = (at, s) => [...s].forEach((c, i) => view.setUint8(at + i, c.charCodeAt(0)));
    text(0, "RIFF");
    view.setUint32(4, 36 + samples.length * 2, true);
    text(8, "WAVEfmt ");
    view.setUint32(16, 16, true); // fmt chunk size
    view.setUint16(20, 1, true); // PCM
    view.setUint16(22, 1, true); // channels
    view.setUint32(24, rate, true);
    view.setUint32(28, rate * 2, true); // bytes per second
    view.setUint16(32, 2, true); // bytes per frame
    view.setUint16(34, 16, true); // bits per sample
    text(36, "data");
    view.setUint32(40, samples.length * 2, true);
    samples.forEach((value, i) => {
      const s = Math.max(-1, Math.min(1, value));
      view.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
    });
    return new Blob([view.buffer], { type: "audio/wav" });
  }

  // The browser's recording (webm/opus or ogg, which the server's decoder may
  // not read) -> 24 kHz mono 16-bit WAV.
  async function toWav(blob) {
    const decoder = new OfflineAudioContext(1, 1, 24000); // decodes at 24 kHz
    const audio = await decoder.decodeAudioData(await blob.arrayBuffer());
    const mono = new Float32Array(audio.length);
    for (let ch = 0; ch < audio.numberOfChannels; ch++) {
      const data = audio.getChannelData(ch);
      for (let i = 0; i < data.length; i++) mono[i] += data[i] / audio.numberOfChannels;
    }
    return { blob: encodeWav(mono, audio.sampleRate), seconds: audio.duration };
  }

  const recorder = { media: null, timer: 0, startedAt: 0 };

  function recordingAllowed() {
    return Boolean(
      window.isSecureContext && navigator.mediaDevices &&
      navigator.mediaDevices.getUserMedia && window.MediaRecorder
    );
  }

  async function toggleRecording() {
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

  function forgetRecording() {
    recording = null;
    const player = $("record-player");
    if (player.src) URL.revokeObjectURL(player.src);
    player.removeAttribute("src");
    player.hidden = true;
    say("record-status", "");
  }

  // ---------------------------------------------------------------- model
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
    say(
      "status-models",
      models.map((m) => `${m.name}: ${m.loaded ? "loaded" : "unloaded (idle)"}`).join(", ") || "–"
    );
    say("status-memory", formatBytes(status.gpu_memory_bytes));
    say("status-replies", String(status.replies_in_progress ?? "–"));
    say("status-queue", String(status.queue_depth ?? "–"));
    say("status-version", status.version || "–");
    const replying = (status.replies_in_progress || 0) > 0;
    const loaded = models.some((m) => m.loaded);
    const why = replying ? "Wait until no reply is in progress." : "";
    $("unload-button").disabled = modelBusy || replying || !loaded;
    $("load-button").disabled = modelBusy || replying || (models.length > 0 && models.every((m) => m.loaded));
    $("unload-button").title = why;
    $("load-button").title = why;
    if (status.token_required && !sessionStorage.getItem(TOKEN_KEY)) showLogin();
  }

  async function refreshStatus() {
    try {
      lastStatus = await api("/api/status");
      renderStatus(lastStatus);
    } catch (error) {
      if (error.status !== 401) say("status-device", `unknown (${error.message})`);
    }
  }

  async function modelAction(action) {
    clearError();
    modelBusy = true;
    if (lastStatus) renderStatus(lastStatus);
    say("model-status", action === "load" ? "Loading the model…" : "Unloading the model…");
    try {
      const result = await api(`/api/model/${action}`, { method: "POST" });
      say("model-status", result.loaded ? "The model is loaded." : "The model is unloaded; the next reply loads it again.");
    } catch (error) {
      say("model-status", "");
      showError(`Could not ${action} the model: ${error.message}`);
    } finally {
      modelBusy = false;
      await refreshStatus();
    }
  }

  // ---------------------------------------------------------------- login
  function showLogin() {
    $("login").hidden = false;
    $("app").inert = true;
    $("token").focus();
  }

  async function login(event) {
    event.preventDefault();
    const token = $("token").value;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      await api("/api/login", { method: "POST", json: { token } });
    } catch (error) {
      // A server without /api/login takes the header alone.
      if (error.status !== 404) {
        sessionStorage.removeItem(TOKEN_KEY);
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

  // ---------------------------------------------------------------- start
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
  }

  function boot() {
    wire();
    setPhase("idle");
    meter.draw(null);
    loadVoices();
    refreshStatus();
    setInterval(() => {
      if (!document.hidden) refreshStatus();
    }, STATUS_EVERY_MS);
  }

  // For tests and the console: the parts that need no server.
  window.__vox = { EventStreamParser, decodePcm, encodeWav, toWav };

  boot();
})();
