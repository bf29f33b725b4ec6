"""The Turbo backend's fast path on the CPU: pieces within a group, each switch,
cancellation inside a group, and the flags.

The tiny test checkpoint's T3 stops after a handful of tokens, so these tests
force lengths through the `token_range` hook (as script/bench does). S3Gen is
full size: every streamed piece costs about a second here, so cases are few.
"""

import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from tests.test_model import checkpoint  # noqa: F401
from tests.test_model import ENV, ROOT, SAMPLES_PER_TOKEN, SILENCE_TOKENS, audible
from wyoming_chatterbox.settings import FastPath, ModelSettings
from wyoming_chatterbox.speech import (
    Budget,
    Piece,
    SamplingParams,
    SpeechJob,
    SynthesisCancelled,
)

pytestmark = pytest.mark.model

GREEDY = SamplingParams(top_k=1)
TEXT = "The kitchen light is on and the door is locked."


def make_backend(  # type: ignore[no-untyped-def]
    folder: Path, tokens: int, model: str = "turbo", **switches
):
    """Turbo (or Nano) on `folder`, every group exactly `tokens` long, loaded."""
    from wyoming_chatterbox.chatterbox.turbo import NanoBackend, TurboBackend

    class Forced(NanoBackend if model == "nano" else TurboBackend):  # type: ignore[misc]
        def token_range(self, text: str) -> Tuple[int, int]:
            return tokens, tokens

    backend = Forced(
        ModelSettings(
            models=(model,),
            model_dir=folder,
            data_dir=ROOT / ".cache" / "unused",
            device="cpu",
            fast=FastPath(**switches),
        )
    )
    backend.load()
    return backend


@pytest.fixture(scope="module")
def streaming(checkpoint: Path) -> Iterator:  # type: ignore[type-arg]  # noqa: F811
    backend = make_backend(checkpoint, 70, stream_in_group=True)
    yield backend
    backend.close()


def whole_job() -> SpeechJob:
    """TEXT as a one-shot reply's group (the listener waits for all of it)."""
    return SpeechJob(TEXT, "default", "en", GREEDY, whole=True)


def speak(backend, text: str = TEXT, params: SamplingParams = GREEDY) -> List[Piece]:  # type: ignore[no-untyped-def]
    return audible(backend.speak(SpeechJob(text, "default", "en", params)))


def test_a_one_shot_group_is_one_piece_and_one_s3gen_call(streaming) -> None:  # type: ignore[no-untyped-def]
    everything = list(streaming.speak(whole_job()))
    pieces = audible(everything)
    stats = streaming.group_stats[-1]
    assert len(pieces) == 1 and stats.pieces == 1
    # The worker had its turn after the prompt and after each block of 8 of
    # T3's 70 tokens, and the audio came last.
    assert len(everything) == 1 + 9 + 1 and everything[-1] is pieces[0]
    assert stats.s3gen_tokens == [70 + SILENCE_TOKENS]
    assert len(pieces[0].audio) == SAMPLES_PER_TOKEN * (70 + SILENCE_TOKENS)
    assert pieces[0].tokens == 70


def test_cpu_default_is_one_piece_per_group_and_cuda_streams() -> None:
    fast = FastPath()
    assert not fast.streams_in_group("cpu") and fast.streams_in_group("cuda")
    assert fast.resolved_dtype("cpu") == "int8"
    assert fast.resolved_dtype("cuda:0") == "bfloat16"
    assert fast.uses_graphs("cuda") and not fast.uses_graphs("cpu")
    assert not FastPath(static_cache=False).uses_graphs("cuda")
    assert fast.batch == 16  # on any device
    assert FastPath(t3_batch=1).batch == 1
    assert FastPath(static_cache=False).batch == 1


def test_two_groups_share_t3_steps(checkpoint: Path) -> None:  # noqa: F811
    """Two one-shot groups begun one after the other: each runs its prompt and
    hands the worker back, so the second is begun before the first's steps,
    and every step serves both; each still gets its own whole audio (one
    piece) from its own tokens."""
    backend = make_backend(checkpoint, 40, stream_in_group=False, t3_batch=2)
    try:
        assert backend.batch_size == 2
        first = backend.speak(whole_job())
        second = backend.speak(whole_job())
        head = [next(first), next(second)]  # the prompts
        assert backend._decoder.free_slots == 0
        assert not head[0].audio.size and not head[1].audio.size
        pieces = [audible(first), audible(second)]
        for group in pieces:
            assert len(group) == 1 and group[0].tokens == 40
            assert len(group[0].audio) == SAMPLES_PER_TOKEN * (40 + SILENCE_TOKENS)
        stats = list(backend.group_stats)[-2:]
        assert [s.t3_batch for s in stats] == [2.0, 2.0]
        assert backend._decoder.free_slots == 2
    finally:
        backend.close()


def test_a_group_comes_in_growing_pieces_that_add_up(streaming) -> None:  # type: ignore[no-untyped-def]
    pieces = speak(streaming)
    stats = streaming.group_stats[-1]
    assert stats.tokens == 70
    # First audio from the first 20-some tokens (one block of 8 may overshoot),
    # then pieces twice as long: 24, then 40 more, then the rest.
    assert 20 <= stats.s3gen_tokens[0] < 28
    assert len(pieces) >= 2
    assert sum(p.tokens for p in pieces) == 70
    audio = np.concatenate([p.audio for p in pieces])
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert np.abs(audio).max() <= 1.0
    assert len(audio) == SAMPLES_PER_TOKEN * (70 + SILENCE_TOKENS)
    # The first piece came long before the group was done.
    assert stats.first_piece_s < 0.8 * stats.total_s
    assert len(stats.watermark_s) >= len(pieces)


def test_each_switch_off_gives_the_same_length(checkpoint: Path) -> None:  # noqa: F811
    # Eager decode loop and whole-group S3Gen with the watermark inline: the
    # reference path must still speak every token.
    backend = make_backend(
        checkpoint,
        30,
        static_cache=False,
        stream_in_group=False,
        async_watermark=False,
    )
    try:
        pieces = speak(backend)
        assert len(pieces) == 1
        assert len(pieces[0].audio) == SAMPLES_PER_TOKEN * (30 + SILENCE_TOKENS)
        assert backend._decoder is None and backend._marker is None
        assert backend.batch_size == 1  # the library's loop: one group a step
        assert backend.group_stats[-1].t3_batch == 1.0
    finally:
        backend.close()


def test_bfloat16_t3_speaks_on_the_cpu(checkpoint: Path) -> None:  # noqa: F811
    backend = make_backend(checkpoint, 12, t3_dtype="bfloat16", stream_in_group=False)
    try:
        pieces = speak(backend)
        assert sum(len(p.audio) for p in pieces) == SAMPLES_PER_TOKEN * (12 + 3)
    finally:
        backend.close()


def test_a_stop_inside_a_group_ends_it_within_a_piece(streaming) -> None:  # type: ignore[no-untyped-def]
    stop = False
    group = streaming.speak(
        SpeechJob(TEXT, "default", "en", GREEDY, Budget(lambda: stop))
    )
    first = next(group)
    while not first.audio.size:  # the worker's turns between T3 blocks
        first = next(group)
    stop = True
    started = time.monotonic()
    with pytest.raises(SynthesisCancelled):
        next(group)
    # At most one S3Gen call (about a second here) was under way; no more
    # tokens or pieces were made.
    assert time.monotonic() - started < 0.5
    group.close()
    decoder = streaming._decoder
    assert decoder.free_slots >= 1  # the KV cache slot is back in the pool


def test_closing_a_half_spoken_group_frees_its_slot(streaming) -> None:  # type: ignore[no-untyped-def]
    decoder = streaming._decoder
    free = decoder.free_slots
    group = streaming.speak(SpeechJob(TEXT, "default", "en", GREEDY))
    next(group)
    assert decoder.free_slots == max(free - 1, 0)
    group.close()
    assert decoder.free_slots == max(free, 1)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--first-piece-tokens", "2"], "--first-piece-tokens must be 4 to 1000"),
        (["--t3-batch", "0"], "--t3-batch must be 1 to 64"),
    ],
)
def test_bad_speed_flags_are_refused_at_startup(flags: List[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wyoming_chatterbox", *flags],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert message in result.stderr


def test_s3gen_flow_in_bfloat16_matches_float32(checkpoint: Path) -> None:  # noqa: F811
    """--s3gen-dtype bfloat16 (the CPU default where the CPU has bfloat16):
    the same tokens and noise give the float32 audio within 30 dB SNR (59 dB
    measured on this checkpoint), and the streamed path's pieces still add
    up to the whole."""
    import copy
    import math

    import torch

    from wyoming_chatterbox.chatterbox.base import quiet
    from wyoming_chatterbox.chatterbox.s3stream import flow_in_bfloat16
    from wyoming_chatterbox.chatterbox.turbo_load import load_turbo_model

    model = load_turbo_model(checkpoint, "cpu")
    fast = copy.deepcopy(model.s3gen)
    flow_in_bfloat16(fast)
    tokens = torch.randint(0, 6561, (40,), generator=torch.Generator().manual_seed(1))

    def speak(s3gen):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        with torch.inference_mode(), quiet():
            wav, _ = s3gen.inference(
                speech_tokens=tokens, ref_dict=dict(model.conds.gen), n_cfm_timesteps=2
            )
        return wav

    reference, bf16 = speak(model.s3gen), speak(fast)
    assert reference.shape == bf16.shape
    noise = float(((reference - bf16) ** 2).sum())
    snr = 10 * math.log10(float((reference**2).sum()) / noise)
    assert 30 < snr < 200, snr  # close, and really computed in bfloat16


def test_int8_and_bfloat16_through_the_backend(checkpoint: Path) -> None:  # noqa: F811
    backend = make_backend(
        checkpoint, 30, t3_dtype="int8", s3gen_dtype="bfloat16", stream_in_group=True
    )
    try:
        assert backend.fast.t3_dtype == "int8" and backend._decoder.step.int8
        pieces = speak(backend)
        assert sum(p.tokens for p in pieces) == 30 and len(pieces) >= 2
        audio = np.concatenate([p.audio for p in pieces])
        assert len(audio) == SAMPLES_PER_TOKEN * (30 + SILENCE_TOKENS)
        assert np.isfinite(audio).all()
    finally:
        backend.close()
