"""No pattern of held, silent or half-open connections locks Home Assistant out.

The real server over loopback with the fake model. Clients bind to addresses
of 127.0.0.0/8 to be told apart (Home Assistant is 127.0.0.2); the held
connections come from 127.0.1.x. Bounded: at most 100 connections, each test
a few seconds.
"""

import asyncio
import contextlib
import logging
import socket
import time
from typing import AsyncIterator, Awaitable, Callable, List, Optional, Tuple

import pytest
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import FakeBackend, fake_bytes
from tests.wyoming_client import Client
from wyoming_chatterbox import handler
from wyoming_chatterbox.admission import MIN_IDLE_S
from wyoming_chatterbox.metrics import Metrics
from wyoming_chatterbox.settings import Settings

HOME_ASSISTANT = "127.0.0.2"
SHORT = "Hello there."


def settings(**kwargs: object) -> Settings:
    return Settings.of(
        default_voice="default", loudness=None, clean_text=False, **kwargs
    )


async def open_from(address: str, port: int) -> Client:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(address, 0)
    )
    return Client(reader, writer)


@contextlib.asynccontextmanager
async def held(clients: List[Client]) -> AsyncIterator[List[Client]]:
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def until_closed(client: Client, timeout: float) -> Tuple[List[Event], float]:
    """Every event until the server closes, and when it closed."""
    events: List[Event] = []

    async def collect() -> None:
        with contextlib.suppress(ConnectionError):
            while (event := await async_read_event(client.reader)) is not None:
                events.append(event)

    await asyncio.wait_for(collect(), timeout)
    return events, time.monotonic()


async def home_assistant_is_served(port: int) -> None:
    """A Describe and a short one-shot Synthesize, from Home Assistant."""
    client = await open_from(HOME_ASSISTANT, port)
    try:
        await client.send(Describe().event())
        info = await client.read(timeout=5)
        assert info is not None and Info.is_type(info.type), info
        await client.send(Synthesize(text=SHORT).event())
        reply = await client.read_reply(timeout=5)
        assert len(reply.audio) == fake_bytes(SHORT)
    finally:
        await client.close()


def error_code(events: List[Event]) -> Optional[str]:
    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    return errors[-1].code if errors else None


async def test_64_silent_streams_neither_lock_out_nor_stay_for_ever(
    serve_backend,
) -> None:
    """Each of 8 clients holds 8 streams and sends nothing more (a client that
    crashed mid-reply, say): Home Assistant is served while they are held, and
    after the stream timeout each is answered and closed; what a stream had
    received is spoken."""
    timeout = 2.0
    metrics = Metrics()
    async with serve_backend(
        FakeBackend(), settings(stream_timeout=timeout), metrics
    ) as server:
        clients = [
            await open_from(f"127.0.1.{a}", server.port)
            for a in range(1, 9)
            for _ in range(8)
        ]
        async with held(clients):
            for client in clients:
                await client.send(SynthesizeStart().event())
            # The last one has some text, cut mid-sentence, when it goes silent.
            await clients[-1].send(SynthesizeChunk(text="Let me check that").event())
            last_event = time.monotonic()
            await asyncio.sleep(MIN_IDLE_S + 0.2)
            started = time.monotonic()
            await home_assistant_is_served(server.port)
            assert time.monotonic() - started < 1.0
            ends = await asyncio.gather(
                *(until_closed(client, timeout + 3) for client in clients)
            )
    evicted = [events for events, _ in ends if error_code(events) == "evicted"]
    answered = [(e, at) for e, at in ends if e and e[-1].type == "synthesize-stopped"]
    assert len(evicted) == 1 and len(answered) == 63  # one made room for HA
    for events, closed_at in answered:
        assert timeout - 0.1 < closed_at - last_event < timeout + 1.5
        assert [e.type for e in events][0] == "audio-start"
    spoken = ends[-1][0]
    assert sum(len(e.payload or b"") for e in spoken) == fake_bytes("Let me check that")
    scrape = metrics.render().decode()
    assert "wyoming_chatterbox_stream_timeouts_total 63.0" in scrape
    assert (
        'wyoming_chatterbox_connections_evicted_total{reason="server-full"} 1.0'
        in scrape
    )


async def test_a_stream_that_keeps_sending_is_not_timed_out(serve_backend) -> None:
    """The clock counts from the last event, not from the start: an LLM that
    writes slowly, for longer than the stream timeout in all, is heard out."""
    words = ["Slowly", " but", " surely", " it", " ends."]
    async with serve_backend(FakeBackend(), settings(stream_timeout=0.5)) as server:
        client = await open_from(HOME_ASSISTANT, server.port)
        await client.send(SynthesizeStart().event())
        for word in words:
            await asyncio.sleep(0.3)  # 1.5 s in all
            await client.send(SynthesizeChunk(text=word).event())
        await client.send(SynthesizeStop().event())
        reply = await client.read_reply(streaming=True)
        assert len(reply.audio) == fake_bytes("".join(words))
        await client.close()


async def test_64_half_open_connections_make_room(serve_backend) -> None:
    """Connections that send part of a header and then nothing (or nothing at
    all) are the first to make room."""
    async with serve_backend(FakeBackend(), settings()) as server:
        clients = [
            await open_from(f"127.0.1.{a}", server.port)
            for a in range(1, 9)
            for _ in range(8)
        ]
        async with held(clients):
            for index, client in enumerate(clients):
                if index % 2:
                    client.writer.write(b'{"type": "desc')
            await asyncio.sleep(MIN_IDLE_S + 0.2)
            await home_assistant_is_served(server.port)
            await eventually(lambda: still_open(clients), 63)


async def test_one_client_in_a_loop_gets_at_most_its_share(
    serve_backend, caplog: pytest.LogCaptureFixture
) -> None:
    """One client opening 100 connections, each holding a stream, holds at most
    --max-connections-per-client at a time; Home Assistant is served
    meanwhile, and the log has a line for the client, not one per refusal."""
    cap = 8
    caplog.set_level(logging.WARNING)
    metrics = Metrics()
    async with serve_backend(FakeBackend(), settings(), metrics) as server:
        clients: List[Client] = []
        async with held(clients):
            for _ in range(100):
                client = await open_from("127.0.1.1", server.port)
                clients.append(client)
                await client.send(SynthesizeStart().event())
                await asyncio.sleep(0.02)  # 2 s in all: some were idle a second
                assert open_connections(metrics) <= cap
            await eventually(lambda: still_open(clients), cap)
            await home_assistant_is_served(server.port)
    scrape = metrics.render().decode()
    assert 'connections_evicted_total{reason="client-limit"}' in scrape
    assert 'connections_refused_total{reason="client-limit"}' in scrape
    lines = [r.getMessage() for r in caplog.records if "127.0.1.1" in r.getMessage()]
    assert len(lines) == 1, lines  # refusals and evictions: one line a minute


def open_connections(metrics: Metrics) -> float:
    """Connections the server holds, as a scrape reports them."""
    for line in metrics.render().decode().splitlines():
        if line.startswith("wyoming_chatterbox_connections "):
            return float(line.split()[1])
    raise AssertionError("no wyoming_chatterbox_connections gauge")


async def still_open(clients: List[Client]) -> int:
    """How many of the connections the server has not closed: a closed one
    got an error saying why."""
    count = 0
    for client in clients:
        if client.reader.at_eof():
            continue
        try:
            events, _ = await until_closed(client, 0.01)
        except asyncio.TimeoutError:
            count += 1
        else:
            assert error_code(events) in ("too-many-connections", "evicted")
    return count


async def eventually(count: Callable[[], Awaitable[int]], expected: int) -> None:
    """`count()` settles at `expected` within 3 s (the server closes what it
    evicts or refuses within a moment)."""
    deadline = time.monotonic() + 3
    while (found := await count()) != expected:
        assert time.monotonic() < deadline, f"{found} open, not {expected}"
        await asyncio.sleep(0.05)


async def test_a_full_server_evicts_the_idle_never_the_speaking(serve_backend) -> None:
    """Full: a newcomer takes the place of the idle connection, not that of an
    older one whose reply is being made; with every connection speaking, it is
    turned away, and the speakers get all their audio."""
    text = "A reply that takes the model a while."
    async with serve_backend(
        FakeBackend(delay=2.5), settings(max_connections=2)
    ) as server:
        await asyncio.sleep(0.2)  # the fixture's own probe has gone
        speaking = await open_from("127.0.1.1", server.port)
        await speaking.send(Synthesize(text=text).event())
        first = await speaking.read()  # audio-start; then nothing for 2.5 s
        assert first is not None and first.type == "audio-start"
        idle = await open_from("127.0.1.2", server.port)  # fresher than it
        await asyncio.sleep(MIN_IDLE_S + 0.2)
        newcomer = await open_from(HOME_ASSISTANT, server.port)
        events, _ = await until_closed(idle, 2)
        assert error_code(events) == "evicted"
        await newcomer.send(Synthesize(text=SHORT).event())
        await asyncio.sleep(0.1)
        late = await open_from("127.0.1.3", server.port)  # both speak now
        events, _ = await until_closed(late, 2)
        assert error_code(events) == "too-many-connections"
        assert "none of them idle" in Error.from_event(events[-1]).text
        reply = await newcomer.read_reply(timeout=10)
        assert len(reply.audio) == fake_bytes(SHORT)
        reply = await speaking.read_reply(timeout=10)
        assert len(reply.audio) == fake_bytes(text)
        for client in (speaking, idle, newcomer, late):
            await client.close()


async def test_a_client_that_stops_reading_can_be_evicted(
    serve_backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply whose audio nobody reads is not speaking to anyone: when the
    server is full, that connection makes room."""
    monkeypatch.setattr(handler, "STALLED_WRITE_S", 0.3)
    text = "This sentence is spoken over and over again. " * 400
    async with serve_backend(FakeBackend(), settings(max_connections=1)) as server:
        await asyncio.sleep(0.2)  # the fixture's own probe has gone
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.1.1", 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        await async_write_event(Synthesize(text=text).event(), writer)
        first = await async_read_event(reader)  # let in
        assert first is not None and first.type == "audio-start"
        await asyncio.sleep(MIN_IDLE_S + 0.3)  # not reading: the writes stall
        await home_assistant_is_served(server.port)
        writer.close()
