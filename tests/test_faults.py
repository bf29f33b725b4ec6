"""Faults inside the server: the affected client gets an error, the others are
served, and a server that cannot go on exits instead of hanging."""

import asyncio
import time

import pytest
from wyoming.error import Error
from wyoming.tts import Synthesize

from tests.fakes import FakeBackend, fake_bytes
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.engine import EngineWorker
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import Settings
from wyoming_chatterbox.speech import EngineDied


def settings() -> Settings:
    return Settings.of(default_voice="default", loudness=None, clean_text=False)


class OutOfMemory(FakeBackend):
    """Runs out of GPU memory on texts with 'huge' in them, as CUDA would."""

    def speak(self, job):  # type: ignore[no-untyped-def]
        import torch

        if "huge" in job.text:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        yield from super().speak(job)


async def test_out_of_memory_fails_one_reply_and_the_server_goes_on(
    serve_backend,
) -> None:
    backend = OutOfMemory(delay=0.2)
    async with serve_backend(backend, settings()) as server:
        async with connect(server.port) as victim, connect(server.port) as other:
            await other.send(Synthesize(text="A normal request here.").event())
            await victim.send(Synthesize(text="A huge request.").event())
            events = []
            while (event := await victim.read()) is not None:
                events.append(event)
            errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
            assert [e.code for e in errors] == ["synthesis-failed"]
            assert "CUDA out of memory" in errors[0].text
            reply = await other.read_reply()
            assert len(reply.audio) == fake_bytes("A normal request here.")
        async with connect(server.port) as later:
            await later.send(Synthesize(text="Still here?").event())
            reply = await later.read_reply()
            assert len(reply.audio) == fake_bytes("Still here?")
        assert not server.task.done()


async def test_a_dead_worker_ends_the_server_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_step = EngineWorker._step

    def step(self, stream, text):  # type: ignore[no-untyped-def]
        if text is not None and "crash" in text:
            raise SystemError("a bug in the worker loop")
        real_step(self, stream, text)

    monkeypatch.setattr(EngineWorker, "_step", step)
    backend = FakeBackend()
    port = free_port()
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    never = asyncio.Event()
    task = asyncio.create_task(
        run_server(
            backend,
            settings().replace(server={"uri": f"tcp://127.0.0.1:{port}"}),
            on_ready=on_ready,
            stop_signal=never.wait,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    async with connect(port) as client:
        await client.send(Synthesize(text="Please crash now.").event())
        started = time.monotonic()
        events = []
        while (event := await client.read(timeout=5)) is not None:
            events.append(event)
        errors = [Error.from_event(e) for e in events if Error.is_type(e.type)]
        assert [e.code for e in errors] == ["synthesis-failed"]
        assert "speech engine stopped" in errors[0].text
    with pytest.raises(EngineDied, match="a bug in the worker loop"):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 5
    assert backend.closed  # the model was still released
