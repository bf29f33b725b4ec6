"""Streamed text: sentences held back to fill a group go early, before a silence.

A streamed reply's groups hold up to three sentences; the third may take the LLM
seconds to write.  When the listener would run out of audio first, the complete
sentences already held go to the engine at once, as a smaller group.
"""

import asyncio
import time
from typing import Iterator, List

import numpy as np
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import FakeBackend
from tests.wyoming_client import connect
from wyoming_chatterbox.engine import EngineWorker
from wyoming_chatterbox.sentences import IncrementalSplitter, split_groups
from wyoming_chatterbox.settings import Settings
from wyoming_chatterbox.speech import Piece, SamplingParams, SpeechJob

PARAMS = SamplingParams()
SETTINGS = Settings.of(default_voice="default", loudness=None, clean_text=False)


class SecondsBackend(FakeBackend):
    """Speaks `seconds` of audio per group, whatever its length."""

    def __init__(self, seconds: float, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self.seconds = seconds

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        for _ in super().speak(job):
            yield Piece(np.zeros(int(self.seconds * self.sample_rate), np.float32))


# --- the splitter -----------------------------------------------------------


def test_release_hands_over_complete_sentences_only() -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed("Sure! It is sunny. The high is ") == ["Sure!"]
    assert splitter.waiting == 1  # "It is sunny." waits for two more
    assert splitter.release() == ["It is sunny."]
    assert splitter.waiting == 0
    assert splitter.release() == []
    # The sentence being written was not touched, and later ones pack afresh.
    assert splitter.feed("twenty. Wind is light. Rain later. Bye") == []
    assert splitter.flush() == ["The high is twenty. Wind is light. Rain later. Bye"]


def test_release_keeps_the_group_limits() -> None:
    splitter = IncrementalSplitter()
    assert splitter.feed("Go. One. Two. Three. Four. Next ") == ["Go."]
    assert splitter.waiting == 4  # "Four." may still join the group before it
    assert splitter.release() == ["One. Two. Three.", "Four."]


def test_without_release_streaming_still_equals_whole_text() -> None:
    text = "Sure! It is sunny. The high is twenty. Wind is light. Rain later."
    splitter = IncrementalSplitter()
    out = [group for char in text for group in splitter.feed(char)]
    assert out + splitter.flush() == split_groups(text)


# --- the engine's side: how long until the listener runs dry -----------------


async def test_starving_in_follows_the_listener() -> None:
    now = [100.0]
    backend = SecondsBackend(seconds=2.0)
    worker = EngineWorker(backend, clock=lambda: now[0])
    await worker.start()
    try:
        stream = worker.open_stream("default", PARAMS)
        assert stream.starving_in() == 0.0  # nothing to hear yet: now
        idle = asyncio.Event()
        stream.on_idle(idle.set)
        stream.add_group("Hello.")
        pieces = stream.pieces()
        await asyncio.wait_for(pieces.__anext__(), 5)
        await asyncio.wait_for(idle.wait(), 5)
        lead = worker.release_lead()
        # Group began and ended at clock 100: first piece in 0 s.
        assert lead == worker.RELEASE_MARGIN_S
        assert stream.starving_in() == 2.0 - lead
        now[0] += 1.5
        assert abs(stream.starving_in() - (0.5 - lead)) < 1e-9  # type: ignore[operator]
        backend.delay = 1.0
        backend.started.clear()
        stream.add_group("More.")
        await asyncio.to_thread(backend.started.wait, 5)
        assert stream.starving_in() is None  # the worker has text: more is coming
        stream.cancel()
        assert stream.starving_in() is None
    finally:
        await worker.stop()


async def test_release_lead_grows_with_a_slow_first_piece() -> None:
    backend = SecondsBackend(seconds=0.1, delay=0.2)
    worker = EngineWorker(backend)
    await worker.start()
    try:
        assert worker.release_lead() == (
            worker.RELEASE_LEAD_FACTOR * worker.FIRST_PIECE_GUESS_S
            + worker.RELEASE_MARGIN_S
        )
        stream = worker.open_stream("default", PARAMS)
        stream.add_group("One.")
        stream.close()
        async for _ in stream.pieces():
            pass
        lead = worker.release_lead()
        assert 2 * 0.2 + 0.25 <= lead < 2 * 0.4 + 0.25
    finally:
        await worker.stop()


# --- the server: what a listener hears --------------------------------------


async def send_text(client, text: str) -> None:  # type: ignore[no-untyped-def]
    await client.send(SynthesizeChunk(text=text).event())


async def test_a_short_first_sentence_does_not_leave_a_silence(serve_backend) -> None:
    """'Sure!' plays in 0.3 s; the next group's third sentence comes 2 s later."""
    backend = SecondsBackend(seconds=0.3)
    async with serve_backend(backend, SETTINGS) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await send_text(client, "Sure! It is sunny today. The ")
            await asyncio.sleep(2.0)
            third_sent = time.monotonic()
            await send_text(client, "high is twenty. Wind is light.")
            await client.send(SynthesizeStop().event())
            reply = await client.read_reply(streaming=True)
    assert reply.types[-1] == "synthesize-stopped"
    assert backend.asked[:2] == [
        "Sure!",
        "It is sunny today.",  # alone: the listener was running dry
    ]
    assert " ".join(backend.asked) == (
        "Sure! It is sunny today. The high is twenty. Wind is light."
    )
    # Handed over about when "Sure!" ran out (0.3 s, less the lead), not when
    # the text that would have filled its group came.
    assert backend.asked_at[1] < third_sent - 1.0


async def test_a_long_first_sentence_keeps_groups_whole(serve_backend) -> None:
    """With seconds of audio queued, sentences wait to fill their group."""
    backend = SecondsBackend(seconds=5.0)
    async with serve_backend(backend, SETTINGS) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await send_text(client, "Sure! It is sunny today. The ")
            await asyncio.sleep(0.5)
            await send_text(client, "high is twenty. Wind is light. And ")
            await asyncio.sleep(0.3)
            await send_text(client, "that is all.")
            await client.send(SynthesizeStop().event())
            reply = await client.read_reply(streaming=True, timeout=30)
    assert reply.types[-1] == "synthesize-stopped"
    text = (
        "Sure! It is sunny today. The high is twenty. Wind is light. And that is all."
    )
    assert backend.asked == split_groups(text)
    assert len(backend.asked) == 2


async def test_the_watch_ends_with_the_reply(serve_backend) -> None:
    def watchers() -> List[asyncio.Task]:  # type: ignore[type-arg]
        return [
            task
            for task in asyncio.all_tasks()
            if "_release_early" in repr(task.get_coro())
        ]

    backend = SecondsBackend(seconds=5.0)
    async with serve_backend(backend, SETTINGS) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await send_text(client, "Sure! It is sunny today. The ")
            await client.read(timeout=5)
            assert len(watchers()) == 1
        # The client left mid-reply: the watch is cancelled with its work.
        for _ in range(100):
            if not watchers():
                break
            await asyncio.sleep(0.01)
        assert watchers() == []
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await send_text(client, "Sure! It is sunny today. The ")
            await client.send(SynthesizeStop().event())
            await client.read_reply(streaming=True, timeout=30)
        await asyncio.sleep(0)
        assert watchers() == []


async def test_no_early_release_waits_for_full_groups(serve_backend) -> None:
    """--no-early-release: the old behaviour, groups as split_groups makes them."""
    from wyoming_chatterbox.__main__ import build_parser

    args = build_parser().parse_args(["--no-early-release"])
    assert args.no_early_release
    settings = Settings.of(
        default_voice="default", loudness=None, clean_text=False, early_release=False
    )
    backend = SecondsBackend(seconds=0.3)
    text = "Sure! It is sunny today. The high is twenty. Wind is light."
    async with serve_backend(backend, settings) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await send_text(client, "Sure! It is sunny today. The ")
            await asyncio.sleep(1.0)
            await send_text(client, "high is twenty. Wind is light.")
            await client.send(SynthesizeStop().event())
            await client.read_reply(streaming=True)
    assert backend.asked == split_groups(text)
    assert backend.asked[1] == "It is sunny today. The high is twenty. Wind is light."
