"""The worker: order, fairness, bounded look-ahead, cancellation, failures."""

import asyncio
import threading
import time
from typing import List

import numpy as np
import pytest

from tests.fakes import FakeBackend, fake_samples
from wyoming_chatterbox.engine import EngineWorker
from wyoming_chatterbox.settings import EngineSettings
from wyoming_chatterbox.speech import (
    NOTHING_YET,
    EngineError,
    Piece,
    SamplingParams,
    SynthesisCancelled,
)

PARAMS = SamplingParams()


async def collect(stream) -> List[np.ndarray]:  # type: ignore[no-untyped-def]
    return [piece.audio async for piece in stream.pieces()]


async def started_worker(backend: FakeBackend, **settings) -> EngineWorker:  # type: ignore[no-untyped-def]
    worker = EngineWorker(backend, EngineSettings(**settings))
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
    backend = FakeBackend(delay=2.0)
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
    # "next" started at once, not after the 2 s group that was in flight.
    assert backend.asked_at[1] - cancelled_at < 1.0
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


class PiecewiseBackend(FakeBackend):
    """Speaks each group in `pieces` pieces of `piece_seconds` of audio, taking
    `delay` seconds per piece; records (text, piece index) as it makes them and
    which groups were closed, and on what thread."""

    def __init__(self, pieces: int, piece_seconds: float, delay: float) -> None:
        super().__init__()
        self.pieces = pieces
        self.piece_seconds = piece_seconds
        self.piece_delay = delay
        self.made: List[tuple] = []
        self.closed_groups: List[tuple] = []

    def speak(self, job):  # type: ignore[no-untyped-def]
        text, should_stop = job.text, job.budget.should_stop
        self.asked.append(text)
        self.started.set()
        made = 0
        try:
            for index in range(self.pieces):
                deadline = time.monotonic() + self.piece_delay
                while time.monotonic() < deadline:
                    if should_stop():
                        raise SynthesisCancelled()
                    time.sleep(0.001)
                self.made.append((text, index))
                made += 1
                samples = int(self.piece_seconds * self.sample_rate)
                yield Piece(audio=np.full(samples, 0.1, np.float32))
        finally:
            self.closed_groups.append((text, made, threading.current_thread().name))


async def test_a_short_reply_is_not_starved_by_a_long_group() -> None:
    # One long group of 20 pieces, then a short reply arrives: its piece is made
    # after at most a piece or two of the long one, not after all 20.
    backend = PiecewiseBackend(pieces=20, piece_seconds=0.5, delay=0.02)
    worker = await started_worker(backend)
    long = worker.open_stream("default", PARAMS)
    long.add_group("long")
    long.close()
    reader = asyncio.ensure_future(collect(long))
    while len(backend.made) < 3:
        await asyncio.sleep(0.005)
    short = worker.open_stream("default", PARAMS)
    short.add_group("short")
    short.close()
    await asyncio.wait_for(collect(short), 5)
    first_short = backend.made.index(("short", 0))
    assert first_short <= 6, backend.made
    assert len(await asyncio.wait_for(reader, 5)) == 20
    # Every piece of each group, in order.
    assert [i for t, i in backend.made if t == "long"] == list(range(20))
    await worker.stop()


async def test_the_reply_whose_listener_runs_dry_first_goes_first() -> None:
    # a has 5 s of audio buffered after its first piece; b has 0.05 s per piece:
    # b's pieces go before a's second.
    backend = PiecewiseBackend(pieces=3, piece_seconds=0.05, delay=0.01)
    worker = await started_worker(backend)
    backend.piece_seconds = 5.0
    a = worker.open_stream("default", PARAMS)
    a.add_group("a")
    a.close()
    reader = asyncio.ensure_future(collect(a))
    while not backend.made:
        await asyncio.sleep(0.001)
    backend.piece_seconds = 0.05
    b = worker.open_stream("default", PARAMS)
    b.add_group("b")
    b.close()
    await asyncio.wait_for(asyncio.gather(reader, collect(b)), 5)
    order = [t for t, _ in backend.made]
    assert order.index("b") < 3 and order[-1] == "a", backend.made
    assert order.count("b") == 3 and order.count("a") == 3
    await worker.stop()


async def test_cancel_closes_a_half_spoken_group_on_the_worker_thread() -> None:
    # 500 pieces (5 s at least): on a loaded machine the cancel still comes
    # long before the group could end by itself.
    backend = PiecewiseBackend(pieces=500, piece_seconds=0.1, delay=0.01)
    worker = await started_worker(backend)
    stream = worker.open_stream("default", PARAMS)
    stream.add_group("doomed")
    while len(backend.made) < 3:
        await asyncio.sleep(0.002)
    stream.cancel()
    deadline = time.monotonic() + 5
    while not backend.closed_groups and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    assert len(backend.closed_groups) == 1
    text, made, thread = backend.closed_groups[0]
    assert text == "doomed" and made < 500 and thread == "chatterbox-worker"
    made_then = len(backend.made)
    await asyncio.sleep(0.1)
    assert len(backend.made) == made_then  # nothing more made for it
    await worker.stop()


async def test_stop_closes_groups_left_half_spoken() -> None:
    backend = PiecewiseBackend(pieces=50, piece_seconds=10.0, delay=0.01)
    worker = await started_worker(backend, max_groups_ahead=1)
    stream = worker.open_stream("default", PARAMS)
    stream.add_group("unfinished")
    while len(backend.made) < 1:
        await asyncio.sleep(0.002)
    await worker.stop()
    assert [t for t, _, _ in backend.closed_groups] == ["unfinished"]
    assert backend.closed


async def test_groups_begun_at_once_are_capped() -> None:
    # Each begun group holds model state: with a cap of 2, a third stream's
    # group begins only when one of the first two has finished.
    backend = PiecewiseBackend(pieces=5, piece_seconds=0.1, delay=0.005)
    worker = EngineWorker(backend, EngineSettings(max_active_groups=2))
    await worker.start()
    streams = [worker.open_stream("default", PARAMS) for _ in range(3)]
    for index, stream in enumerate(streams):
        stream.add_group(f"s{index}")
        stream.close()
    await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 5)
    first_s2 = backend.made.index(("s2", 0))
    done = [t for t, i in backend.made[:first_s2] if i == 4]
    assert done, backend.made  # s0 or s1 finished before s2 began
    assert len(backend.made) == 15
    await worker.stop()


class SteppingBackend(FakeBackend):
    """Speaks each group in `steps` model steps, handing the worker back after
    each (NOTHING_YET), then one piece: `seconds[text]` of audio (0.1 s by
    default). Records (text, step) as it makes them; advances `batch_size`
    groups a step as far as the engine can tell."""

    def __init__(self, steps: int, batch: int = 1) -> None:
        super().__init__()
        self.steps = steps
        self.batch = batch
        self.seconds: dict = {}
        self.made: List[tuple] = []

    @property
    def batch_size(self) -> int:
        return self.batch

    def speak(self, job):  # type: ignore[no-untyped-def]
        text, should_stop = job.text, job.budget.should_stop
        self.asked.append(text)
        for step in range(self.steps):
            if should_stop():
                raise SynthesisCancelled()
            time.sleep(0.002)
            self.made.append((text, step))
            yield NOTHING_YET
        samples = int(self.seconds.get(text, 0.1) * self.sample_rate)
        yield Piece(audio=np.full(samples, 0.1, np.float32), tokens=self.steps)


async def test_between_model_steps_another_reply_can_go_first() -> None:
    # a's listener has 5 s of audio when a's second group begins its 30 steps;
    # b, new, goes at a's next step, not once a's group is done. The readers
    # see audio only: the steps hand the worker back without a piece.
    backend = SteppingBackend(steps=30)
    backend.seconds = {"a0": 5.0}
    worker = await started_worker(backend)
    a = worker.open_stream("default", PARAMS)
    a.add_group("a0")
    a.add_group("a1")
    a.close()
    reader = asyncio.ensure_future(collect(a))
    while ("a1", 2) not in backend.made:
        await asyncio.sleep(0.001)
    b = worker.open_stream("default", PARAMS)
    b.add_group("b")
    b.close()
    b_audio = await asyncio.wait_for(collect(b), 5)
    a_audio = await asyncio.wait_for(reader, 5)
    assert [len(p) for p in b_audio] == [2400]
    assert [len(p) for p in a_audio] == [120000, 2400]
    made = backend.made
    assert made.index(("b", 29)) < made.index(("a1", 29)), made
    assert made.index(("b", 0)) <= made.index(("a1", 2)) + 3, made
    await worker.stop()


@pytest.mark.parametrize("batch", [1, 4])
async def test_a_batching_backend_gets_new_groups_begun_first(batch: int) -> None:
    # a (no audio yet) is stepping when b's group comes. Served by deadline,
    # a goes on to its end before b begins; a backend that steps several
    # groups at once gets b begun at a's next step (b then rides along), and
    # a still goes before b after that.
    backend = SteppingBackend(steps=30, batch=batch)
    worker = await started_worker(backend)
    a = worker.open_stream("default", PARAMS)
    a.add_group("a")
    a.close()
    reader = asyncio.ensure_future(collect(a))
    while ("a", 2) not in backend.made:
        await asyncio.sleep(0.001)
    b = worker.open_stream("default", PARAMS)
    b.add_group("b")
    b.close()
    await asyncio.wait_for(asyncio.gather(reader, collect(b)), 5)
    made = backend.made
    if batch == 1:
        assert made.index(("b", 0)) > made.index(("a", 29)), made
    else:
        assert made.index(("b", 0)) <= made.index(("a", 2)) + 3, made
        assert made.index(("b", 1)) > made.index(("a", 29)), made
    await worker.stop()
