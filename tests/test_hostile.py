"""A broken or hostile client on the LAN, against the real server over TCP.

Whatever it sends, it gets an `error` event saying what was wrong, or the
connection closes; the server never buffers more than its caps, never waits for
bytes it will not accept, and goes on serving the other clients meanwhile.
"""

import asyncio
import contextlib
import io
import json
import logging
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.fakes import FakeBackend, FakeClipBackend, fake_bytes, write_clip
from tests.wyoming_client import connect
from wyoming_chatterbox.reply import TextTooLong
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.settings import DEFAULT_MAX_TEXT_CHARS, ModelSettings, Settings
from wyoming_chatterbox.wire import (
    MAX_DATA_BYTES,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_REPLIES_PER_CONNECTION,
    ProtocolViolation,
    deadline,
    read_event_capped,
)

CAP = DEFAULT_MAX_TEXT_CHARS
GOOD_TEXT = "The other client is fine. It hears every word of its reply."
NOISE = random.Random(7).randbytes(300).replace(b"\n", b"") + b"\xff\xfe"


def encode(*events: Event) -> bytes:
    out = io.BytesIO()
    for event in events:
        write_event(event, out)
    return out.getvalue()


def header(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


async def _good_client(port: int) -> int:
    async with connect(port) as client:
        await client.send(Synthesize(text=GOOD_TEXT).event())
        reply = await client.read_reply(timeout=10)
    return len(reply.audio)


@contextlib.asynccontextmanager
async def bystander(port: int) -> AsyncIterator[None]:
    """A well-behaved client wanting its reply while the test misbehaves."""
    task = asyncio.create_task(_good_client(port))
    await asyncio.sleep(0.01)  # connected and asking before the misbehaviour
    yield
    assert await asyncio.wait_for(task, 10) == fake_bytes(GOOD_TEXT)


def hostile_asked(backend: FakeBackend) -> List[str]:
    """What the engine was asked for, less the bystander's groups."""
    good = split_groups(GOOD_TEXT)
    return [group for group in backend.asked if group not in good]


async def read_until_closed(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> Tuple[List[Event], bool]:
    """Every event until the server closes: (events, whether it was cut: a reset
    or an end inside an event). Fails if the server neither answers nor closes in
    time."""
    events: List[Event] = []

    async def collect() -> bool:
        try:
            while (event := await async_read_event(reader)) is not None:
                events.append(event)
        except (ConnectionError, asyncio.IncompleteReadError):
            return True
        return False

    reset = await asyncio.wait_for(collect(), timeout)
    return events, reset


async def exchange(
    port: int, data: bytes, eof: bool = False
) -> Tuple[List[Event], bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if eof:
            writer.write_eof()
        return await read_until_closed(reader)
    finally:
        writer.close()


def the_error(events: List[Event]) -> Error:
    errors = [event for event in events if Error.is_type(event.type)]
    assert len(errors) == 1, [event.type for event in events]
    assert events[-1] is errors[0], "nothing may follow the error"
    return Error.from_event(errors[0])


MALFORMED = {
    "binary noise": (NOISE + b"\n", "bad-request", ["UTF-8"]),
    "not JSON": (b"hello server, how are you?\n", "bad-request", ["not valid JSON"]),
    "blank line": (b"\n", "bad-request", ["not valid JSON"]),
    "JSON array": (b'[{"type": "describe"}]\n', "bad-request", ["object", "array"]),
    "JSON string": (b'"describe"\n', "bad-request", ["object", "a string"]),
    "no type": (header(data={"text": "Hi."}), "bad-request", ['"type"']),
    "type not a string": (header(type=["describe"]), "bad-request", ['"type"']),
    "data not an object": (
        header(type="describe", data=[1, 2]),
        "bad-request",
        ['"data"', "array"],
    ),
    "negative data_length": (
        header(type="synthesize", data_length=-5),
        "bad-request",
        ["data_length", "negative"],
    ),
    "string data_length": (
        header(type="synthesize", data_length="12"),
        "bad-request",
        ["data_length", "whole number"],
    ),
    "fractional payload_length": (
        header(type="audio-chunk", payload_length=1.5),
        "bad-request",
        ["payload_length", "whole number"],
    ),
    "boolean payload_length": (
        header(type="audio-chunk", payload_length=True),
        "bad-request",
        ["payload_length", "whole number"],
    ),
    "huge data_length": (
        header(type="synthesize", data_length=10**12),
        "too-large",
        ["data_length", str(10**12), str(MAX_DATA_BYTES)],
    ),
    "invalid UTF-8 in the header": (
        b'{"type": "synthesize", "data": {"text": "caf\xe9"}}\n',
        "bad-request",
        ["header", "UTF-8"],
    ),
    "invalid UTF-8 in the data": (
        header(type="synthesize", data_length=14) + b'{"text": "\xc3("}',
        "bad-request",
        ["data", "UTF-8"],
    ),
    "lone surrogate escape": (
        b'{"type": "synthesize", "data": {"text": "\\ud800 hi"}}\n',
        "bad-request",
        ["surrogate"],
    ),
    "extra data not an object": (
        header(type="synthesize", data_length=3) + b"[1]",
        "bad-request",
        ["data", "object", "array"],
    ),
    "extra data not JSON": (
        header(type="synthesize", data_length=5) + b"{text",
        "bad-request",
        ["data", "not valid JSON"],
    ),
    "deep nesting": (b"[" * 60_000 + b"\n", "bad-request", ["nested too deeply"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_input_gets_an_error_and_a_close(serve, case: str) -> None:
    data, code, words = MALFORMED[case]
    async with serve(delay=0.05) as server, bystander(server.port):
        events, reset = await exchange(server.port, data)
        assert not reset
        error = the_error(events)
        assert error.code == code, error
        for word in words:
            assert word in error.text, error.text
        assert hostile_asked(server.backend) == []
        assert not server.task.done()


async def test_garbage_without_newline_at_end_of_input(serve) -> None:
    async with serve(delay=0.05) as server, bystander(server.port):
        events, reset = await exchange(server.port, NOISE, eof=True)
        assert not reset
        error = the_error(events)
        assert error.code == "bad-request" and "UTF-8" in error.text


async def test_huge_payload_length_is_refused_without_waiting(serve) -> None:
    async with serve(delay=0.05) as server, bystander(server.port):
        started = time.monotonic()
        # Only the header: a server that waited for the terabyte would hang here.
        events, _ = await exchange(
            server.port, header(type="audio-chunk", payload_length=10**12)
        )
        assert time.monotonic() - started < 1.0
        error = the_error(events)
        assert error.code == "too-large"
        assert "payload_length" in error.text and str(MAX_PAYLOAD_BYTES) in error.text


async def test_a_valid_event_before_the_garbage_is_still_answered(serve) -> None:
    async with serve() as server:
        data = encode(Describe().event()) + NOISE
        events, _ = await exchange(server.port, data, eof=True)
        assert events and Info.is_type(events[0].type)
        assert the_error(events).code == "bad-request"


async def test_endless_header_line_is_cut_at_the_cap(serve) -> None:
    """No newline, ever: the server must give up after about the cap, not buffer
    until memory runs out. It closes long before 10 MB have been sent."""
    block = b"x" * 65536
    async with serve(delay=0.05) as server, bystander(server.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        reading = asyncio.create_task(read_until_closed(reader, timeout=10))
        sent = 0
        try:
            while sent < 10 * 1024 * 1024:
                writer.write(block)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(block)
        except ConnectionError:
            pass
        finally:
            writer.close()
        events, reset = await reading
        assert sent < 10 * 1024 * 1024, "the server kept reading"
        if events:  # else the reset came first: the close is all a client sees
            error = the_error(events)
            assert error.code == "too-large"
            assert "header" in error.text and str(MAX_HEADER_BYTES) in error.text
        else:
            assert reset


async def test_one_shot_text_over_the_cap_is_refused(serve) -> None:
    text = "a" * 1_000_000
    async with serve(delay=0.05) as server, bystander(server.port):
        events, reset = await exchange(server.port, encode(Synthesize(text).event()))
        assert not reset
        error = the_error(events)
        assert events == [events[-1]]  # no audio-start for a refused reply
        assert error.code == "text-too-long"
        assert str(CAP) in error.text and str(len(text)) in error.text
        assert hostile_asked(server.backend) == []


STREAM_CHUNK = ("A sentence of a long streamed reply, with words. " * 90)[:4096]


async def test_streamed_text_over_the_cap_is_cut_when_it_crosses(serve) -> None:
    """Chunks of 4 KiB; a describe after each shows where the server is."""
    async with serve() as server, bystander(server.port):
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            error: Optional[Error] = None
            accepted = 0
            for _ in range(50):
                await client.send(
                    SynthesizeChunk(text=STREAM_CHUNK).event(), Describe().event()
                )
                while True:  # audio of the earlier chunks may come first
                    event = await client.read(timeout=5)
                    assert event is not None, "closed without an error"
                    if Error.is_type(event.type):
                        error = Error.from_event(event)
                        break
                    if Info.is_type(event.type):
                        accepted += 1
                        break
                if error is not None:
                    break
            assert await client.read(timeout=5) is None  # and then closed
        assert accepted == CAP // len(STREAM_CHUNK)  # cut at the chunk crossing
        assert error is not None and error.code == "text-too-long"
        assert str(CAP) in error.text
        assert str((accepted + 1) * len(STREAM_CHUNK)) in error.text
        # Whether the worker had started on the accepted text before the error
        # cancelled it is a race; that nothing past the cap reached it is not.
        asked = hostile_asked(server.backend)
        assert sum(map(len, asked)) <= accepted * len(STREAM_CHUNK) <= CAP


async def test_streamed_text_blasted_never_reaches_the_engine_past_the_cap(
    serve,
) -> None:
    """All of 1 MB at once, without reading: the engine gets at most the cap."""
    async with serve() as server, bystander(server.port):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        reading = asyncio.create_task(read_until_closed(reader, timeout=10))
        try:
            writer.write(encode(SynthesizeStart().event()))
            for _ in range(250):
                writer.write(encode(SynthesizeChunk(text=STREAM_CHUNK).event()))
                await asyncio.wait_for(writer.drain(), 5)
            writer.write(encode(SynthesizeStop().event()))
            await asyncio.wait_for(writer.drain(), 5)
        except ConnectionError:
            pass
        finally:
            writer.close()
        events, reset = await reading
        errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
        assert errors or reset
        assert all(error.code == "text-too-long" for error in errors)
        assert "synthesize-stopped" not in [event.type for event in events]
        await asyncio.sleep(0.1)  # anything still queued would reach it now
        assert sum(map(len, hostile_asked(server.backend))) <= CAP


async def test_pipelined_replies_beyond_the_queue_are_refused(serve) -> None:
    requests = [Synthesize(text=f"Reply number {i}.").event() for i in range(40)]
    async with serve(delay=0.3) as server, bystander(server.port):
        events, reset = await exchange(server.port, encode(*requests))
        assert not reset
        error = the_error(events)
        assert error.code == "too-many-requests"
        assert str(MAX_REPLIES_PER_CONNECTION) in error.text
        await asyncio.sleep(0.1)
        # The queued replies were cancelled with the connection: at most the
        # first group was being spoken.
        assert len(hostile_asked(server.backend)) <= 1


WRONG_SHAPES = {
    "text a number": (
        Event("synthesize", {"text": 42}),
        "bad-request",
        "text must be a string",
    ),
    "text null": (Event("synthesize", {"text": None}), "bad-request", "NoneType"),
    "no text": (
        Event("synthesize", {"voice": {"name": "default"}}),
        "bad-request",
        "'text'",
    ),
    "voice a number": (
        Event("synthesize", {"text": "Hi.", "voice": 5}),
        "bad-request",
        "synthesize",
    ),
    "voice name a list": (
        Event("synthesize", {"text": "Hi.", "voice": {"name": ["default"]}}),
        "unknown-voice",
        "['default']",
    ),
    "voice language a number": (
        Event("synthesize-start", {"voice": {"language": 7}}),
        None,  # the fake ignores languages; a real backend says bad-request
        "",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_SHAPES))
async def test_events_of_the_wrong_shape(serve, case: str) -> None:
    event, code, words = WRONG_SHAPES[case]
    async with serve(delay=0.05) as server, bystander(server.port):
        events, reset = await exchange(server.port, encode(event), eof=True)
        assert not reset
        if code is None:
            # Accepted as a stream, which the end of input ends: no error.
            assert not any(Error.is_type(e.type) for e in events)
        else:
            error = the_error(events)
            assert error.code == code, error
            assert words in error.text, error.text
        assert hostile_asked(server.backend) == []


async def test_chunk_of_the_wrong_shape_inside_a_stream(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            SynthesizeStart().event(), Event("synthesize-chunk", {"text": 3.5})
        )
        events, _ = await read_until_closed(client.reader)
        error = the_error(events)
        assert error.code == "bad-request" and "text must be a string" in error.text
        assert server.backend.asked == []


async def test_stray_chunk_and_stop_without_a_stream_are_harmless(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            SynthesizeChunk(text="Nobody started this.").event(),
            SynthesizeStop().event(),
            Describe().event(),
        )
        stopped = await client.read()
        info = await client.read()
        assert stopped is not None and stopped.type == "synthesize-stopped"
        assert info is not None and Info.is_type(info.type)
        assert server.backend.asked == []


@pytest.mark.parametrize(
    "text", ["!!! ... ???", "?!", "😀😀🎉", "👍🏽 🚀", "— … ¿¡ ***"]
)
async def test_unspeakable_text_is_a_well_formed_empty_reply(serve, text) -> None:
    async with serve(clean_text=True) as server, connect(server.port) as client:
        await client.send(Synthesize(text=text).event())
        reply = await client.read_reply(timeout=5)
        await client.send(SynthesizeStart().event(), SynthesizeChunk(text).event())
        await client.send(SynthesizeStop().event())
        streamed = await client.read_reply(streaming=True, timeout=5)
        assert server.backend.asked == []
    assert reply.types == ["audio-start", "audio-stop"]
    assert streamed.types == ["audio-start", "audio-stop", "synthesize-stopped"]


@pytest.mark.parametrize(
    "name",
    ["../default", "/etc/passwd", "default/../default", "..", "..\\default", "./"],
)
async def test_voice_names_that_look_like_paths_are_unknown(serve, name) -> None:
    async with serve() as server, bystander(server.port):
        request = Synthesize(text="Hello.", voice=SynthesizeVoice(name=name))
        events, reset = await exchange(server.port, encode(request.event()))
        assert not reset
        error = the_error(events)
        assert error.code == "unknown-voice"
        assert repr(name) in error.text
        assert hostile_asked(server.backend) == []


async def test_voice_names_cannot_reach_clips_outside_the_voices_folder(
    serve_backend, tmp_path: Path
) -> None:
    voices = tmp_path / "voices"
    voices.mkdir()
    write_clip(voices / "alice.wav")
    write_clip(tmp_path / "secret.wav")
    backend = FakeClipBackend(
        ModelSettings(data_dir=tmp_path / "data", device="cpu", voices_dir=voices)
    )
    settings = Settings.of(default_voice="default", loudness=None)
    async with serve_backend(backend, settings) as server:
        for name in ["../secret", "alice/../../secret", str(tmp_path / "secret")]:
            request = Synthesize(text="Hello.", voice=SynthesizeVoice(name=name))
            events, _ = await exchange(server.port, encode(request.event()))
            assert the_error(events).code == "unknown-voice", name
        async with connect(server.port) as client:
            await client.send(
                Synthesize(text="Hello.", voice=SynthesizeVoice(name="alice")).event()
            )
            reply = await client.read_reply(timeout=10)
        assert len(reply.audio) == fake_bytes("Hello.")
    assert "secret" not in backend.computed and "secret.wav" not in backend.computed


async def test_second_start_inside_a_stream_ends_the_first(serve) -> None:
    first, second = "The first stream speaks this.", "And the second one this."
    async with serve() as server, connect(server.port) as client:
        await client.send(
            SynthesizeStart().event(),
            SynthesizeChunk(text=first).event(),
            SynthesizeStart().event(),
            SynthesizeChunk(text=second).event(),
            SynthesizeStop().event(),
        )
        reply1 = await client.read_reply(streaming=True, timeout=5)
        reply2 = await client.read_reply(streaming=True, timeout=5)
    for reply, text in [(reply1, first), (reply2, second)]:
        assert reply.compact_types() == [
            "audio-start",
            "audio-chunk",
            "audio-stop",
            "synthesize-stopped",
        ]
        assert len(reply.audio) == fake_bytes(text)


async def test_audio_sent_by_a_client_is_ignored(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            AudioStart(rate=16000, width=2, channels=1).event(),
            AudioChunk(
                rate=16000, width=2, channels=1, audio=b"\x01\x00" * 4096
            ).event(),
            AudioStop().event(),
            Synthesize(text=GOOD_TEXT).event(),
        )
        reply = await client.read_reply(timeout=5)
    assert reply.compact_types() == ["audio-start", "audio-chunk", "audio-stop"]
    assert len(reply.audio) == fake_bytes(GOOD_TEXT)


def idle_settings(seconds: float) -> Settings:
    return Settings.of(
        default_voice="default", loudness=None, clean_text=False, idle_timeout=seconds
    )


@pytest.mark.parametrize("python_3_10", [False, True], ids=["3.11+", "3.10"])
async def test_a_deadline_ends_a_wait(monkeypatch: Any, python_3_10: bool) -> None:
    # Python 3.10 has no asyncio.timeout; without another, no timeout applied.
    if python_3_10:
        monkeypatch.delattr(asyncio, "timeout", raising=False)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        async with deadline(0.1):
            await asyncio.sleep(10)
    assert time.monotonic() - started < 5
    async with deadline(None):  # no deadline
        await asyncio.sleep(0.15)


async def test_idle_timeout_closes_a_silent_connection(serve_backend) -> None:
    async with serve_backend(FakeBackend(), idle_settings(0.3)) as server:
        async with connect(server.port) as silent:
            started = time.monotonic()
            events, reset = await read_until_closed(silent.reader, timeout=3)
            assert 0.25 < time.monotonic() - started < 2.0
        assert not reset
        error = the_error(events)
        assert error.code == "idle-timeout" and "0.3 seconds" in error.text
        async with connect(server.port) as chatty:
            # A slow drip never makes an event: the clock is not reset by bytes.
            started = time.monotonic()
            for byte in b'{"type": "describe"'[:8]:
                chatty.writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            events, _ = await read_until_closed(chatty.reader, timeout=3)
            assert time.monotonic() - started < 2.0
            assert the_error(events).code == "idle-timeout"
        assert not server.task.done()


async def test_idle_timeout_spares_a_client_listening_to_a_long_reply(
    serve_backend,
) -> None:
    text = " ".join(f"Sentence number {i} of the long reply." for i in range(10))
    assert len(split_groups(text)) >= 4
    backend = FakeBackend(delay=0.25)
    async with serve_backend(backend, idle_settings(0.3)) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text=text).event())
            started = time.monotonic()
            reply = await client.read_reply(timeout=10)
            assert time.monotonic() - started > 0.3 * 2  # silent all along
            assert len(reply.audio) == fake_bytes(text)
            # Between the chunks of a stream the client may pause, too.
            await client.send(SynthesizeStart().event())
            await client.send(SynthesizeChunk(text="Wait for it. ").event())
            await asyncio.sleep(0.5)
            await client.send(SynthesizeChunk(text="Here it is.").event())
            await client.send(SynthesizeStop().event())
            streamed = await client.read_reply(streaming=True, timeout=10)
            assert len(streamed.audio) == fake_bytes("Wait for it. Here it is.")
            # Once it has all been heard, silence counts again.
            events, _ = await read_until_closed(client.reader, timeout=3)
            assert the_error(events).code == "idle-timeout"


@pytest.mark.parametrize("python_3_10", [False, True], ids=["3.11+", "3.10"])
async def test_a_client_that_stops_reading_is_dropped(
    serve_backend, monkeypatch: Any, python_3_10: bool
) -> None:
    """Audio it never reads cannot hold the connection (and its reply) forever
    (also where asyncio has no timeout, as on Python 3.10)."""
    if python_3_10:
        monkeypatch.delattr(asyncio, "timeout", raising=False)
    text = "This sentence is spoken over and over again. " * 400
    assert len(text) <= CAP and fake_bytes(text) > 2_500_000
    async with serve_backend(FakeBackend(), idle_settings(0.3)) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        writer.write(encode(Synthesize(text=text).event()))
        await writer.drain()
        await asyncio.sleep(1.5)  # not reading: the server's writes stall
        # Closed (cut inside an event, or at an event's end when the socket's
        # buffers happen to end there) before the reply's end.
        events, _ = await read_until_closed(reader)
        writer.close()
        audio = sum(len(e.payload or b"") for e in events)
        assert "audio-stop" not in [e.type for e in events]
        assert audio < fake_bytes(text)
        async with connect(server.port) as client:  # and the engine is free
            await client.send(Synthesize(text=GOOD_TEXT).event())
            reply = await client.read_reply(timeout=5)
        assert len(reply.audio) == fake_bytes(GOOD_TEXT)


# --- read_event_capped on its own -------------------------------------------


def reader_of(data: bytes, limit: int = 2**16) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_reads_what_wyoming_reads() -> None:
    events = [
        Describe().event(),
        Synthesize(text="Grüße 😀", voice=SynthesizeVoice(name="x")).event(),
        AudioChunk(rate=1, width=2, channels=1, audio=b"\x00\x01" * 10).event(),
        Event("custom", {"a": [1, {"b": None}]}, payload=b"\n\n"),
    ]
    raw = encode(*events)
    # Data in the header line too (older wyoming), merged with the extra data.
    raw += (
        header(type="synthesize", data={"text": "old", "keep": 1}, data_length=15)
        + b'{"text": "new"}'
    )
    # ensure_ascii escapes (a surrogate pair) and a last line without a newline.
    raw += json.dumps({"type": "synthesize", "data": {"text": "😀"}}).encode()
    capped = reader_of(raw)
    plain = reader_of(raw)
    for _ in range(len(events) + 2):
        ours = await read_event_capped(capped)
        theirs = await async_read_event(plain)
        assert ours == theirs and ours is not None
    assert ours.data == {"text": "😀"}
    assert await read_event_capped(capped) is None


async def test_header_longer_than_the_readers_limit_but_within_the_cap() -> None:
    text = "word " * 2000
    raw = header(type="synthesize", data={"text": text})
    event = await read_event_capped(reader_of(raw, limit=1024), max_header=len(raw))
    assert event is not None and event.data["text"] == text
    with pytest.raises(ProtocolViolation) as err:
        await read_event_capped(reader_of(raw, limit=1024), max_header=len(raw) - 2)
    assert err.value.code == "too-large"


async def test_endless_line_is_refused_after_about_the_cap() -> None:
    reader = asyncio.StreamReader(limit=2**16)
    reading = asyncio.create_task(read_event_capped(reader, max_header=100_000))
    fed = 0
    while not reading.done() and fed < 10_000_000:
        reader.feed_data(b"y" * 8192)
        fed += 8192
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    with pytest.raises(ProtocolViolation):
        reading.result()
    assert fed <= 100_000 + 2**16 + 8192


async def test_end_of_input_inside_an_event_is_the_end() -> None:
    raw = header(type="audio-chunk", data_length=2, payload_length=100) + b"{}abc"
    assert await read_event_capped(reader_of(raw)) is None
    assert await read_event_capped(reader_of(b"")) is None


def test_text_too_long_says_both_numbers() -> None:
    err = TextTooLong(20_001, 20_000)
    assert err.code == "text-too-long"
    assert "20001" in str(err) and "20000" in str(err)


# --- fuzzing the running server ---------------------------------------------

VALID = [
    encode(event)
    for event in [
        Describe().event(),
        Synthesize(text="Hello there. How are you?").event(),
        Synthesize(text="Hi.", voice=SynthesizeVoice(name="default")).event(),
        SynthesizeStart().event(),
        SynthesizeChunk(text="Some words. And more").event(),
        SynthesizeStop().event(),
        AudioChunk(rate=16000, width=2, channels=1, audio=b"\x00\x01" * 32).event(),
        Event("no-such-event", {"x": [1, 2, {"y": None}]}),
    ]
]
ANSWERS = {
    "info",
    "error",
    "audio-start",
    "audio-chunk",
    "audio-stop",
    "synthesize-stopped",
}
_NUMBER = re.compile(rb"\d+")
_ODD_NUMBERS = [b"-1", b"0", b"99999999999999", b"1e9", b"1.5", b'"3"', b"null"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    raw = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), max_size=4))))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "number"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 16))]
        elif kind == "cut":
            del raw[at:]
        elif kind == "number":
            numbers = list(_NUMBER.finditer(raw))
            if numbers:
                match = draw(st.sampled_from(numbers))
                raw[match.start() : match.end()] = draw(st.sampled_from(_ODD_NUMBERS))
    return bytes(raw)


@st.composite
def random_headers(draw: st.DrawFn) -> bytes:
    fields = {}
    if draw(st.booleans()):
        fields["type"] = draw(st.sampled_from(sorted(ANSWERS) + ["synthesize"]))
    for key in ["type", "data", "data_length", "payload_length"]:
        if draw(st.integers(0, 3)) == 0:
            fields[key] = draw(json_values)
    return header(**fields) + draw(st.binary(max_size=64))


def _poke(port: int, data: bytes) -> List[str]:
    """Send, end the input, read until the server closes; the answer's types."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        received = bytearray()
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except socket.timeout:
            raise AssertionError(f"no close 5 s after the end of {data!r:.200}")
    answer = io.BytesIO(bytes(received))
    types = []
    while (event := read_event(answer)) is not None:
        types.append(event.type)
        if event.type == "error":
            assert event.data["text"] and event.data["code"]
    return types


async def test_fuzzed_input_never_hurts_the_server(serve, caplog) -> None:
    caplog.set_level(logging.WARNING)

    @hypothesis_settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.one_of(st.binary(max_size=512), mutated_events(), random_headers()))
    def fuzz(data: bytes) -> None:
        types = _poke(server.port, data)
        assert set(types) <= ANSWERS, types

    async with serve() as server:
        await asyncio.get_running_loop().run_in_executor(None, fuzz)
        async with connect(server.port) as client:
            await client.send(Describe().event())
            info = await client.read(timeout=5)
            assert info is not None and Info.is_type(info.type)
            await client.send(Synthesize(text=GOOD_TEXT).event())
            reply = await client.read_reply(timeout=5)
            assert len(reply.audio) == fake_bytes(GOOD_TEXT)
        assert not server.task.done()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == [], [r.getMessage() for r in failures]


async def test_connections_beyond_the_limit_are_turned_away_clearly(
    serve_backend,
) -> None:
    settings = Settings.of(
        default_voice="default", loudness=None, clean_text=False, max_connections=2
    )
    async with serve_backend(FakeBackend(delay=0.3), settings) as server:
        async with connect(server.port) as first, connect(server.port) as second:
            await first.send(Synthesize(text="First one here.").event())
            await second.send(Synthesize(text="Second one.").event())
            await asyncio.sleep(0.05)
            async with connect(server.port) as third:
                event = await third.read()
                assert event is not None and Error.is_type(event.type)
                error = Error.from_event(event)
                assert error.code == "too-many-connections"
                assert "2 connections" in error.text
                assert await third.read() is None
            assert len((await first.read_reply()).audio) == fake_bytes(
                "First one here."
            )
            assert len((await second.read_reply()).audio) == fake_bytes("Second one.")
        # Room again once they have gone.
        for _ in range(100):
            async with connect(server.port) as again:
                await again.send(Synthesize(text="Now me.").event())
                event = await again.read()
                if event is not None and not Error.is_type(event.type):
                    break
            await asyncio.sleep(0.02)
        assert event is not None and event.type == "audio-start"
