"""The model's load and unload on request (the web page's buttons), and the
progress count a front end shows; both served by the one worker thread."""

import asyncio
import threading
from typing import List

import pytest

from tests.fakes import FakeBackend
from wyoming_chatterbox.engine import LOAD, UNLOAD, EngineBusy, EngineWorker
from wyoming_chatterbox.settings import EngineSettings
from wyoming_chatterbox.speech import EngineError, SamplingParams

PARAMS = SamplingParams()


class ThreadRecording(FakeBackend):
    """Notes which thread loads and closes it."""

    def __init__(self, fail_loads: int = 0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.threads: List[str] = []
        self.fail_loads = fail_loads

    def load(self) -> None:
        self.threads.append(threading.current_thread().name)
        if self.loads >= 1 and self.fail_loads:
            self.fail_loads -= 1
            raise RuntimeError("no GPU memory left")
        super().load()

    def close(self) -> None:
        self.threads.append(threading.current_thread().name)
        super().close()


async def test_unload_and_load_run_on_the_worker() -> None:
    backend = ThreadRecording()
    worker = EngineWorker(backend, EngineSettings(warm_up=False))
    await worker.start()
    await worker.model_request(UNLOAD)
    assert not worker.model_loaded and backend.closes == 1
    await worker.model_request(UNLOAD)  # already unloaded: nothing to do
    assert backend.closes == 1
    await worker.model_request(LOAD)
    assert worker.model_loaded and backend.loads == 2
    await worker.model_request(LOAD)  # already loaded
    assert backend.loads == 2
    assert set(backend.threads) == {"chatterbox-worker"}
    await worker.stop()


async def test_unload_is_refused_while_a_reply_runs() -> None:
    backend = FakeBackend(delay=0.3)
    worker = EngineWorker(backend, EngineSettings(warm_up=False))
    await worker.start()
    stream = worker.open_stream("default", PARAMS)
    stream.add_group("Still speaking.")
    with pytest.raises(EngineBusy, match="1 replies are in progress"):
        await worker.model_request(UNLOAD)
    stream.close()
    pieces = [piece async for piece in stream.pieces()]
    assert len(pieces) == 1 and worker.model_loaded
    await worker.model_request(UNLOAD)  # now it may
    assert not worker.model_loaded
    await worker.stop()


async def test_a_failed_load_says_why_and_the_next_reply_tries_again() -> None:
    backend = ThreadRecording(fail_loads=1)
    worker = EngineWorker(backend, EngineSettings(warm_up=False))
    await worker.start()
    await worker.model_request(UNLOAD)
    with pytest.raises(RuntimeError, match="no GPU memory left"):
        await worker.model_request(LOAD)
    assert not worker.model_loaded
    stream = worker.open_stream("default", PARAMS)
    stream.add_group("Hello.")
    stream.close()
    pieces = [piece async for piece in stream.pieces()]
    assert len(pieces) == 1 and worker.model_loaded
    await worker.stop()


async def test_requests_after_stop_are_refused() -> None:
    worker = EngineWorker(FakeBackend(), EngineSettings(warm_up=False))
    await worker.start()
    assert worker.running
    await worker.stop()
    assert not worker.running
    with pytest.raises(EngineError):
        await worker.model_request(LOAD)


async def test_groups_made_counts_each_groups_end() -> None:
    backend = FakeBackend(delay=0.05)
    worker = EngineWorker(backend, EngineSettings(warm_up=False))
    await worker.start()
    stream = worker.open_stream("default", PARAMS)
    for text in ("One.", "Two.", "Three."):
        stream.add_group(text)
    stream.close()
    seen = []
    async for _ in stream.pieces():
        seen.append(stream.groups_made)
    assert stream.groups_made == 3
    assert seen == sorted(seen) and seen[0] <= 1
    await asyncio.sleep(0)
    await worker.stop()
