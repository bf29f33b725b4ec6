"""The start-up self-check on the CPU, with injected faults.

A fake CUDA (tests/fake_cuda.py) lets the real capture protocol and the
self-check run on the CPU: graphs replay their bodies, so a fault injected
into the replays is what a broken graph on a GPU would do.
"""

import asyncio
import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import torch
from wyoming.tts import Synthesize

from tests.fake_cuda import FakeCuda
from tests.test_model import checkpoint  # noqa: F401
from tests.wyoming_client import connect, free_port
from wyoming_chatterbox.chatterbox import cuda_graphs, self_check
from wyoming_chatterbox.metrics import Metrics
from wyoming_chatterbox.server import run_server
from wyoming_chatterbox.settings import FastPath, ModelSettings, Settings
from wyoming_chatterbox.speech import ModelLoadError

pytestmark = pytest.mark.model

SELF_CHECK = "wyoming_chatterbox.chatterbox.self_check"
BASE = "wyoming_chatterbox.chatterbox.base"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """On a shared 2-core box OpenMP's spinning threads slow S3Gen down
    many times over (as in test_t3_decoder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_cuda(monkeypatch: Any) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(cuda_graphs, "CUDA", fake)
    return fake


# ------------------------------------------------------------- self-check


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Any:  # noqa: F811
    from wyoming_chatterbox.chatterbox.turbo import load_turbo_model

    return load_turbo_model(checkpoint, "cpu")


@pytest.fixture(scope="module")
def lively(model: Any) -> Any:
    """The model with T3's blocks redrawn at a scale where they matter (in
    the test checkpoint the embeddings drown them): a wrong block shows."""
    t3 = copy.deepcopy(model.t3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in t3.tfmr.h.parameters():
            if param.dim() == 2:
                shape = param.shape
                param.copy_(torch.randn(shape, generator=generator) / shape[0] ** 0.5)
    lively = copy.copy(model)
    lively.t3 = t3
    return lively


def test_the_decoder_check_tells_a_right_decoder_from_a_wrong_one(lively: Any) -> None:
    """Against the library's float32 transformer (measured: float32 4e-7,
    bfloat16 0.4 %, float16 0.05 %): every precision passes with room to
    spare; a decoder without one layer's MLP, or with the attention scale
    doubled, fails by far (measured 68 % and 35 %)."""
    from wyoming_chatterbox.chatterbox.t3_decoder import T3Decoder

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        decoder = T3Decoder(lively.t3, "cpu", dtype)
        error = self_check.check_decoder(decoder, lively)
        assert error < self_check.DECODER_TOLERANCE[dtype] / 5, dtype
        decoder.close()
    for fault in ("mlp", "scale"):
        wrong = T3Decoder(lively.t3, "cpu", torch.float32)
        layer = wrong.step.layers[0]
        if fault == "mlp":  # a new tensor: in float32 the weights are T3's own
            layer.mlp_w = torch.zeros_like(layer.mlp_w)
        else:
            layer.scale *= 2
        assert self_check.check_decoder(wrong, lively) > 0.2, fault
        wrong.close()


def _prepare(model: Any, **switches: Any) -> self_check.Setup:
    return self_check.prepare_fast_path(model, FastPath(**switches), "cpu")


def test_a_wrong_low_precision_decoder_falls_back_to_float32_then_the_library(
    model: Any, fake_cuda: FakeCuda, caplog: Any, monkeypatch: Any
) -> None:
    from wyoming_chatterbox.chatterbox.t3_step import T3Step

    monkeypatch.setitem(self_check.DECODER_TOLERANCE, torch.bfloat16, 0.0)
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(model, t3_dtype="bfloat16", stream_in_group=False)
    assert setup.decoder is not None and setup.decoder.dtype == torch.float32
    assert setup.decoder.cuda_graphs  # float32 passed: graphs captured, checked
    assert [r.getMessage()[:28] for r in caplog.records] == [
        "T3 in bfloat16 is off: it di"
    ]
    assert "T3 in float32" in setup.line and "turned off: T3 in bfloat16" in setup.line
    assert setup.state.self_check == "failed"
    setup.decoder.close()

    # Every step off by far: the library's own loop speaks.
    forward = T3Step._forward
    monkeypatch.setattr(
        T3Step, "_forward", lambda self, *args: 2.0 * forward(self, *args)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(model, stream_in_group=False)
    assert setup.decoder is None
    assert ["T3's fast decoder is off" in r.getMessage() for r in caplog.records] == [
        True
    ]
    assert "library decode loop" in setup.line
    assert setup.state.parts["static_cache"] is False


def test_graphs_that_replay_nothing_are_turned_off(
    model: Any, fake_cuda: FakeCuda, caplog: Any
) -> None:
    """A graph recorded on the wrong device or stream is empty: its replays do
    nothing, and the generation would emit token 0 to its budget."""
    fake_cuda.replay_fault = lambda graph: None
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(model, stream_in_group=False, t3_batch=4)
    assert setup.decoder is not None and not setup.decoder.cuda_graphs
    (record,) = caplog.records
    assert record.getMessage() == (
        "CUDA graphs are off: over 1 row(s) the graphs sampled other tokens "
        "than the eager step; decoding with the eager step (slower)"
    )
    setup.decoder.close()


def test_graphs_whose_replays_draw_the_same_numbers_are_turned_off(
    model: Any, fake_cuda: FakeCuda, caplog: Any, monkeypatch: Any
) -> None:
    """A sampled step replayed must draw fresh random numbers each time, not
    those fixed at capture."""

    def frozen_random(graph: Any) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            graph.body()

    fresh_draws = self_check._fresh_draws

    def with_frozen_random(*args: Any) -> bool:
        fake_cuda.replay_fault = frozen_random
        return fresh_draws(*args)

    monkeypatch.setattr(self_check, "_fresh_draws", with_frozen_random)
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(model, stream_in_group=False, t3_batch=2)
    assert setup.decoder is not None and not setup.decoder.cuda_graphs
    assert "drew the same random numbers" in caplog.text
    setup.decoder.close()


def test_a_sound_fast_path_passes_and_says_what_it_costs(
    model: Any, fake_cuda: FakeCuda, caplog: Any
) -> None:
    with caplog.at_level(logging.WARNING):
        setup = _prepare(model, stream_in_group=False, t3_batch=4)
    assert not caplog.records
    decoder = setup.decoder
    assert decoder is not None and decoder.cuda_graphs
    assert setup.state.self_check == "passed"
    assert setup.state.parts == {
        "static_cache": True,
        "cuda_graphs": True,
        "stream_in_group": False,
    }
    assert setup.state.capture_s is not None and setup.state.cache_bytes
    assert "self-check passed: decoder vs library 0.00%, graphs = eager" in setup.line
    assert f"KV cache made at load ({decoder.slot_memory / 1e9:.2f} GB)" in setup.line
    # Rows [0, 4): graphs of 1, 2 and 4 rows for every span.
    assert {n for n, _ in decoder.graphs.keys()} == {1, 2, 4}
    decoder.close()


def test_a_capture_failure_turns_graphs_off_and_a_broken_recovery_stops_the_start(
    model: Any, fake_cuda: FakeCuda, caplog: Any
) -> None:
    fake_cuda.fail_after = 3
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(model, stream_in_group=False, t3_batch=2)
    assert setup.decoder is not None and not setup.decoder.cuda_graphs
    assert "CUDA graphs are off: capturing T3's decode step failed" in caplog.text
    assert "--no-cuda-graphs" in caplog.text
    setup.decoder.close()
    fake_cuda.fail_next_end = 2  # the capture, then the recovery's own
    with pytest.raises(ModelLoadError, match="could not recover.*--no-cuda-graphs"):
        _prepare(model, stream_in_group=False)


def test_pieces_that_differ_from_a_whole_decode_are_turned_off(
    model: Any, fake_cuda: FakeCuda, caplog: Any, monkeypatch: Any
) -> None:
    """S3Gen in pieces against one whole decode of the voice's tokens: the
    real pieces pass by far, pieces whose seam is lost fail; and a failing
    check turns pieces off, with a WARNING."""
    decoded = self_check.decode_pieces_and_whole(model, 8)
    assert decoded is not None
    whole, pieces = decoded
    assert len(pieces) == 3 and all(len(piece) for piece in pieces)
    snr = self_check.pieces_snr(whole, pieces)
    assert snr > self_check.PIECES_MIN_SNR_DB + 10
    broken = [pieces[0], pieces[1][::-1], pieces[2]]
    assert self_check.pieces_snr(whole, broken) < self_check.PIECES_MIN_SNR_DB
    assert math.isnan(self_check.pieces_snr(whole, pieces[:2]))

    monkeypatch.setattr(self_check, "check_pieces", lambda model, first: 9.5)
    with caplog.at_level(logging.WARNING, logger=SELF_CHECK):
        setup = _prepare(
            model, static_cache=False, stream_in_group=True, first_piece_tokens=8
        )
    assert setup.pieces is False and not setup.state.parts["stream_in_group"]
    (record,) = caplog.records
    assert record.getMessage() == (
        "Audio in pieces within a sentence group is off: the pieces differ from "
        "a whole decode (9.5 dB, at least 15 expected); one piece per group"
    )
    assert "one piece per group" in setup.line


# ------------------------------------------------------------ the server


@contextlib.asynccontextmanager
async def _server(backend: Any, metrics: Metrics) -> AsyncIterator[int]:
    port = free_port()
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    settings = Settings.of(uri=f"tcp://127.0.0.1:{port}", warm_up=False, loudness=None)
    task = asyncio.create_task(
        run_server(backend, settings, on_ready=on_ready, metrics=metrics)
    )
    await asyncio.wait_for(ready.wait(), 120)
    try:
        yield port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_server_starts_warns_and_speaks_with_the_eager_step(
    checkpoint: Path, fake_cuda: FakeCuda, caplog: Any, tmp_path: Path  # noqa: F811
) -> None:
    """Graphs that disagree with the eager step (here: replays that do
    nothing): the server still starts, says once what it turned off and
    why, speaks without replaying a graph, and its metrics say so."""
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend

    fake_cuda.replay_fault = lambda graph: None
    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint,
            data_dir=tmp_path,
            device="cpu",
            fast=FastPath(stream_in_group=False, t3_batch=2),
        )
    )
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="wyoming_chatterbox"):
        async with _server(backend, metrics) as port:
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            # (base warns that this is a test checkpoint)
            assert [r.name for r in warnings if r.name != BASE] == [SELF_CHECK]
            assert (
                warnings[-1].getMessage().startswith("CUDA graphs are off: over 1 row")
            )
            (line,) = [m for m in caplog.messages if m.startswith("Speed settings")]
            assert line.endswith("self-check failed, turned off: CUDA graphs")
            replays = len(fake_cuda.replays)
            async with connect(port) as client:
                await client.send(Synthesize(text="The light is on.").event())
                reply = await client.read_reply()
            assert len(reply.audio) > 0
            assert len(fake_cuda.replays) == replays  # the eager step spoke
            text = metrics.render().decode()
    assert (
        'wyoming_chatterbox_fast_path{part="cuda_graphs",t3_dtype="float32"} 0.0'
        in text
    )
    assert (
        'wyoming_chatterbox_fast_path{part="static_cache",t3_dtype="float32"} 1.0'
        in text
    )
    assert 'part="self_check_passed",t3_dtype="float32"} 0.0' in text
    assert 'wyoming_chatterbox_fast_path_memory_bytes{kind="kv_cache"}' in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_cuda_the_self_check_passes_on_this_gpu(
    checkpoint: Path, tmp_path: Path, caplog: Any, dtype: str  # noqa: F811
) -> None:
    """On a real GPU: every part passes its check and stays on, and speaks."""
    from wyoming_chatterbox.chatterbox.turbo import TurboBackend
    from wyoming_chatterbox.speech import SpeechJob

    backend = TurboBackend(
        ModelSettings(
            model_dir=checkpoint,
            data_dir=tmp_path,
            device="cuda",
            fast=FastPath(t3_dtype=dtype),
        )
    )
    with caplog.at_level(logging.INFO, logger="wyoming_chatterbox"):
        backend.load()
    try:
        print(next(m for m in caplog.messages if m.startswith("Speed settings")))
        state = backend.fast_path()
        assert state is not None and state.self_check == "passed", caplog.text
        assert all(state.parts.values())
        pieces = list(backend.speak(SpeechJob("The light is on.", "default", "en")))
        assert sum(piece.audio.size for piece in pieces) > 0
    finally:
        backend.close()
