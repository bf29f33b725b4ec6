"""A small Wyoming client for tests: events over a real socket or pipe."""

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.tts import SynthesizeStopped

TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Reply:
    """What a client received for one reply."""

    events: List[Event] = field(default_factory=list)

    @property
    def types(self) -> List[str]:
        return [event.type for event in self.events]

    @property
    def audio(self) -> bytes:
        return b"".join(
            AudioChunk.from_event(e).audio
            for e in self.events
            if AudioChunk.is_type(e.type)
        )

    @property
    def chunks(self) -> List[AudioChunk]:
        return [
            AudioChunk.from_event(e) for e in self.events if AudioChunk.is_type(e.type)
        ]

    def compact_types(self) -> List[str]:
        """Event types with runs of audio-chunk collapsed to one entry."""
        out: List[str] = []
        for kind in self.types:
            if not (kind == "audio-chunk" and out and out[-1] == "audio-chunk"):
                out.append(kind)
        return out


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def send(self, *events: Event) -> None:
        for event in events:
            await async_write_event(event, self.writer)

    async def read(self, timeout: float = TIMEOUT) -> Optional[Event]:
        return await asyncio.wait_for(async_read_event(self.reader), timeout)

    async def read_reply(
        self, streaming: bool = False, timeout: float = TIMEOUT
    ) -> Reply:
        """Read until audio-stop (one-shot) or synthesize-stopped (stream)."""
        reply = Reply()
        end = SynthesizeStopped if streaming else AudioStop

        async def collect() -> None:
            while True:
                event = await async_read_event(self.reader)
                if event is None:
                    raise ConnectionError(f"closed after {reply.compact_types()}")
                reply.events.append(event)
                if end.is_type(event.type):
                    return

        await asyncio.wait_for(collect(), timeout)
        return reply

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    try:
        yield client
    finally:
        await client.close()


def audio_format(event: Event) -> Tuple[int, int, int]:
    if AudioStart.is_type(event.type):
        start = AudioStart.from_event(event)
        return (start.rate, start.width, start.channels)
    chunk = AudioChunk.from_event(event)
    return (chunk.rate, chunk.width, chunk.channels)
