"""The worker: order, fairness, bounded look-ahead, cancellation, failures."""

import asyncio
import time
from typing import List

import numpy as np
import pytest

from tests.fakes import FakeBackend, fake_samples
from wyoming_chatterbox.engine import EngineError, EngineWorker, SamplingParams

PARAMS = SamplingParams()


async def collect(stream) -> List[np.ndarray]:  # type: ignore[no-untyped-def]
    return [piece.audio async for piece in stream.pieces()]


async def started_worker(backend: FakeBackend) -> EngineWorker:
    worker = EngineWorker(backend)
    await worker.start()
    assert backend.loaded
    return worker


async def test_groups_come_out_in_order() -> None:
    backend = FakeBackend()
    worker = await started_worker(backend)
    stream = worker.open_stream("default", PARAMS)
    groups = ["One.", "Two two.", "Three three three."]
    for group in groups:
        stream.add_group(group)
    stream.close()
    pieces = await asyncio.wait_for(collect(stream), 5)
    assert [len(p) for p in pieces] == [fake_samples(g) for g in groups]
    assert backend.asked == groups
    await worker.stop()
    assert backend.closed


async def test_streams_take_turns() -> None:
    backend = FakeBackend(delay=0.02)
    worker = await started_worker(backend)
    a = worker.open_stream("default", PARAMS)
    b = worker.open_stream("default", PARAMS)
    for i in range(4):
        a.add_group(f"a{i}")
    for i in range(4):
        b.add_group(f"b{i}")
    a.close()
    b.close()
    await asyncio.wait_for(asyncio.gather(collect(a), collect(b)), 5)
    # b's first group is not queued behind all of a's.
    assert backend.asked.index("b0") <= 2, backend.asked
    await worker.stop()


async def test_a_stream_not_read_is_not_generated_far_ahead() -> None:
    backend = FakeBackend()
    worker = await started_worker(backend)
    stream = worker.open_stream("default", PARAMS)
    for i in range(6):
        stream.add_group(f"group {i}")
    stream.close()
    await asyncio.sleep(0.3)
    assert len(backend.asked) == worker.max_groups_ahead  # bounded memory
    pieces = await asyncio.wait_for(collect(stream), 5)
    assert len(pieces) == 6
    await worker.stop()


async def test_cancel_drops_pending_and_stops_group_in_flight() -> None:
    backend = FakeBackend(delay=0.5)
    worker = await started_worker(backend)
    stream = worker.open_stream("default", PARAMS)
    for i in range(5):
        stream.add_group(f"group {i}")
    await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 5)
    cancelled_at = time.monotonic()
    stream.cancel()
    other = worker.open_stream("default", PARAMS)
    other.add_group("next")
    other.close()
    await asyncio.wait_for(collect(other), 5)
    # "next" started at once, not after the 0.5 s group that was in flight.
    assert backend.asked_at[1] - cancelled_at < 0.1
    assert backend.asked == ["group 0", "next"]
    assert backend.cancelled == ["group 0"]
    await worker.stop()


async def test_failure_raises_in_its_stream_only() -> None:
    backend = FakeBackend(fail_on="bad")
    worker = await started_worker(backend)
    broken = worker.open_stream("default", PARAMS)
    for group in ["good.", "bad.", "never."]:
        broken.add_group(group)
    broken.close()
    with pytest.raises(EngineError, match="fake engine failure"):
        await asyncio.wait_for(collect(broken), 5)
    fine = worker.open_stream("default", PARAMS)
    fine.add_group("still fine.")
    fine.close()
    assert len(await asyncio.wait_for(collect(fine), 5)) == 1
    assert "never." not in backend.asked
    await worker.stop()


async def test_load_failure_is_raised_by_start() -> None:
    class Broken(FakeBackend):
        def load(self) -> None:
            raise RuntimeError("no model here")

    with pytest.raises(RuntimeError, match="no model here"):
        await EngineWorker(Broken()).start()
