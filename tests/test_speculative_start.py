"""Streamed text: the first sentence is begun at its full stop, on a guess.

The splitter is sure a sentence has ended only once a whole word of the next one
has come ("Dr." is no end). The first sentence is begun before that, in a stream
of its own, and its audio is played only if the guess was right.
"""

import asyncio
import time

import numpy as np
import pytest
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import FakeBackend, fake_bytes
from tests.wyoming_client import connect
from wyoming_chatterbox.audio import float_to_pcm16
from wyoming_chatterbox.engine import EngineWorker
from wyoming_chatterbox.sentences import IncrementalSplitter
from wyoming_chatterbox.settings import EngineSettings, Settings
from wyoming_chatterbox.speech import SamplingParams

PARAMS = SamplingParams()
RATE = 24000


def settings(**changes) -> Settings:  # type: ignore[no-untyped-def]
    base = dict(default_voice="default", loudness=None, clean_text=False)
    base.update(changes)
    return Settings.of(**base)  # type: ignore[arg-type]


# --- the splitter's guess ---------------------------------------------------


@pytest.mark.parametrize(
    "text, guess",
    [
        ("Good morning!", "Good morning!"),
        ("Is it  raining?", "Is it raining?"),
        ("It is 3 p.m.", "It is 3 p.m."),
        ('He said "hi."', 'He said "hi."'),
        ("We met Dr.", None),  # an abbreviation, before a name
        ("The U.S.", None),
        ("For example, e.g.", None),
        ("Good morning", None),  # no full stop yet
        ("Good morning! It", None),  # the next word is coming: no new guess
    ],
)
def test_tentative_first_sentence(text: str, guess: "str | None") -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed(text) == []
    assert splitter.tentative_first() == guess


def test_a_guess_lives_until_a_word_shows_it_wrong() -> None:
    splitter = IncrementalSplitter()
    splitter.feed("It is 3 p.m.")
    guess = splitter.tentative_first()
    assert guess == "It is 3 p.m."
    splitter.feed(" about")  # not a whole word yet: could still be "About."
    assert splitter.first_still_possible(guess)
    assert splitter.feed(" the ") == []  # "about" was lower case: no end
    assert not splitter.first_still_possible(guess)


def test_a_right_guess_is_the_first_group() -> None:
    splitter = IncrementalSplitter()
    splitter.feed("Good morning!")
    guess = splitter.tentative_first()
    assert guess is not None
    assert splitter.feed(" It") == [] and splitter.first_still_possible(guess)
    assert splitter.feed(" is") == [guess]
    assert splitter.tentative_first() is None  # only the first sentence


# --- the engine: one stream's audio following another's -----------------------


async def test_a_following_stream_waits_and_carries_on() -> None:
    backend = FakeBackend(delay=0.2)
    worker = EngineWorker(
        backend, EngineSettings(sentence_silence=0.25, loudness=-16.0)
    )
    await worker.start()
    try:
        first = worker.open_stream("default", PARAMS)
        rest = worker.open_stream("default", PARAMS)
        first.add_group("Hello there.")
        first.close()
        rest.follow(first)
        rest.add_group("Second group.")
        rest.close()
        assert rest.starving_in() is None  # its audio comes after first's
        first_audio = [p.audio async for p in first.pieces()]
        rest_audio = [p.audio async for p in rest.pieces()]
        # Begun only after the first had spoken, not interleaved with it.
        assert backend.asked == ["Hello there.", "Second group."]
        assert backend.asked_at[1] - backend.asked_at[0] >= 0.2
        # The pause between groups is there, and the reply's one gain is kept.
        assert len(first_audio) == 1
        assert rest_audio[0].size == int(0.25 * RATE)
        assert rest._state.loudness is first._state.loudness is not None
    finally:
        await worker.stop()


# --- the server -------------------------------------------------------------


async def test_the_first_sentence_is_begun_at_its_full_stop(serve) -> None:
    async with serve() as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        await client.send(SynthesizeChunk(text="Good morning!").event())
        start = await client.read()
        assert start is not None and start.type == "audio-start"
        for _ in range(100):
            if server.backend.finished:
                break
            await asyncio.sleep(0.01)
        # Spoken already, but not played: the end is not certain yet.
        assert server.backend.finished == ["Good morning!"]
        with pytest.raises(asyncio.TimeoutError):
            await client.read(timeout=0.3)
        await client.send(SynthesizeChunk(text=" It is sunny today. Bye").event())
        chunk = await client.read()
        assert chunk is not None and chunk.type == "audio-chunk"
        await client.send(SynthesizeStop().event())
        rest = await client.read_reply(streaming=True)
    # The guess was right: spoken once, heard once, in its place.
    assert server.backend.asked[0] == "Good morning!"
    assert server.backend.asked.count("Good morning!") == 1
    text = "Good morning! It is sunny today. Bye"
    assert len(chunk.payload or b"") + len(rest.audio) == fake_bytes(text)


async def test_a_wrong_guess_is_never_heard(serve) -> None:
    # The first group comes in the same chunk that shows the guess wrong.
    text = "It is 3 p.m. about the trip. Bye now"
    async with serve() as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        await client.send(SynthesizeChunk(text="It is 3 p.m.").event())
        for _ in range(100):
            if server.backend.finished:
                break
            await asyncio.sleep(0.01)
        assert server.backend.finished == ["It is 3 p.m."]  # made, then dropped
        await client.send(SynthesizeChunk(text=" about the trip. Bye now").event())
        await client.send(SynthesizeStop().event())
        reply = await client.read_reply(streaming=True)
    assert server.backend.asked[1:] == ["It is 3 p.m. about the trip.", "Bye now"]
    # Only the real groups' audio: the guess's (group 1 in the fake's levels)
    # never reached the client.
    assert len(reply.audio) == fake_bytes(text)
    assert reply.audio[:2] == float_to_pcm16(np.full(1, 0.002, np.float32))


async def test_a_wrong_guess_in_flight_is_stopped(serve) -> None:
    async with serve(delay=1.0) as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        await client.send(SynthesizeChunk(text="It is 3 p.m.").event())
        await asyncio.to_thread(server.backend.started.wait, 5)
        shown_wrong = time.monotonic()
        await client.send(SynthesizeChunk(text=" about the trip. Bye").event())
        await client.send(SynthesizeStop().event())
        await client.read_reply(streaming=True, timeout=10)
    assert server.backend.cancelled == ["It is 3 p.m."]
    # The real first group began as soon as the guess was dropped, not after
    # the guess's full second.
    assert server.backend.asked_at[1] - shown_wrong < 0.5


async def test_a_client_that_leaves_stops_the_guess(serve) -> None:
    async with serve(delay=1.0) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await client.send(SynthesizeChunk(text="Good morning!").event())
            await asyncio.to_thread(server.backend.started.wait, 5)
        for _ in range(100):
            if server.backend.cancelled:
                break
            await asyncio.sleep(0.01)
        assert server.backend.cancelled == ["Good morning!"]


async def test_pauses_between_groups_follow_a_guessed_first(serve) -> None:
    text = "Good morning! It is sunny today. Bye now."
    async with serve(sentence_silence=0.25) as server, connect(server.port) as client:
        await client.send(SynthesizeStart().event())
        await client.send(SynthesizeChunk(text="Good morning!").event())
        await asyncio.sleep(0.2)
        await client.send(SynthesizeChunk(text=text[len("Good morning!") :]).event())
        await client.send(SynthesizeStop().event())
        reply = await client.read_reply(streaming=True)
        groups = server.backend.asked
    assert groups[0] == "Good morning!" and len(groups) >= 2
    pause = int(0.25 * RATE) * 2
    assert len(reply.audio) == fake_bytes(text) + pause * (len(groups) - 1)


async def test_no_speculative_start_waits_for_the_next_word(serve_backend) -> None:
    backend = FakeBackend()
    async with serve_backend(backend, settings(speculative_start=False)) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await client.send(SynthesizeChunk(text="Good morning!").event())
            await asyncio.sleep(0.3)
            assert backend.asked == []
            await client.send(SynthesizeChunk(text=" It is sunny.").event())
            await client.send(SynthesizeStop().event())
            await client.read_reply(streaming=True)
    assert backend.asked == ["Good morning!", "It is sunny."]
