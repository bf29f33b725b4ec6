"""Float waveforms to 16-bit PCM and fixed-size chunks. Pure numpy, no I/O."""

from typing import Iterator

import numpy as np

# Every Chatterbox model speaks at 24 kHz (S3Gen's output rate).
SAMPLE_RATE = 24000
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


def fade_in(n: int) -> np.ndarray:
    """Raised-cosine ramp; with 1 - ramp as fade-out the gains sum to 1, so a
    crossfade of two nearly equal signals keeps their level and stays in
    [-1, 1] (a Hamming pair as in CosyVoice sums to up to 1.08)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


class Crossfader:
    """Joins audio made in overlapping calls: each call's output starts with a
    crossfade from the tail the call before held back."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self._fade_in = fade_in(samples)
        self._tail = np.zeros(0, np.float32)

    def join(self, signal: np.ndarray, start: int, end: int, final: bool) -> np.ndarray:
        """signal[start:end], its first samples crossfaded with the held tail;
        unless `final`, the crossfade's worth after `end` is held for the next."""
        out = np.array(signal[start:end], dtype=np.float32)
        n = len(self._tail)
        if n:
            fade = self._fade_in[:n] if n == self.samples else fade_in(n)
            out[:n] = self._tail * (1 - fade) + out[:n] * fade
        self._tail = np.zeros(0, np.float32)
        if not final:
            self._tail = np.array(signal[end : end + self.samples], dtype=np.float32)
        return out
