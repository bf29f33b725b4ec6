// Audio in the browser: the server's event stream parsed, its PCM decoded and
// played back to back (Player), the level meter, and the WAV writer for
// recordings. Nothing here talks to the server.

// The text/event-stream format (WHATWG HTML, "server-sent events"): lines
// "field: value", an empty line ends an event; "data" lines are joined by
// newlines, lines starting with ":" are comments. EventSource would parse it,
// but it cannot POST.
export class EventStreamParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  // Text as it arrives (any cut) -> the events it completes.
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
export function decodePcm(base64, channels) {
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

// Pieces scheduled back to back: each starts at max(now, end of the previous
// one), so they play without gaps when they come in time. stop() stops every
// scheduled source at once.
export class Player {
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

  // One piece (a Float32Array per channel) -> {underrun, at, seconds}.
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
    return { underrun, at, seconds: buffer.duration };
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

  // The loudest sample the analyser sees now (0 when nothing plays).
  level() {
    if (!this.analyser) return 0;
    const samples = new Float32Array(this.analyser.fftSize);
    this.analyser.getFloatTimeDomainData(samples);
    return samples.reduce((peak, value) => Math.max(peak, Math.abs(value)), 0);
  }
}

// The waveform of what plays and a bar for its level (RMS, -60..0 dBFS),
// drawn on a canvas only while something plays.
export class Meter {
  constructor(canvas, player) {
    this.canvas = canvas;
    this.player = player;
    this.samples = null;
    this.running = false;
  }

  start() {
    if (this.running) return;
    this.running = true;
    requestAnimationFrame(() => this.frame());
  }

  frame() {
    const analyser = this.player.analyser;
    if (!analyser) return;
    if (!this.samples) this.samples = new Float32Array(analyser.fftSize);
    analyser.getFloatTimeDomainData(this.samples);
    this.draw(this.samples);
    if (this.player.busy) requestAnimationFrame(() => this.frame());
    else {
      this.running = false;
      this.draw(null);
    }
  }

  draw(samples) {
    const canvas = this.canvas;
    const width = Math.round(canvas.clientWidth * devicePixelRatio) || 600;
    const height = Math.round(canvas.clientHeight * devicePixelRatio) || 90;
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const g = canvas.getContext("2d");
    const style = getComputedStyle(document.body);
    const color = (name) => style.getPropertyValue(name).trim();
    g.clearRect(0, 0, width, height);
    const bar = Math.round(height * 0.12);
    const middle = (height - bar - 4) / 2;
    g.strokeStyle = color("--wave");
    g.lineWidth = Math.max(1, devicePixelRatio);
    g.beginPath();
    let sum = 0;
    const count = samples ? samples.length : 2;
    for (let i = 0; i < count; i++) {
      const value = samples ? samples[i] : 0;
      sum += value * value;
      const x = (i / (count - 1)) * width;
      if (i === 0) g.moveTo(x, middle - value * middle);
      else g.lineTo(x, middle - value * middle);
    }
    g.stroke();
    const rms = Math.sqrt(sum / count);
    const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
    const level = Math.max(0, Math.min(1, (db + 60) / 60));
    g.fillStyle = color("--track");
    g.fillRect(0, height - bar, width, bar);
    g.fillStyle = color("--level");
    g.fillRect(0, height - bar, width * level, bar);
  }
}

// A WAV file (16-bit PCM, one channel) from float samples. A few lines here
// rather than a library: the page has no build step and loads nothing else.
export function encodeWav(samples, rate) {
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

// A browser recording (webm/opus or ogg, which the server's decoder may not
// read) -> {blob: 24 kHz mono 16-bit WAV, seconds}.
export async function toWav(blob) {
  const decoder = new OfflineAudioContext(1, 1, 24000); // decodes at 24 kHz
  const audio = await decoder.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(audio.length);
  for (let ch = 0; ch < audio.numberOfChannels; ch++) {
    const data = audio.getChannelData(ch);
    for (let i = 0; i < data.length; i++) mono[i] += data[i] / audio.numberOfChannels;
  }
  return { blob: encodeWav(mono, audio.sampleRate), seconds: audio.duration };
}
