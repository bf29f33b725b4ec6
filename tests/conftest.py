"""Fixtures: the real server, in this process, on 127.0.0.1 with a fake backend."""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

import pytest

from tests.fakes import FakeBackend
from tests.wyoming_client import free_port
from wyoming_chatterbox.metrics import Metrics
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import Settings
from wyoming_chatterbox.speech import SpeechBackend


@dataclass
class RunningServer:
    port: int
    backend: Any
    task: "asyncio.Task[None]"


ServerFactory = Callable[..., "contextlib.AbstractAsyncContextManager[RunningServer]"]


@contextlib.asynccontextmanager
async def _serve(
    backend: SpeechBackend, settings: Settings, metrics: Optional[Metrics] = None
) -> AsyncIterator[RunningServer]:
    port = free_port()
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(
        run_server(
            backend,
            settings.replace(server={"uri": f"tcp://127.0.0.1:{port}"}),
            on_ready=on_ready,
            metrics=metrics,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    # run_server has called server.run(); give asyncio.start_server a moment.
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.01)
    try:
        yield RunningServer(port, backend, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def serve() -> Callable[..., "contextlib.AbstractAsyncContextManager[RunningServer]"]:
    """serve(delay=..., fail_on=..., streaming=..., samples_per_chunk=...,
    loudness=..., clean_text=..., sentence_silence=...)"""

    def factory(
        delay: float = 0.0,
        fail_on: "str | None" = None,
        streaming: bool = True,
        samples_per_chunk: int = 1024,
        loudness: "float | None" = None,
        clean_text: bool = False,
        sentence_silence: float = 0.0,
    ) -> "contextlib.AbstractAsyncContextManager[RunningServer]":
        # Loudness and text cleanup off unless asked: most tests check the fake
        # backend's exact samples for the exact text sent.
        settings = Settings.of(
            default_voice="default",
            streaming=streaming,
            samples_per_chunk=samples_per_chunk,
            loudness=loudness,
            clean_text=clean_text,
            sentence_silence=sentence_silence,
        )
        return _serve(FakeBackend(delay=delay, fail_on=fail_on), settings)

    return factory


@pytest.fixture
def serve_backend() -> (
    Callable[..., "contextlib.AbstractAsyncContextManager[RunningServer]"]
):
    """serve_backend(backend, settings, metrics=None): the real server around
    any backend."""
    return _serve
