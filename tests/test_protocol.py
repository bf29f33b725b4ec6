"""The Wyoming protocol against the real server over TCP, with the fake backend."""

import asyncio
import contextlib
import random
import time

from wyoming.audio import AudioStart
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.fakes import FakeBackend, fake_bytes
from tests.wyoming_client import Client, audio_format, connect, free_port
from wyoming_chatterbox import __version__
from wyoming_chatterbox.health_check import check
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import Settings

FIVE_SENTENCES = (
    "Good morning, Mr. Smith. The kitchen light is on and the temperature is 21.5 "
    "degrees. Dr. Jones called at 3 p.m. about the U.S. trip! Would you like me to "
    "call back? I will remind you again at noon."
)
LONG_TEXT = " ".join(
    f"This is sentence number {i} of a long reply, with a few more words in it."
    for i in range(1, 16)
)


def fragments(text: str, seed: int = 0) -> list:
    """Cut text at random places, mid-word included, like LLM deltas."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        step = rng.randint(1, 7)
        out.append(text[i : i + step])
        i += step
    return out


async def test_describe_returns_info(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(Describe().event())
        event = await client.read()
    assert event is not None and Info.is_type(event.type)
    info = Info.from_event(event)
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.name == "chatterbox"
    assert program.installed is True
    assert program.version == __version__
    assert program.attribution.name == "Resemble AI"
    assert "chatterbox" in program.attribution.url
    assert program.description
    assert program.supports_synthesize_streaming is True
    assert [voice.name for voice in program.voices] == ["default"]
    assert program.voices[0].languages == ["en"]
    assert program.voices[0].installed is True


async def test_describe_without_streaming(serve) -> None:
    async with serve(streaming=False) as server, connect(server.port) as client:
        await client.send(Describe().event())
        event = await client.read()
    assert event is not None
    assert Info.from_event(event).tts[0].supports_synthesize_streaming is False


async def test_one_shot_has_one_start_and_stop_and_all_audio(serve) -> None:
    async with serve(samples_per_chunk=512) as server, connect(server.port) as client:
        await client.send(Synthesize(text=FIVE_SENTENCES).event())
        reply = await client.read_reply()
        assert server.backend.asked == split_groups(FIVE_SENTENCES)
    assert len(split_groups(FIVE_SENTENCES)) >= 2
    assert reply.compact_types() == ["audio-start", "audio-chunk", "audio-stop"]
    assert len(reply.audio) == fake_bytes(FIVE_SENTENCES)
    formats = {audio_format(e) for e in reply.events if e.type != "audio-stop"}
    assert formats == {(24000, 2, 1)}
    assert all(len(chunk.audio) <= 512 * 2 for chunk in reply.chunks)
    # Chunks are full-size except at the end of a group.
    assert sum(len(c.audio) < 1024 for c in reply.chunks) <= len(
        split_groups(FIVE_SENTENCES)
    )


async def test_one_shot_voice_by_name(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            Synthesize(
                text="Hello there.", voice=SynthesizeVoice(name="default")
            ).event()
        )
        reply = await client.read_reply()
    assert len(reply.audio) == fake_bytes("Hello there.")


async def test_two_one_shots_on_one_connection_come_in_order(serve) -> None:
    first, second = "First reply here.", "Second reply, a bit longer than the first."
    async with serve(delay=0.05) as server, connect(server.port) as client:
        await client.send(
            Synthesize(text=first).event(), Synthesize(text=second).event()
        )
        reply1 = await client.read_reply()
        reply2 = await client.read_reply()
    assert len(reply1.audio) == fake_bytes(first)
    assert len(reply2.audio) == fake_bytes(second)


async def test_streaming_fragments_mid_word(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            SynthesizeStart(voice=SynthesizeVoice(name="default")).event()
        )
        for fragment in fragments(FIVE_SENTENCES):
            await client.send(SynthesizeChunk(text=fragment).event())
        # Home Assistant sends the whole text again "for backwards compatibility".
        await client.send(Synthesize(text=FIVE_SENTENCES).event())
        await client.send(SynthesizeStop().event())
        reply = await client.read_reply(streaming=True)
        # Every sentence once, in order: the fragments were put back together
        # (the grouping may be smaller: see test_early_release).
        asked = server.backend.asked
        assert asked[0] == split_groups(FIVE_SENTENCES)[0]
        assert " ".join(asked) == " ".join(split_groups(FIVE_SENTENCES))
    assert reply.compact_types() == [
        "audio-start",
        "audio-chunk",
        "audio-stop",
        "synthesize-stopped",
    ]
    # The compatibility synthesize was ignored: the audio is there once.
    assert len(reply.audio) == fake_bytes(FIVE_SENTENCES)


async def test_one_shot_groups_are_spoken_whole_streams_in_pieces(serve) -> None:
    """Home Assistant plays a one-shot reply only once it has all of it: pieces
    within a group would be work for nothing there."""
    async with serve() as server, connect(server.port) as client:
        await client.send(Synthesize(text=FIVE_SENTENCES).event())
        await client.read_reply()
        assert server.backend.asked_whole == split_groups(FIVE_SENTENCES)
        await client.send(SynthesizeStart().event())
        await client.send(SynthesizeChunk(text="Streamed. Here.").event())
        await client.send(SynthesizeStop().event())
        await client.read_reply(streaming=True)
    assert server.backend.asked_whole == split_groups(FIVE_SENTENCES)  # no more
    assert server.backend.asked[-2:] == ["Streamed.", "Here."]


async def test_streaming_speaks_first_group_before_stop(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        for fragment in fragments(LONG_TEXT, seed=3):
            await client.send(SynthesizeChunk(text=fragment).event())
        # No synthesize-stop yet: the first groups must already be spoken.
        start = await client.read()
        first_chunk = await client.read()
        assert start is not None and AudioStart.is_type(start.type)
        assert first_chunk is not None and first_chunk.type == "audio-chunk"
        assert server.backend.asked[0] == split_groups(LONG_TEXT)[0]
        await client.send(SynthesizeStop().event())
        rest = await client.read_reply(streaming=True)
    assert rest.types[-1] == "synthesize-stopped"
    assert "audio-start" not in rest.types  # one audio format for the whole stream
    total = len(first_chunk.payload or b"") + len(rest.audio)
    assert total == fake_bytes(LONG_TEXT)


async def test_streaming_stop_always_answered(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        # An empty stream, and a stop with no start at all.
        await client.send(SynthesizeStart().event(), SynthesizeStop().event())
        empty = await client.read_reply(streaming=True)
        await client.send(SynthesizeStop().event())
        lone = await client.read()
    assert empty.types == ["audio-start", "audio-stop", "synthesize-stopped"]
    assert lone is not None and lone.type == "synthesize-stopped"


async def test_empty_and_unspeakable_text(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        for text in ["", "   ", "\n\n"]:
            await client.send(Synthesize(text=text).event())
            reply = await client.read_reply()
            assert reply.types == ["audio-start", "audio-stop"]
        assert server.backend.asked == []


async def test_no_streaming_still_answers_streams(serve) -> None:
    async with serve(streaming=False) as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        for fragment in fragments(LONG_TEXT):
            await client.send(SynthesizeChunk(text=fragment).event())
        await asyncio.sleep(0.2)
        assert server.backend.asked == []  # spoken only once complete
        await client.send(SynthesizeStop().event())
        reply = await client.read_reply(streaming=True)
        assert server.backend.asked == split_groups(LONG_TEXT)
    assert reply.compact_types()[-2:] == ["audio-stop", "synthesize-stopped"]
    assert len(reply.audio) == fake_bytes(LONG_TEXT)


async def test_unknown_events_are_ignored(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(Event(type="no-such-event", data={"x": 1}))
        await client.send(SynthesizeChunk(text="outside a stream").event())
        await client.send(Describe().event())
        event = await client.read()
    assert event is not None and Info.is_type(event.type)


async def test_unknown_voice_gets_error_naming_voices_then_close(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(
            Synthesize(text="Hello.", voice=SynthesizeVoice(name="nobody")).event()
        )
        event = await client.read()
        assert event is not None and Error.is_type(event.type)
        error = Error.from_event(event)
        assert "nobody" in error.text and "default" in error.text
        assert await client.read() is None  # the server closed the connection
        assert server.backend.asked == []


async def test_describe_is_fast_during_long_synthesis(serve) -> None:
    async with serve(delay=3.0) as server, connect(server.port) as busy:
        await busy.send(Synthesize(text="A long sentence that takes a while.").event())
        await asyncio.get_running_loop().run_in_executor(
            None, server.backend.started.wait, 5
        )
        async with connect(server.port) as other:
            latencies = []
            for _ in range(5):
                sent = time.monotonic()
                await other.send(Describe().event())
                event = await other.read()
                latencies.append(time.monotonic() - sent)
                assert event is not None and Info.is_type(event.type)
        assert server.backend.finished == []  # the synthesis really was running
    # A loop blocked by the 3 s synthesis would answer in seconds.
    assert max(latencies) < 1.0, latencies


async def test_disconnect_abandons_pending_groups(serve) -> None:
    groups = split_groups(LONG_TEXT)
    assert len(groups) >= 4
    async with serve(delay=0.3) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text=LONG_TEXT).event())
            assert (await client.read()).type == "audio-start"  # type: ignore[union-attr]
            assert (await client.read()).type == "audio-chunk"  # type: ignore[union-attr]
        await asyncio.sleep(1.0)  # time for two or three more groups, were they run
        backend = server.backend
        # The first group was spoken; at most the next one was in flight.
        assert backend.asked == groups[: len(backend.asked)]
        assert len(backend.asked) <= 2, backend.asked
        assert len(backend.finished) + len(backend.cancelled) == len(backend.asked)
        abandoned = len(backend.asked)
        # The worker goes straight to the next client: no group of the
        # abandoned reply is run before (or after) it.
        async with connect(server.port) as client:
            await client.send(Synthesize(text="Next client.").event())
            reply = await client.read_reply()
        assert len(reply.audio) == fake_bytes("Next client.")
        assert backend.asked[abandoned:] == ["Next client."]


async def test_engine_error_sends_error_and_closes_others_served(serve) -> None:
    async with serve(fail_on="explode") as server:
        async with connect(server.port) as client:
            await client.send(
                Synthesize(text="Fine first. This will explode now.").event()
            )
            events = []
            while (event := await client.read()) is not None:
                events.append(event)
            types = [e.type for e in events]
        assert types[0] == "audio-start"
        assert types[-1] == "error"
        assert "audio-stop" not in types
        assert Error.from_event(events[-1]).code == "synthesis-failed"
        async with connect(server.port) as client:
            await client.send(Synthesize(text="Another client is fine.").event())
            reply = await client.read_reply()
        assert len(reply.audio) == fake_bytes("Another client is fine.")


async def test_malformed_event_gets_error_and_close(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(Event(type="synthesize", data={"voice": {"name": "default"}}))
        event = await client.read()
        assert event is not None and Error.is_type(event.type)
        assert Error.from_event(event).code == "bad-request"
        assert await client.read() is None
        assert server.backend.asked == []
    async with serve() as server, connect(server.port) as client:
        await client.send(Describe().event())
        assert (await client.read()) is not None  # others are served


async def test_health_check(serve) -> None:
    async with serve() as server:
        assert await check(f"tcp://127.0.0.1:{server.port}", timeout=5)
    assert not await check(f"tcp://127.0.0.1:{free_port()}", timeout=2)


async def test_unix_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tts.sock"
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    settings = Settings.of(default_voice="default")
    task = asyncio.create_task(
        run_server(
            FakeBackend(),
            settings.replace(server={"uri": f"unix://{path}"}),
            on_ready=on_ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 5)
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = Client(reader, writer)
        await client.send(Synthesize(text="Over a unix socket.").event())
        reply = await client.read_reply()
        await client.close()
        assert len(reply.audio) == fake_bytes("Over a unix socket.")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
