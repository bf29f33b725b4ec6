"""Model lifecycle and shutdown: warm-up, idle unload and reload, SIGTERM.

The engine, handler and server are the real ones; the model is a fake.
"""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from wyoming.audio import AudioChunk, AudioStop
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from tests.fakes import FakeBackend, FakeClipBackend, fake_bytes
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import ModelSettings, Settings

ROOT = Path(__file__).resolve().parents[1]


def settings(**kwargs) -> Settings:  # type: ignore[no-untyped-def]
    base = dict(default_voice="default", loudness=None, clean_text=False)
    base.update(kwargs)
    return Settings.of(**base)  # type: ignore[arg-type]


async def wait_until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_warm_up_speaks_once_before_listening(
    serve_backend, tmp_path: Path
) -> None:
    backend = FakeClipBackend(ModelSettings(data_dir=tmp_path, device="cpu"))
    async with serve_backend(backend, settings(warm_up=True)):
        assert len(backend.spoken) == 1  # before the server was ready
        text, conds, language = backend.spoken[0]
        assert "warm-up" in text and conds == {"voice": "default"}


async def test_idle_unload_frees_the_model_and_the_next_request_reloads(
    serve_backend,
) -> None:
    backend = FakeBackend()
    async with serve_backend(backend, settings(idle_unload=0.3)) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text="Hello there.").event())
            await client.read_reply()
            started = time.monotonic()
            await wait_until(lambda: backend.closes == 1)
            assert 0.2 < time.monotonic() - started < 2.0
            assert not backend.loaded

            # Describe still lists the voices without the model.
            await client.send(Describe().event())
            event = await client.read()
            assert event is not None
            assert [v.name for v in Info.from_event(event).tts[0].voices] == ["default"]
            assert backend.loads == 1

            await client.send(Synthesize(text="Back again.").event())
            reply = await client.read_reply()
            assert len(reply.audio) == fake_bytes("Back again.")
            assert backend.loads == 2 and backend.loaded


async def test_no_unload_while_a_stream_is_open(serve_backend) -> None:
    backend = FakeBackend()
    async with serve_backend(backend, settings(idle_unload=0.2)) as server:
        async with connect(server.port) as client:
            await client.send(SynthesizeStart().event())
            await client.send(SynthesizeChunk(text="The LLM is thinking").event())
            await asyncio.sleep(0.6)  # three idle periods, the stream still open
            assert backend.closes == 0
            await client.send(SynthesizeChunk(text=" slowly.").event())
            await client.send(SynthesizeStop().event())
            reply = await client.read_reply(streaming=True)
            assert len(reply.audio) == fake_bytes("The LLM is thinking slowly.")
        await wait_until(lambda: backend.closes == 1)


async def test_without_idle_unload_the_model_stays(serve_backend) -> None:
    backend = FakeBackend()
    async with serve_backend(backend, settings()) as server:
        async with connect(server.port) as client:
            await client.send(Synthesize(text="Hi.").event())
            await client.read_reply()
        await asyncio.sleep(0.5)
        assert backend.closes == 0


class Stopper:
    """A stop signal the test gives, in place of SIGTERM."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()


async def start_server(backend: FakeBackend, grace: float):  # type: ignore[no-untyped-def]
    port = free_port()
    ready = asyncio.Event()
    stopper = Stopper()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(
        run_server(
            backend,
            settings(shutdown_grace=grace, uri=f"tcp://127.0.0.1:{port}"),
            on_ready=on_ready,
            stop_signal=stopper.wait,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    return port, stopper, task


async def test_stop_lets_a_short_reply_finish(tmp_path: Path) -> None:
    backend = FakeBackend(delay=0.3)
    port, stopper, task = await start_server(backend, grace=3.0)
    async with connect(port) as client:
        await client.send(Synthesize(text="Almost done here.").event())
        await asyncio.wait_for(asyncio.to_thread(backend.started.wait), 5)
        stopper.event.set()
        reply = await client.read_reply()
        assert len(reply.audio) == fake_bytes("Almost done here.")
        assert await client.read() is None  # then the connection closes
    await asyncio.wait_for(task, 5)
    assert backend.closed  # the model was released


async def test_stop_cuts_a_long_reply_with_audio_stop(tmp_path: Path) -> None:
    text = "First part of it. " + "Then a long, long tail that takes ages. " * 3
    backend = FakeBackend(delay=0.4)
    port, stopper, task = await start_server(backend, grace=0.6)
    async with connect(port) as client:
        await client.send(Synthesize(text=text).event())
        await client.read()  # audio-start
        first = await client.read()  # the first group's audio
        assert first is not None and first.type == "audio-chunk"
        started = time.monotonic()
        stopper.event.set()
        events = []
        while True:
            event = await client.read(timeout=5)
            if event is None:
                break
            events.append(event)
        assert AudioStop.is_type(events[-1].type)
        assert len(events) < 100  # not the whole reply
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 3.0
    assert backend.closed
    assert backend.cancelled or len(backend.finished) < len(backend.asked) + 2
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_requests_during_shutdown_are_refused_clearly() -> None:
    backend = FakeBackend(delay=1.0)
    port, stopper, task = await start_server(backend, grace=3.0)
    async with connect(port) as client, connect(port) as idle:
        await client.send(Synthesize(text="Keep the server busy.").event())
        await asyncio.wait_for(asyncio.to_thread(backend.started.wait), 5)
        stopper.event.set()
        assert await idle.read() is None  # an idle connection is closed at once
        await client.send(Synthesize(text="Too late.").event())
        events = []
        while (event := await client.read()) is not None:
            events.append(event)
    errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
    assert [error.code for error in errors] == ["shutting-down"]
    audio = b"".join(
        AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type)
    )
    assert len(audio) == fake_bytes("Keep the server busy.")  # finished in grace
    assert AudioStop.is_type(events[-1].type)
    assert backend.asked == ["Keep the server busy."]
    await asyncio.wait_for(task, 5)


async def read_line(stream: Optional[asyncio.StreamReader], marker: bytes) -> None:
    assert stream is not None
    while True:
        line = await asyncio.wait_for(stream.readline(), 20)
        assert line, f"process ended before printing {marker!r}"
        if marker in line:
            return


async def test_sigterm_ends_replies_and_exits_zero() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "fake_server.py"),
        "--uri",
        f"tcp://127.0.0.1:{port}",
        "--delay",
        "5",
        "--grace",
        "0.5",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await read_line(process.stderr, b"Ready on")
        async with connect(port) as client:
            await client.send(Synthesize(text="A reply that takes a while.").event())
            assert (await client.read()).type == "audio-start"  # type: ignore[union-attr]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            event = await client.read(timeout=5)
            assert event is not None and AudioStop.is_type(event.type)
            assert await client.read(timeout=5) is None
        code = await asyncio.wait_for(process.wait(), 5)
        assert code == 0
        assert time.monotonic() - started < 3.0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_idle_time_counts_from_ready_not_from_start(serve_backend) -> None:
    class SlowLoad(FakeBackend):
        def load(self) -> None:
            time.sleep(0.5)  # longer than the idle time
            super().load()

    backend = SlowLoad()
    async with serve_backend(backend, settings(idle_unload=0.3)):
        await asyncio.sleep(0.15)
        assert backend.closes == 0  # not unloaded at once
        await wait_until(lambda: backend.closes == 1)
