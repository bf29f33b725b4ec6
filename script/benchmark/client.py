"""The Wyoming client: sends one reply's events as Home Assistant does and
timestamps what comes back (time.monotonic, the clock the backend recorder
reads too). One connection per reply, as HA opens one per request.
"""

import asyncio
import contextlib
import dataclasses
import re
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from wyoming.audio import AudioChunk, AudioStop
from wyoming.error import Error
from wyoming.event import async_read_event, async_write_event
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from .stats import playback_gaps


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


@dataclasses.dataclass
class _Sent:
    """When a stream's text went out."""

    start: float
    stop: float
    first_sentence: Optional[float]  # the fragment ending the first sentence
    ready: Optional[float]  # the fragment after which the first group is released


async def _send_stream(
    writer: asyncio.StreamWriter,
    text: str,
    fragments: List[str],
    interval: float,
    voice: Optional[str],
) -> _Sent:
    """Fragments `interval` seconds apart on a fixed schedule (so a busy event
    loop does not slow the "LLM" down), then HA's compatibility synthesize and
    synthesize-stop."""
    sentence_end = first_sentence_end(text)
    ready_index = first_group_ready(fragments)
    ready: Optional[float] = None
    first_sentence: Optional[float] = None
    start = time.monotonic()
    await async_write_event(SynthesizeStart(voice=_voice(voice)).event(), writer)
    sent = 0
    for i, fragment in enumerate(fragments):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await async_write_event(SynthesizeChunk(text=fragment).event(), writer)
        sent += len(fragment)
        if i == ready_index:
            ready = time.monotonic()
        if first_sentence is None and sent >= sentence_end:
            first_sentence = time.monotonic()
    await async_write_event(Synthesize(text=text, voice=_voice(voice)).event(), writer)
    stop = time.monotonic()
    await async_write_event(SynthesizeStop().event(), writer)
    return _Sent(start, stop, first_sentence, ready)


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
    """Cases (b) (t0: synthesize-stop sent) and (c) (t0: the first fragment)."""
    async with _connection(host, port) as (reader, writer):
        reading = asyncio.ensure_future(_read_reply(reader, streaming=True))
        sent = await _send_stream(writer, text, fragments, interval, voice)
        got = await asyncio.wait_for(reading, timeout)
    t0 = sent.stop if case == "b" else sent.start
    sample = _sample(case, text, t0, sent.start, got, got.stopped)
    first_audio = got.chunk_times[0]
    sample["text_s"] = sent.stop - sent.start
    sample["first_audio_from_start_s"] = first_audio - sent.start
    if case == "c":
        assert sent.first_sentence is not None
        sample["first_audio_after_first_sentence_s"] = first_audio - sent.first_sentence
    sample["t_first_sentence"] = sent.first_sentence
    sample["t_text_ready"] = sent.stop if sent.ready is None else sent.ready
    sample["first_audio_after_text_ready_s"] = first_audio - sample["t_text_ready"]
    if case == "c":
        assert sent.first_sentence is not None
        sample["splitter_wait_s"] = sample["t_text_ready"] - sent.first_sentence
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
