"""Many clients at once: every reply complete, in order, never mixed with another
client's, and Describe answered throughout.

The fake model encodes each group's text in its audio (a level from a checksum
of the text), so a client can check its audio against its own request, byte for
byte. The short version runs in CI; the figures go to the log (run with -s).
"""

import asyncio
import statistics
import time
import zlib
from typing import Iterator, List

import numpy as np
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import SAMPLES_PER_CHAR, FakeBackend
from tests.wyoming_client import connect
from wyoming_chatterbox.audio import float_to_pcm16
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.speech import Piece, SpeechJob

CLIENTS = 32
REPLIES_PER_CLIENT = 3


def level(group: str) -> float:
    return (zlib.crc32(group.encode()) % 900 + 50) / 1000.0


def spoken(text: str) -> np.ndarray:
    """Each word as a constant level that identifies it: the same audio however
    the words were grouped (a stream may hand sentences over early)."""
    return np.concatenate(
        [
            np.full(len(word) * SAMPLES_PER_CHAR, level(word), np.float32)
            for word in text.split()
        ]
    )


def expected_pcm(text: str) -> bytes:
    return float_to_pcm16(spoken(text))


class EchoBackend(FakeBackend):
    """Speaks each word of a group as a constant level that identifies it."""

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        for _ in super().speak(job):
            yield Piece(audio=spoken(job.text), tokens=len(job.text))


def reply_text(client: int, reply: int) -> str:
    return (
        f"Client {client} asks for reply {reply}. "
        f"It has a second sentence, number {client * 7 + reply}. And a third one."
    )


async def one_client(port: int, index: int, failures: List[str]) -> None:
    async with connect(port) as client:
        for reply in range(REPLIES_PER_CLIENT):
            text = reply_text(index, reply)
            streamed = (index + reply) % 2 == 1
            if streamed:
                await client.send(SynthesizeStart().event())
                for i in range(0, len(text), 9):
                    await client.send(SynthesizeChunk(text=text[i : i + 9]).event())
                await client.send(SynthesizeStop().event())
            else:
                await client.send(Synthesize(text=text).event())
            got = await client.read_reply(streaming=streamed, timeout=60)
            if got.audio != expected_pcm(text):
                failures.append(f"client {index} reply {reply}")


async def test_32_clients_get_their_own_complete_replies(serve_backend) -> None:
    from wyoming_chatterbox.settings import Settings

    backend = EchoBackend(delay=0.002)
    # All 32 clients are 127.0.0.1 here: no per-address cap (tests/test_lockout.py).
    settings = Settings.of(
        default_voice="default",
        loudness=None,
        clean_text=False,
        max_connections_per_client=None,
    )
    latencies: List[float] = []
    failures: List[str] = []
    async with serve_backend(backend, settings) as server:
        done = asyncio.Event()

        async def describer() -> None:
            async with connect(server.port) as client:
                while not done.is_set():
                    started = time.perf_counter()
                    await client.send(Describe().event())
                    event = await client.read(timeout=10)
                    latencies.append(time.perf_counter() - started)
                    assert event is not None and Info.is_type(event.type)
                    await asyncio.sleep(0.01)

        watcher = asyncio.create_task(describer())
        started = time.perf_counter()
        await asyncio.gather(
            *(one_client(server.port, i, failures) for i in range(CLIENTS))
        )
        elapsed = time.perf_counter() - started
        done.set()
        await watcher

    assert failures == []
    # Every word spoken once: nothing twice, nothing lost, however grouped.
    expected_words = sorted(
        word
        for c in range(CLIENTS)
        for r in range(REPLIES_PER_CLIENT)
        for group in split_groups(reply_text(c, r))
        for word in group.split()
    )
    assert sorted(w for group in backend.finished for w in group.split()) == (
        expected_words
    )
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\n{CLIENTS} clients x {REPLIES_PER_CLIENT} replies in {elapsed:.2f} s; "
        f"Describe during load: n={len(latencies)} "
        f"p50={statistics.median(latencies) * 1000:.1f} ms p99={p99 * 1000:.1f} ms"
    )
    assert len(latencies) >= 10
    # Not a speed claim (the figure is printed): a loop that waited on the model
    # or on a slow client would take seconds here.
    assert p99 < 0.5
