"""Float to PCM16 conversion and chunking."""

import numpy as np
import pytest

from wyoming_chatterbox.audio import float_to_pcm16, iter_chunks


def as_int16(pcm: bytes) -> list:
    return np.frombuffer(pcm, dtype="<i2").tolist()


def test_pcm16_scale_round_and_clip() -> None:
    audio = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -2.0, 1e-6], dtype=np.float32)
    assert as_int16(float_to_pcm16(audio)) == [
        0,
        16384,
        -16384,
        32767,
        -32767,
        32767,
        -32767,
        0,
    ]


def test_pcm16_nan_and_inf_are_safe() -> None:
    audio = np.array([np.nan, np.inf, -np.inf], dtype=np.float32)
    assert as_int16(float_to_pcm16(audio)) == [0, 32767, -32767]


def test_pcm16_accepts_2d_and_float64() -> None:
    audio = np.full((1, 5), 0.25, dtype=np.float64)
    assert as_int16(float_to_pcm16(audio)) == [8192] * 5


def test_pcm16_empty() -> None:
    assert float_to_pcm16(np.zeros(0, dtype=np.float32)) == b""


@pytest.mark.parametrize(
    "samples, per_chunk, sizes",
    [
        (0, 4, []),
        (3, 4, [6]),
        (4, 4, [8]),
        (10, 4, [8, 8, 4]),
        (1024, 1024, [2048]),
    ],
)
def test_chunks(samples: int, per_chunk: int, sizes: list) -> None:
    pcm = bytes(range(256)) * 100
    pcm = pcm[: samples * 2]
    chunks = list(iter_chunks(pcm, per_chunk))
    assert [len(c) for c in chunks] == sizes
    assert b"".join(chunks) == pcm


def test_chunks_reject_zero() -> None:
    with pytest.raises(ValueError):
        list(iter_chunks(b"\x00\x00", 0))
