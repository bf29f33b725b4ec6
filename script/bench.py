"""Latency and throughput of the server as Home Assistant meets it.

A script, not a test: it measures and reports, and asserts nothing about speed.
Every figure comes from a real Wyoming client over a real socket, timed the way
Home Assistant waits (see docs/benchmarks.md for the definitions):

- (a) a one-shot `synthesize` of a short reply (< 60 characters: HA sends those
  one-shot and plays nothing until audio-stop);
- (b) a one-sentence reply (> 60 characters) streamed: synthesize-start, a few
  synthesize-chunk, HA's compatibility `synthesize`, synthesize-stop;
- (c) a five-sentence reply streamed as small LLM-like fragments, with the
  longest silence a listener would hear;
- a concurrency sweep: N clients at once, each running (c) (or (b)).

Modes: `--checkpoint DIR` (the real Turbo backend in this process), `--fake` (a
stand-in backend whose audio is as long as real speech: the server's own
overhead), `--uri tcp://HOST:PORT` (a server already running elsewhere).
In this process the backend's `synthesize` is wrapped to timestamp its calls, so
the server's overhead can be told apart from the model's time.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runnable as `python script/bench.py` from anywhere: the package is the repo's.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from wyoming.audio import AudioChunk, AudioStop  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import async_read_event, async_write_event  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from wyoming_chatterbox import fastpath  # noqa: E402
from wyoming_chatterbox.engine import (  # noqa: E402
    ModelLoadError,
    Piece,
    SamplingParams,
    SpeechBackend,
    SynthesisCancelled,
    VoiceInfo,
)

_LOGGER = logging.getLogger("bench")

# How long real speech is: Chatterbox makes 25 speech tokens a second, and
# English is spoken at about 14-15 characters a second (~150 words a minute).
TOKENS_PER_SECOND = 25
CHARS_PER_SECOND = 14.5
TOKEN_RULE = (
    f"n = round(characters * {TOKENS_PER_SECOND} / {CHARS_PER_SECOND}) speech "
    f"tokens ({TOKENS_PER_SECOND} tokens a second of speech, {CHARS_PER_SECOND} "
    "characters of English a second), at least 1, at most 1000"
)
SAMPLE_RATE = 24000
# A silence shorter than this is jitter, not something a listener hears.
AUDIBLE_GAP_S = 0.010

# Replies like a voice assistant's. (a): under 60 characters, so HA sends them
# one-shot. (b): one sentence over 60. (c): five sentences, as an LLM writes.
SHORT_REPLIES = [
    "Turning on the kitchen lights now.",
    "The front door is locked.",
    "Your timer is set for ten minutes.",
    "It is twenty one degrees in the living room.",
    "Playing some jazz in the bedroom.",
]
SENTENCE_REPLIES = [
    "The weather today is mostly sunny with a high of twenty four degrees and "
    "a light breeze from the west.",
    "I have turned off all the lights downstairs and locked the back door for "
    "the night.",
    "Your next appointment is a dentist visit on Thursday at half past nine in "
    "the morning.",
]
LONG_REPLIES = [
    "Good morning! It is a bright day outside, with clear skies until the late "
    "afternoon. The temperature should reach about twenty two degrees by noon. "
    "There is a small chance of rain this evening, so take an umbrella if you go "
    "out. Your first meeting starts at ten, and traffic on the way looks light.",
    "I found three recipes that use the chicken and peppers you have. The "
    "quickest one is a stir fry that takes about twenty minutes. You would also "
    "need some rice, soy sauce and a little garlic. The oven is free if you would "
    "rather roast everything together. Shall I read out the first recipe step by "
    "step?",
    "The washing machine finished its cycle a few minutes ago. The dryer is "
    "still running and should be done in half an hour. Energy use today is a bit "
    "lower than yesterday, mostly thanks to the sunshine. The solar panels have "
    "made eleven kilowatt hours so far. The battery is at eighty percent and "
    "still charging.",
]
# Targets the fast path was planned against: (key, label, limit, unit, where).
# "any": the server's own overhead, on any machine; "gpu": an H100 figure.
TARGETS = [
    ("overhead_first_audio_a", "server overhead on first audio, (a) p50", 0.020,
     "s", "any"),
    ("overhead_first_audio_b", "server overhead on first audio, (b) p50", 0.020,
     "s", "any"),
    ("overhead_first_audio_c", "server overhead on first audio, (c) p50", 0.020,
     "s", "any"),
    ("overhead_total_a", "server overhead on total, (a) p50", 0.05, "%", "any"),
    ("overhead_total_b", "server overhead on total, (b) p50", 0.05, "%", "any"),
    ("first_audio_b", "first audio p50, (b)", 0.150, "s", "gpu"),
    ("first_audio_c", "first audio after first sentence p50, (c)", 0.150, "s",
     "gpu"),
    ("total_a", "total p50, (a)", 0.250, "s", "gpu"),
    ("gap_c", "longest silence beyond real time, (c) max", 0.0, "s", "gpu"),
    ("rtf", "real-time factor p50", 0.05, "x", "gpu"),
    ("t3_ms_per_token", "T3 ms per token p50", 1.5, "ms", "gpu"),
    ("first_audio_16", "16 streams: first audio after first sentence p95", 0.400,
     "s", "gpu"),
    ("gpu_memory_one_stream", "GPU memory peak, one stream", 3.0, "GB", "gpu"),
]  # fmt: skip


def realistic_tokens(text: str) -> int:
    """Speech tokens that real speech of `text` takes (see TOKEN_RULE)."""
    n = round(len(text.strip()) * TOKENS_PER_SECOND / CHARS_PER_SECOND)
    return max(1, min(1000, n))


def speech_seconds(text: str) -> float:
    return realistic_tokens(text) / TOKENS_PER_SECOND


# --- statistics -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): with few
    samples p95 is close to the maximum, which is the honest reading."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """n, p50, p95, min, max and mean of the values that exist."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return {"n": 0}
    return {
        "n": len(present),
        "p50": percentile(present, 50),
        "p95": percentile(present, 95),
        "min": min(present),
        "max": max(present),
        "mean": sum(present) / len(present),
    }


def playback_gaps(arrivals: Sequence[float], durations: Sequence[float]) -> Dict:
    """The silences a listener would hear if playback started at the first chunk.

    A player plays each chunk as soon as the one before it has ended; a chunk
    that arrives after that moment leaves a silence, and the player goes on from
    the chunk's arrival. Only the silences beyond real time count, so a reply
    produced faster than it is spoken has none.
    """
    clock: Optional[float] = None
    gaps: List[float] = []
    for arrival, seconds in zip(arrivals, durations):
        if clock is None:
            clock = arrival
        elif arrival > clock:
            gaps.append(arrival - clock)
            clock = arrival
        clock += seconds
    audible = [gap for gap in gaps if gap > AUDIBLE_GAP_S]
    return {
        "max_gap_s": max(gaps, default=0.0),
        "total_gap_s": sum(gaps),
        "audible_gaps": len(audible),
    }


# --- the fake backend -------------------------------------------------------


class RealisticFakeBackend(SpeechBackend):
    """Speaks as much audio as real speech of the text would last, after `delay`
    seconds per sentence group: with delay 0 every millisecond measured is the
    server's and the protocol's own."""

    sample_rate = SAMPLE_RATE
    model_name = "Fake (benchmark)"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        # A quiet voiced tone, so that the loudness stage has something to level.
        t = np.arange(SAMPLE_RATE * 60) / SAMPLE_RATE
        self._tone = (0.1 * np.sin(2 * np.pi * 140 * t)).astype(np.float32)
        self.device = "cpu"

    def load(self) -> None:
        pass

    def voices(self) -> List[VoiceInfo]:
        return [VoiceInfo(name="default", description="Fake voice", languages=["en"])]

    def synthesize(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if should_stop():
                raise SynthesisCancelled()
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        samples = int(speech_seconds(text) * SAMPLE_RATE)
        repeats = -(-samples // self._tone.size)
        audio = np.tile(self._tone, repeats)[:samples]
        yield Piece(audio=audio, tokens=realistic_tokens(text))


def make_turbo_backend(
    model_dir: Path, data_dir: Path, device: str, fast: Any
) -> Tuple[SpeechBackend, Dict[str, bool]]:
    """The real Turbo backend, with generation lengths set by the text.

    Random-weight checkpoints stop after a handful of tokens; `_token_range`
    (min, max) is the backend's hook for how many it must make, so every group
    is as long as real speech of its text would be. Also says which of the
    backend's benchmark hooks this tree has: without them the figures are
    not what they claim, and the report says so.
    """
    from wyoming_chatterbox.turbo import TurboBackend

    class BenchTurboBackend(TurboBackend):  # type: ignore[misc,valid-type]
        """Turbo with realistic generation lengths for any checkpoint."""

        def _token_range(self, text: str) -> Tuple[int, int]:
            n = realistic_tokens(text)
            return n, n

    hooks = {
        "token_range_hook": hasattr(TurboBackend, "_token_range"),
        "fast_keyword": True,
    }
    try:
        backend = BenchTurboBackend(
            model_dir=model_dir, data_dir=data_dir, device=device, fast=fast
        )
    except TypeError:
        hooks["fast_keyword"] = False
        backend = BenchTurboBackend(
            model_dir=model_dir, data_dir=data_dir, device=device
        )
    return backend, hooks


# --- timing the backend from inside ------------------------------------------


class CallRecorder:
    """Wraps a backend's `synthesize` to timestamp every call (time.monotonic,
    the clock the client uses too, in the same process).

    Per call: when its body started, when it yielded its first piece, when it
    ended, and `busy_s`, the time spent inside the backend's own code (the
    engine interleaves streams piece by piece, so wall time from start to end
    would count other streams' work).
    """

    def __init__(self, backend: SpeechBackend) -> None:
        self.calls: List[Dict[str, Any]] = []
        self.sample_rate = backend.sample_rate
        # One-shot replies come through synthesize_whole; its default calls
        # synthesize, so it is wrapped only where a backend has its own.
        names = ["synthesize"]
        if type(backend).synthesize_whole is not SpeechBackend.synthesize_whole:
            names.append("synthesize_whole")
        for name in names:
            # An instance attribute shadows the method: the engine calls this.
            setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, original: Callable[..., Iterator[Piece]]) -> Callable[..., Any]:
        def timed(
            text: str,
            voice: str,
            language: str,
            params: SamplingParams,
            should_stop: Callable[[], bool],
        ) -> Iterator[Piece]:
            return self._timed(original, text, voice, language, params, should_stop)

        return timed

    def _timed(
        self, original: Callable[..., Iterator[Piece]], text: str, *args: Any
    ) -> Iterator[Piece]:
        record: Dict[str, Any] = {
            "chars": len(text.strip()),
            "intended_tokens": realistic_tokens(text),
            "called": time.monotonic(),
            "first_piece": None,
            "end": None,
            "busy_s": 0.0,
            "audio_s": 0.0,
            "tokens": 0,
            "pieces": 0,
        }
        self.calls.append(record)
        inner = iter(original(text, *args))
        try:
            while True:
                step = time.monotonic()
                try:
                    piece = next(inner)
                except StopIteration:
                    record["busy_s"] += time.monotonic() - step
                    break
                now = time.monotonic()
                record["busy_s"] += now - step
                if not piece.audio.size:  # the worker's turn, not audio
                    yield piece
                    continue
                if record["first_piece"] is None:
                    record["first_piece"] = now
                record["pieces"] += 1
                record["audio_s"] += piece.audio.size / self.sample_rate
                record["tokens"] += piece.tokens
                yield piece
        finally:
            record["end"] = time.monotonic()
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def between(self, start: float, end: float) -> List[Dict[str, Any]]:
        """Calls that started in [start, end] and have ended."""
        return [
            c
            for c in self.calls
            if start <= c["called"] <= end and c["end"] is not None
        ]


# --- the client ---------------------------------------------------------------


class BenchError(Exception):
    """The server answered with an error, closed, or was too slow."""


@dataclasses.dataclass
class Received:
    """Arrival times (time.monotonic) of one reply's events."""

    chunk_times: List[float] = dataclasses.field(default_factory=list)
    chunk_seconds: List[float] = dataclasses.field(default_factory=list)
    audio_stop: Optional[float] = None
    stopped: Optional[float] = None


async def _read_reply(reader: asyncio.StreamReader, streaming: bool) -> Received:
    """Read until audio-stop (one-shot, as HA does) or synthesize-stopped."""
    got = Received()
    while True:
        event = await async_read_event(reader)
        now = time.monotonic()
        if event is None:
            raise BenchError("the server closed the connection mid-reply")
        if AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            got.chunk_times.append(now)
            got.chunk_seconds.append(
                len(chunk.audio) / (chunk.rate * chunk.width * chunk.channels)
            )
        elif AudioStop.is_type(event.type):
            got.audio_stop = now
            if not streaming:
                return got
        elif SynthesizeStopped.is_type(event.type):
            got.stopped = now
            return got
        elif Error.is_type(event.type):
            raise BenchError(f"server error: {Error.from_event(event).text}")


@contextlib.asynccontextmanager
async def _connection(
    host: str, port: int
) -> AsyncIterator[Tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _voice(name: Optional[str]) -> Optional[SynthesizeVoice]:
    return SynthesizeVoice(name=name) if name else None


def llm_fragments(text: str, rng: random.Random) -> List[str]:
    """Cut `text` into 2-6 character pieces, anywhere (mid-word too), as an
    LLM's deltas come."""
    pieces: List[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(2, 6)
        pieces.append(text[i : i + n])
        i += n
    return pieces


def few_chunks(text: str, count: int = 4) -> List[str]:
    """`text` in `count` nearly equal pieces, cut anywhere."""
    size = -(-len(text) // count)
    return [text[i : i + size] for i in range(0, len(text), size)]


def first_group_ready(fragments: Sequence[str]) -> Optional[int]:
    """Index of the fragment after which the server can start speaking: its own
    text cleanup and sentence splitter, replayed here on the same fragments,
    release the first group then (the splitter waits for a word of the next
    sentence before it calls a sentence ended). None: only at synthesize-stop.
    """
    from wyoming_chatterbox.sentences import IncrementalSplitter
    from wyoming_chatterbox.text import TextCleaner

    cleaner, splitter = TextCleaner("en"), IncrementalSplitter()
    for i, fragment in enumerate(fragments):
        groups = splitter.feed(cleaner.feed(fragment))
        if any(char.isalnum() for group in groups for char in group):
            return i
    return None


def first_sentence_end(text: str) -> int:
    """Index just past the first sentence's terminal punctuation."""
    match = re.search(r"[.!?](\s|$)", text)
    return match.start() + 1 if match else len(text)


async def one_shot(
    host: str, port: int, text: str, voice: Optional[str], timeout: float
) -> Dict[str, Any]:
    """Case (a). t0: the synthesize event was written (connection already open)."""
    async with _connection(host, port) as (reader, writer):
        reading = asyncio.ensure_future(_read_reply(reader, streaming=False))
        t0 = time.monotonic()
        await async_write_event(
            Synthesize(text=text, voice=_voice(voice)).event(), writer
        )
        got = await asyncio.wait_for(reading, timeout)
    return _sample("a", text, t0, t0, got, got.audio_stop)


async def streamed(
    host: str,
    port: int,
    text: str,
    fragments: List[str],
    interval: float,
    voice: Optional[str],
    timeout: float,
    case: str,
) -> Dict[str, Any]:
    """Cases (b) and (c): fragments `interval` seconds apart on a fixed schedule
    (so a busy event loop does not slow the "LLM" down), then HA's compatibility
    synthesize and synthesize-stop."""
    sentence_end = first_sentence_end(text)
    ready_index = first_group_ready(fragments)
    ready: Optional[float] = None
    async with _connection(host, port) as (reader, writer):
        reading = asyncio.ensure_future(_read_reply(reader, streaming=True))
        start = time.monotonic()
        await async_write_event(SynthesizeStart(voice=_voice(voice)).event(), writer)
        sent = 0
        first_sentence_sent: Optional[float] = None
        for i, fragment in enumerate(fragments):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await async_write_event(SynthesizeChunk(text=fragment).event(), writer)
            sent += len(fragment)
            if i == ready_index:
                ready = time.monotonic()
            if first_sentence_sent is None and sent >= sentence_end:
                first_sentence_sent = time.monotonic()
        await async_write_event(
            Synthesize(text=text, voice=_voice(voice)).event(), writer
        )
        stop_sent = time.monotonic()
        await async_write_event(SynthesizeStop().event(), writer)
        got = await asyncio.wait_for(reading, timeout)
    t0 = stop_sent if case == "b" else start
    sample = _sample(case, text, t0, start, got, got.stopped)
    sample["text_s"] = stop_sent - start
    sample["first_audio_from_start_s"] = got.chunk_times[0] - start
    if case == "c":
        assert first_sentence_sent is not None
        sample["first_audio_after_first_sentence_s"] = (
            got.chunk_times[0] - first_sentence_sent
        )
    sample["t_first_sentence"] = first_sentence_sent
    sample["t_text_ready"] = stop_sent if ready is None else ready
    sample["first_audio_after_text_ready_s"] = (
        got.chunk_times[0] - sample["t_text_ready"]
    )
    if case == "c":
        assert first_sentence_sent is not None
        sample["splitter_wait_s"] = sample["t_text_ready"] - first_sentence_sent
    return sample


def _sample(
    case: str,
    text: str,
    t0: float,
    start: float,
    got: Received,
    done: Optional[float],
) -> Dict[str, Any]:
    if not got.chunk_times or done is None:
        raise BenchError(f"case ({case}): no audio for {text[:40]!r}")
    audio_s = sum(got.chunk_seconds)
    total = done - t0
    sample: Dict[str, Any] = {
        "case": case,
        "chars": len(text),
        "t0": t0,
        "t_start": start,
        "t_done": done,
        "first_audio_s": got.chunk_times[0] - t0,
        "total_s": total,
        "audio_s": audio_s,
        "chunks": len(got.chunk_times),
        "rtf_wall": (done - start) / audio_s if audio_s > 0 else None,
    }
    sample.update(playback_gaps(got.chunk_times, got.chunk_seconds))
    return sample


# --- running the cases --------------------------------------------------------


@dataclasses.dataclass
class Target:
    """Where the server listens and what the bench may know about its inside."""

    host: str
    port: int
    recorder: Optional[CallRecorder] = None
    backend: Optional[SpeechBackend] = None


CASE_T0 = {
    "a": "t0 = the one-shot synthesize was sent; first audio = first audio-chunk, "
    "total = audio-stop (what HA waits for before it plays anything)",
    "b": "t0 = synthesize-stop was sent (the text was complete); first audio = "
    "first audio-chunk, total = synthesize-stopped",
    "c": "t0 = the first text fragment was sent; first audio also from the moment "
    "the fragment ending the first sentence was sent, and from the fragment after "
    "which the server's sentence splitter releases the first group (replayed in "
    "the bench); total = synthesize-stopped",
}


class Bench:
    """Runs the cases against one server and keeps every sample."""

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        self.args = args
        self.target = target
        self.rng = random.Random(args.seed)
        self.results: Dict[str, Any] = {"cases": {}, "concurrency": {}}

    def _text(self, case: str, i: int) -> str:
        texts = {"a": SHORT_REPLIES, "b": SENTENCE_REPLIES, "c": LONG_REPLIES}[case]
        return texts[i % len(texts)]

    async def run_one(self, case: str, i: int) -> Dict[str, Any]:
        args, target = self.args, self.target
        text = self._text(case, i)
        if case == "a":
            return await one_shot(
                target.host, target.port, text, args.voice, args.timeout
            )
        if case == "b":
            fragments, interval = few_chunks(text), 0.0
        else:
            fragments, interval = llm_fragments(text, self.rng), args.fragment_interval
        return await streamed(
            target.host,
            target.port,
            text,
            fragments,
            interval,
            args.voice,
            args.timeout,
            case,
        )

    async def run_case(self, case: str) -> None:
        args = self.args
        _LOGGER.info(
            "Case (%s): %s warm-up + %s measured rounds", case, args.warmup, args.rounds
        )
        for i in range(args.warmup):
            await self.run_one(case, i)
        stats_before = _group_stats(self.target.backend)
        samples = []
        for i in range(args.rounds):
            sample = await self.run_one(case, args.warmup + i)
            self._attribute(sample)
            samples.append(sample)
        self.results["cases"][case] = {
            "definition": CASE_T0[case],
            "samples": [_public(s) for s in samples],
            "summary": _case_summary(samples),
            "group_stats": _new_entries(stats_before, self.target.backend),
        }

    def _attribute(self, sample: Dict[str, Any]) -> None:
        """The backend calls of one reply (one reply at a time: by time window),
        and the server's overhead beside them."""
        recorder = self.target.recorder
        if recorder is None:
            return
        calls = recorder.between(sample["t_start"], sample["t_done"])
        sample["calls"] = len(calls)
        if not calls:
            return
        first = min(calls, key=lambda c: c["called"])
        busy = sum(c["busy_s"] for c in calls)
        sample["backend_busy_s"] = busy
        sample["rtf_backend"] = (
            busy / sample["audio_s"] if sample["audio_s"] > 0 else None
        )
        sample["tokens"] = sum(c["tokens"] for c in calls)
        sample["intended_tokens"] = sum(c["intended_tokens"] for c in calls)
        if first["first_piece"] is not None:
            # First audio as the client saw it, minus the backend's own time to
            # its first piece; streamed, from when the text let the server
            # start (the splitter's wait for the sentence end is not overhead).
            t0 = sample.get("t_text_ready") or sample["t0"]
            model = first["first_piece"] - first["called"]
            sample["overhead_first_audio_s"] = (
                sample["t0"] + sample["first_audio_s"] - t0 - model
            )
            sample["overhead_before_call_s"] = first["called"] - t0
            sample["overhead_after_piece_s"] = (
                sample["t0"] + sample["first_audio_s"] - first["first_piece"]
            )
        if sample["case"] in ("a", "b"):
            # The text was complete at t0: the rest of the wait is model or us.
            sample["overhead_total_s"] = sample["total_s"] - busy
            sample["overhead_total_pct"] = 100.0 * (
                (sample["total_s"] - busy) / sample["total_s"]
            )

    async def run_sweep(self, level: int) -> None:
        """`level` clients at once, each one reply of the sweep case, for
        `--sweep-rounds` rounds; a round that runs past `--sweep-timeout` is
        cut off and reported so."""
        args, target = self.args, self.target
        case = args.sweep_case
        samples: List[Dict[str, Any]] = []
        errors: List[str] = []
        walls: List[float] = []
        busy_total = 0.0
        stats_before = _group_stats(target.backend)
        memory = _reset_gpu_peak(target.backend)
        for r in range(args.sweep_rounds):
            started = time.monotonic()
            tasks = [
                asyncio.ensure_future(self.run_one(case, r * level + i))
                for i in range(level)
            ]
            done, pending = await asyncio.wait(tasks, timeout=args.sweep_timeout)
            for task in pending:
                task.cancel()
                errors.append("timed out")
            for task in done:
                err = task.exception()
                if err is not None:
                    errors.append(f"{type(err).__name__}: {err}")
                else:
                    samples.append(task.result())
            wall = time.monotonic() - started
            walls.append(wall)
            if target.recorder is not None:
                busy_total += sum(
                    c["busy_s"]
                    for c in target.recorder.between(started, started + wall)
                )
            if pending:
                await asyncio.wait(pending)
                break
        audio = sum(s["audio_s"] for s in samples)
        wall_total = sum(walls)
        summary = _case_summary(samples)
        summary["throughput_audio_s_per_s"] = audio / wall_total if wall_total else 0
        summary["wall_s"] = wall_total
        summary["streams"] = len(samples)
        summary["errors"] = len(errors)
        if target.recorder is not None and wall_total:
            summary["engine_busy_fraction"] = busy_total / wall_total
        if memory is not None:
            summary["gpu_memory_peak_gb"] = _gpu_peak(target.backend)
        self.results["concurrency"][str(level)] = {
            "clients": level,
            "case": case,
            "samples": [_public(s) for s in samples],
            "errors": errors,
            "summary": summary,
            "group_stats": _new_entries(stats_before, target.backend),
        }


SAMPLE_FIGURES = (
    "first_audio_s",
    "first_audio_after_first_sentence_s",
    "first_audio_from_start_s",
    "first_audio_after_text_ready_s",
    "splitter_wait_s",
    "total_s",
    "audio_s",
    "text_s",
    "rtf_wall",
    "rtf_backend",
    "max_gap_s",
    "total_gap_s",
    "audible_gaps",
    "backend_busy_s",
    "overhead_first_audio_s",
    "overhead_before_call_s",
    "overhead_after_piece_s",
    "overhead_total_s",
    "overhead_total_pct",
    "tokens",
    "intended_tokens",
)


def _case_summary(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"rounds": len(samples)}
    for key in SAMPLE_FIGURES:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            summary[key] = summarize(values)
    return summary


def _public(sample: Dict[str, Any]) -> Dict[str, Any]:
    """A sample without its absolute clock readings."""
    return {k: v for k, v in sample.items() if not k.startswith("t_") and k != "t0"}


# --- the backend's own figures --------------------------------------------------

GROUP_FIGURES = (
    ("prefill_s", "T3 prefill", "s"),
    ("ms_per_token", "T3 per token", "ms"),
    ("decode_s", "T3 decode loop", "s"),
    ("s3gen_s", "S3Gen per call", "s"),
    ("s3gen_tokens", "S3Gen tokens per call", ""),
    ("watermark_s", "watermark per call", "s"),
    ("first_piece_s", "synthesize() to first piece", "s"),
    ("total_s", "synthesize() total", "s"),
    ("tokens", "speech tokens per group", ""),
    ("pieces", "pieces per group", ""),
)


def _group_stats(backend: Optional[SpeechBackend]) -> Optional[List[Any]]:
    stats = getattr(backend, "group_stats", None)
    return None if stats is None else list(stats)


def _new_entries(
    before: Optional[List[Any]], backend: Optional[SpeechBackend]
) -> Optional[List[Dict[str, Any]]]:
    """Entries added to backend.group_stats since `before` (by identity: the
    deque may drop old ones)."""
    after = _group_stats(backend)
    if after is None or before is None:
        return None
    seen = {id(entry) for entry in before}
    return [dict(entry) for entry in after if id(entry) not in seen]


def summarize_groups(entries: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """p50/p95 of each group_stats key; lists (one value per call) are pooled."""
    if entries is None:
        return {"available": False}
    out: Dict[str, Any] = {"available": True, "groups": len(entries)}
    for key, _, _ in GROUP_FIGURES:
        values: List[float] = []
        for entry in entries:
            value = entry.get(key)
            if isinstance(value, (list, tuple)):
                values.extend(float(v) for v in value)
            elif isinstance(value, (int, float)):
                values.append(float(value))
        out[key] = summarize(values)
    return out


def _reset_gpu_peak(backend: Optional[SpeechBackend]) -> Optional[bool]:
    device = str(getattr(backend, "device", ""))
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return True


def _gpu_peak(backend: Optional[SpeechBackend]) -> Optional[float]:
    device = str(getattr(backend, "device", ""))
    if not device.startswith("cuda"):
        return None
    import torch

    return float(torch.cuda.max_memory_allocated(device)) / 1e9


# --- the machine ------------------------------------------------------------------


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
        "torch": None,
    }
    # Importing torch costs seconds: the fake mode leaves it out.
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            import torch

            info["torch"] = torch.__version__
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' (uncommitted changes)' if dirty else ''}"


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- log noise ----------------------------------------------------------------------


class OncePerMessage(logging.Filter):
    """Lets each distinct log message (by its format string) through once and
    counts the repeats: a runaway-cut warning per group would flood the output."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats: Dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bench":
            return True
        key = f"{record.name}: {record.msg}"
        if key in self.repeats:
            self.repeats[key] += 1
            return False
        self.repeats[key] = 0
        return True


def setup_logging(verbose: bool) -> OncePerMessage:
    once = OncePerMessage()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(once)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("bench").setLevel(logging.INFO)
    logging.getLogger("wyoming_chatterbox").setLevel(
        logging.INFO if verbose else logging.WARNING
    )
    logging.captureWarnings(True)
    # Libraries' deprecation notices say nothing about speed.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", ResourceWarning)
    return once


# --- the server in this process -----------------------------------------------------


async def serve_in_process(
    backend: SpeechBackend,
    args: argparse.Namespace,
    body: Callable[[Target], Any],
) -> Tuple[Any, float]:
    """Start the real server (run_server) on a free port around `backend`, run
    `body`, stop the server. Returns body's result and the load + warm-up time."""
    from wyoming_chatterbox.__main__ import run_server
    from wyoming_chatterbox.handler import ServerSettings

    recorder = CallRecorder(backend)
    port = free_port()
    settings = ServerSettings(
        default_voice="default",
        params=getattr(backend, "default_params", SamplingParams()),
        samples_per_chunk=args.samples_per_chunk,
        loudness=args.loudness,
        warm_up=True,
        early_release=not args.no_early_release,
        speculative_start=not args.no_speculative_start,
        max_connections=max(64, max(args.concurrency or [1]) + 8),
    )
    ready = asyncio.Event()
    stop = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    async def stop_signal() -> None:
        await stop.wait()

    started = time.monotonic()
    server = asyncio.ensure_future(
        run_server(
            backend,
            settings,
            f"tcp://127.0.0.1:{port}",
            on_ready=on_ready,
            stop_signal=stop_signal,
        )
    )
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait([server, waiting], return_when=asyncio.FIRST_COMPLETED)
    if server.done():
        waiting.cancel()
        server.result()  # raises the load error
        raise BenchError("the server stopped before it was ready")
    load_s = time.monotonic() - started
    try:
        result = await body(Target("127.0.0.1", port, recorder, backend))
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server, 30)
    return result, load_s


# --- the whole run ----------------------------------------------------------------


async def run_bench(args: argparse.Namespace, target: Target) -> Dict[str, Any]:
    bench = Bench(args, target)
    _reset_gpu_peak(target.backend)
    for case in args.cases:
        await bench.run_case(case)
    bench.results["gpu_memory_one_stream_gb"] = _gpu_peak(target.backend)
    for level in args.concurrency:
        _LOGGER.info(
            "Concurrency %s: %s round(s) of case (%s)",
            level,
            args.sweep_rounds,
            args.sweep_case,
        )
        await bench.run_sweep(level)
    if target.recorder is not None:
        calls = [c for c in target.recorder.calls if c["end"] is not None]
        bench.results["backend_calls"] = len(calls)
    return bench.results


def _p(summary: Optional[Dict[str, Any]], key: str = "p50") -> Optional[float]:
    if not summary or not summary.get("n"):
        return None
    value = summary.get(key)
    return None if value is None else float(value)


def _figure(results: Dict[str, Any], case: str, key: str, q: str = "p50") -> Any:
    return _p(results["cases"].get(case, {}).get("summary", {}).get(key), q)


def evaluate_targets(results: Dict[str, Any], on_gpu: bool) -> List[Dict[str, Any]]:
    """Each target beside the figure it is about: met, missed, or why not judged."""
    pooled = summarize_groups(
        [
            entry
            for case in results["cases"].values()
            for entry in (case.get("group_stats") or [])
        ]
        if any(c.get("group_stats") is not None for c in results["cases"].values())
        else None
    )
    rtf_values = [
        s["rtf_backend"]
        for case in ("a", "b")
        for s in results["cases"].get(case, {}).get("samples", [])
        if s.get("rtf_backend") is not None
    ]
    if not rtf_values:
        rtf_values = [
            s["rtf_wall"]
            for s in results["cases"].get("a", {}).get("samples", [])
            if s.get("rtf_wall") is not None
        ]
    level16 = results["concurrency"].get("16", {}).get("summary", {})
    figures = {
        "overhead_first_audio_a": _figure(results, "a", "overhead_first_audio_s"),
        "overhead_first_audio_b": _figure(results, "b", "overhead_first_audio_s"),
        "overhead_first_audio_c": _figure(results, "c", "overhead_first_audio_s"),
        "overhead_total_a": _pct(_figure(results, "a", "overhead_total_pct")),
        "overhead_total_b": _pct(_figure(results, "b", "overhead_total_pct")),
        "first_audio_b": _figure(results, "b", "first_audio_s"),
        "first_audio_c": _figure(results, "c", "first_audio_after_first_sentence_s"),
        "total_a": _figure(results, "a", "total_s"),
        "gap_c": _figure(results, "c", "max_gap_s", "max"),
        "rtf": percentile(rtf_values, 50) if rtf_values else None,
        "t3_ms_per_token": _p(pooled.get("ms_per_token")),
        "first_audio_16": _p(level16.get("first_audio_after_first_sentence_s"), "p95"),
        "gpu_memory_one_stream": results.get("gpu_memory_one_stream_gb"),
    }
    busy = {case: _figure(results, case, "backend_busy_s") for case in ("a", "b")}
    out = []
    for key, label, limit, unit, where in TARGETS:
        value = figures.get(key)
        if value is None:
            status = "n/a (not measured)"
        elif where == "gpu" and not on_gpu:
            status = "not judged (not a GPU run)"
        elif key.startswith("overhead_total") and (busy.get(key[-1]) or 0) < 0.05:
            # A share of nearly nothing: the overhead in ms is the figure then.
            status = "not judged (backend takes ~0 s)"
        else:
            # gap target 0: allow jitter below an audible silence.
            slack = AUDIBLE_GAP_S if key == "gap_c" else 0.0
            status = "met" if value <= limit + slack else "missed"
        out.append(
            {
                "key": key,
                "label": label,
                "value": value,
                "limit": limit,
                "unit": unit,
                "where": where,
                "status": status,
            }
        )
    return out


def _pct(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / 100.0


# --- output ------------------------------------------------------------------------


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "%":
        return f"{value * 100:.1f} %"
    if unit == "x":
        return f"{value:.3f}"
    if unit == "GB":
        return f"{value:.2f} GB"
    return f"{value:.1f}" if value != int(value) else f"{value:.0f}"


CASE_ROWS = (
    ("first_audio_s", "first audio (from t0)", "s"),
    ("first_audio_after_first_sentence_s", "first audio after first sentence", "s"),
    ("first_audio_from_start_s", "first audio from synthesize-start", "s"),
    ("splitter_wait_s", "first sentence sent to first group released", "s"),
    ("first_audio_after_text_ready_s", "first audio after first group released", "s"),
    ("total_s", "total (from t0)", "s"),
    ("audio_s", "audio length", "s"),
    ("text_s", "text sending time", "s"),
    ("rtf_wall", "RTF, wall (reply time / audio)", "x"),
    ("rtf_backend", "RTF, backend (busy / audio)", "x"),
    ("max_gap_s", "longest silence beyond real time", "s"),
    ("total_gap_s", "all silences beyond real time", "s"),
    ("audible_gaps", "silences > 10 ms", ""),
    ("overhead_first_audio_s", "server overhead on first audio", "s"),
    ("overhead_before_call_s", "  of which: text ready to backend call", "s"),
    ("overhead_after_piece_s", "  of which: first piece to client", "s"),
    ("overhead_total_s", "server overhead on total", "s"),
    ("overhead_total_pct", "server overhead on total (%)", ""),
    ("tokens", "speech tokens made", ""),
    ("intended_tokens", "speech tokens intended (rule)", ""),
)


def markdown_tables(results: Dict[str, Any]) -> List[str]:
    """The figures as Markdown tables (also what stdout shows)."""
    lines: List[str] = []
    for case, data in results["cases"].items():
        summary = data["summary"]
        lines += [
            "",
            f"**Case ({case})**, {summary['rounds']} rounds: {data['definition']}.",
            "",
            "| figure | p50 | p95 | max |",
            "|---|---|---|---|",
        ]
        for key, label, unit in CASE_ROWS:
            s = summary.get(key)
            if s and s.get("n"):
                lines.append(
                    f"| {label} | {_fmt(s['p50'], unit)} | {_fmt(s['p95'], unit)} "
                    f"| {_fmt(s['max'], unit)} |"
                )
    if results["concurrency"]:
        case = next(iter(results["concurrency"].values()))["case"]
        lines += [
            "",
            f"**Concurrency**: N clients at once, each one reply of case ({case}).",
            "",
            "| N | streams | errors | first audio p50 / p95 | after 1st sentence "
            "p50 / p95 | RTF wall p50 / p95 | longest silence p50 / max | "
            "throughput (audio s / s) | engine busy | GPU peak |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for level, data in results["concurrency"].items():
            s = data["summary"]

            def pair(key: str, unit: str, q: str = "p95") -> str:
                return f"{_fmt(_p(s.get(key)), unit)} / {_fmt(_p(s.get(key), q), unit)}"

            busy = s.get("engine_busy_fraction")
            lines.append(
                f"| {level} | {s['streams']} | {s['errors']} "
                f"| {pair('first_audio_s', 's')} "
                f"| {pair('first_audio_after_first_sentence_s', 's')} "
                f"| {pair('rtf_wall', 'x')} | {pair('max_gap_s', 's', 'max')} "
                f"| {s['throughput_audio_s_per_s']:.2f} "
                f"| {'n/a' if busy is None else f'{busy * 100:.0f} %'} "
                f"| {_fmt(s.get('gpu_memory_peak_gb'), 'GB')} |"
            )
    inside = results.get("in_process")
    if inside:
        stats = inside["group_stats"]
        lines += ["", "**Inside the backend** (backend.group_stats, cases above):", ""]
        if not stats.get("available"):
            lines.append("backend.group_stats: n/a (this backend does not keep it)")
        else:
            lines += [
                f"{stats['groups']} sentence groups.",
                "",
                "| figure | p50 | p95 | n |",
                "|---|---|---|---|",
            ]
            for key, label, unit in GROUP_FIGURES:
                s = stats.get(key, {})
                if s.get("n"):
                    lines.append(
                        f"| {label} | {_fmt(s['p50'], unit)} "
                        f"| {_fmt(s['p95'], unit)} | {s['n']} |"
                    )
                else:
                    lines.append(f"| {label} | n/a | n/a | 0 |")
        memory = results.get("gpu_memory_one_stream_gb")
        if memory is not None:
            lines += ["", f"GPU memory peak, one stream: {memory:.2f} GB"]
    if results.get("targets"):
        lines += ["", "**Targets** (not asserted):", "", "| target | figure | limit "
                  "| status |", "|---|---|---|---|"]  # fmt: skip
        for t in results["targets"]:
            lines.append(
                f"| {t['label']} | {_fmt(t['value'], t['unit'])} "
                f"| {_fmt(t['limit'], t['unit'])} | {t['status']} |"
            )
    return lines


def header_lines(meta: Dict[str, Any]) -> List[str]:
    machine = meta["machine"]
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; GPU: "
        f"{machine['gpu'] or 'none'}; torch {machine['torch'] or 'not loaded'}; "
        f"Python {machine['python']}",
        f"- Commit: {meta['git']}",
        f"- Command: `{meta['command']}`",
        f"- Mode: {meta['mode']}; device: {meta['device']}",
        f"- Switches: {meta['switches']}",
    ]
    if meta.get("load_s") is not None:
        lines.append(f"- Load + warm-up: {meta['load_s']:.1f} s")
    lines.append(f"- Generation lengths: {meta['lengths']}")
    for note in meta.get("notes", []):
        lines.append(f"- Note: {note}")
    return lines


def machine_label(meta: Dict[str, Any]) -> str:
    machine = meta["machine"]
    if machine["gpu"] and str(meta["device"]).startswith("cuda"):
        return str(machine["gpu"])
    return f"{machine['cpu']} ({machine['cores']} cores)"


def append_report(path: Path, results: Dict[str, Any]) -> None:
    meta = results["meta"]
    title = f"## {meta['date']}, {machine_label(meta)}, {meta['mode']}"
    section = ["", title, ""] + header_lines(meta) + markdown_tables(results)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n")


# --- command line --------------------------------------------------------------------


def _csv_cases(text: str) -> List[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("a", "b", "c")]
    if bad:
        raise argparse.ArgumentTypeError(f"cases are a, b, c; not {', '.join(bad)}")
    return cases


def _csv_levels(text: str) -> List[int]:
    if text.strip() in ("", "0", "none"):
        return []
    levels = [int(c) for c in text.split(",") if c.strip()]
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be 1 or more")
    return levels


def _loudness(text: str) -> Optional[float]:
    return None if text.lower() in ("off", "none") else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="script/bench",
        description="Latency and throughput as Home Assistant sees them "
        "(see docs/benchmarks.md)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="the real Turbo backend"
    )
    mode.add_argument(
        "--fake", action="store_true", help="a fake backend: the server's overhead"
    )
    mode.add_argument("--uri", help="tcp://HOST:PORT of a server already running")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "--fake-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="--fake: seconds each sentence group takes (default: 0)",
    )
    parser.add_argument(
        "--no-early-release",
        action="store_true",
        help="in-process server: streams wait for full sentence groups even when "
        "the listener runs dry (the server's --no-early-release)",
    )
    parser.add_argument(
        "--no-speculative-start",
        action="store_true",
        help="in-process server: a stream's first sentence begins only once the "
        "next word confirms its end (the server's --no-speculative-start)",
    )
    parser.add_argument("--cases", type=_csv_cases, default=["a", "b", "c"])
    parser.add_argument("--rounds", type=int, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, help="unmeasured rounds (default 2)")
    parser.add_argument(
        "--concurrency",
        type=_csv_levels,
        help="clients at once, comma separated, or none (default 1,4,8,16)",
    )
    parser.add_argument(
        "--sweep-case", choices=("b", "c"), default="c", help="(default: c)"
    )
    parser.add_argument(
        "--sweep-rounds", type=int, help="rounds per concurrency level (default 2)"
    )
    parser.add_argument(
        "--sweep-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a sweep round running longer is cut off (default: 600)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 warm-up, 2 rounds, concurrency 1,2, 1 sweep round (unless given)",
    )
    parser.add_argument(
        "--fragment-interval",
        type=float,
        default=0.02,
        metavar="S",
        help="case (c): seconds between 2-6 character fragments (default: 0.02, "
        "an LLM at ~50 tokens/s)",
    )
    parser.add_argument("--voice", help="voice name to ask for (default: none)")
    parser.add_argument(
        "--loudness",
        type=_loudness,
        default=-16.0,
        help="in-process server: target LUFS or off (default: -16, the server's)",
    )
    parser.add_argument("--samples-per-chunk", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300.0, help="per reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all samples")
    parser.add_argument(
        "--report", type=Path, metavar="PATH", help="append a dated Markdown section"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="the server's INFO log too"
    )
    fastpath.add_arguments(parser)
    return parser


def resolve_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.rounds is None:
        args.rounds = 2 if quick else 10
    if args.warmup is None:
        args.warmup = 1 if quick else 2
    if args.concurrency is None:
        args.concurrency = [1, 2] if quick else [1, 4, 8, 16]
    if args.sweep_rounds is None:
        args.sweep_rounds = 1 if quick else 2
    if args.rounds < 1 or args.warmup < 0 or args.sweep_rounds < 1:
        raise SystemExit("--rounds and --sweep-rounds must be 1 or more")


async def _main(args: argparse.Namespace, meta: Dict[str, Any]) -> Dict[str, Any]:
    if args.uri:
        parsed = args.uri.split("://", 1)
        if parsed[0] != "tcp" or ":" not in parsed[-1]:
            raise SystemExit("--uri must be tcp://HOST:PORT")
        host, port = parsed[1].rsplit(":", 1)
        results = await run_bench(args, Target(host, int(port)))
        meta["lengths"] = "whatever the remote server's model makes"
        return results

    backend: SpeechBackend
    if args.fake:
        backend = RealisticFakeBackend(args.fake_delay)
        meta["lengths"] = f"fake audio as long as real speech ({TOKEN_RULE})"
        meta["notes"].append(
            f"fake backend, {args.fake_delay:g} s per group: the speed switches "
            "do not apply"
        )
    else:
        import torch

        torch.manual_seed(args.seed)
        data_dir = Path(tempfile.mkdtemp(prefix="bench-data-"))
        backend, hooks = make_turbo_backend(
            args.checkpoint, data_dir, args.device, meta["fast"]
        )
        meta["hooks"] = hooks
        if hooks["token_range_hook"]:
            meta["lengths"] = f"forced by the _token_range hook: {TOKEN_RULE}"
        else:
            meta["lengths"] = (
                "NOT realistic: this tree's backend has no _token_range hook, so "
                "a random-weight checkpoint stops after a handful of tokens"
            )
        if not hooks["fast_keyword"]:
            meta["notes"].append(
                "TurboBackend takes no fast= argument in this tree: the speed "
                "switches were NOT applied"
            )
    results, load_s = await serve_in_process(
        backend, args, lambda target: run_bench(args, target)
    )
    meta["load_s"] = load_s
    meta["device"] = getattr(backend, "device", "cpu")
    groups = [
        entry
        for part in list(results["cases"].values())
        for entry in (part.get("group_stats") or [])
    ]
    has_stats = any(
        part.get("group_stats") is not None for part in results["cases"].values()
    )
    results["in_process"] = {
        "group_stats": summarize_groups(groups if has_stats else None),
    }
    return results


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_defaults(args)
    try:
        fast = fastpath.from_args(args)
    except ValueError as err:
        parser.error(str(err))
    once = setup_logging(args.verbose)
    mode = "remote" if args.uri else "fake" if args.fake else "checkpoint"
    meta: Dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "script/bench " + shlex.join(argv),
        "git": git_commit(),
        "mode": mode,
        "device": "remote" if args.uri else args.device,
        "fast": fast,
        "notes": [],
        "token_rule": TOKEN_RULE,
    }
    load_before = _load_average()
    started = time.monotonic()
    try:
        results = asyncio.run(_main(args, meta))
    except (ModelLoadError, BenchError, OSError) as err:
        _LOGGER.error("%s: %s", type(err).__name__, err)
        return 1
    meta["bench_s"] = time.monotonic() - started
    # Other work on the machine skews every figure: say how busy it was.
    meta["notes"].append(
        f"load average (1 min) {load_before} at start, {_load_average()} at end, "
        f"{os.cpu_count()} cores; the run took {meta['bench_s']:.0f} s"
    )
    meta["machine"] = machine_info()
    device = str(meta["device"])
    meta["switches"] = (
        fast.describe(device if device != "remote" else "cuda")
        if fast is not None
        else "n/a"
    )
    meta["switches"] += (
        "; streams wait for full groups (--no-early-release)"
        if args.no_early_release
        else "; early release of held sentences"
    ) + (
        "; first sentence begun only once certain (--no-speculative-start)"
        if args.no_speculative_start
        else "; first sentence begun at its full stop"
    )
    if args.uri:
        meta["switches"] = "those of the remote server (the flags here are unused)"
    meta["fast"] = dataclasses.asdict(fast) if fast is not None else None
    results["meta"] = meta
    results["targets"] = evaluate_targets(results, on_gpu=device.startswith("cuda"))
    results["suppressed_log_repeats"] = {k: v for k, v in once.repeats.items() if v}

    print(f"\n# script/bench, {meta['date']}, {machine_label(meta)}, {mode}\n")
    print("\n".join(header_lines(meta)))
    print("\n".join(markdown_tables(results)))
    for message, count in results["suppressed_log_repeats"].items():
        print(f"\n(log: {count} more of {message[:100]!r})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nSamples and summaries: {args.json}")
    if args.report:
        append_report(args.report, results)
        print(f"Appended a section to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
