"""Float waveforms to 16-bit PCM and fixed-size chunks. Pure numpy, no I/O."""

from typing import Iterator

import numpy as np

SAMPLE_WIDTH = 2  # bytes, 16-bit
CHANNELS = 1


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """Mono float samples in [-1, 1] to little-endian 16-bit PCM, clipped, rounded."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    pcm = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return pcm.tobytes()


def iter_chunks(pcm: bytes, samples_per_chunk: int) -> Iterator[bytes]:
    """Cut PCM into chunks of `samples_per_chunk` samples; the last may be shorter."""
    if samples_per_chunk <= 0:
        raise ValueError("samples_per_chunk must be positive")
    step = samples_per_chunk * SAMPLE_WIDTH * CHANNELS
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step]
