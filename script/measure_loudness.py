"""Loudness normaliser figures: accuracy against pyloudnorm, and time per piece.

    .venv/bin/python script/measure_loudness.py
"""

import sys
import time
from pathlib import Path

import pyloudnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_speech import speech_like  # noqa: E402
from wyoming_chatterbox.loudness import LoudnessNormalizer  # noqa: E402

RATE = 24000


def main() -> None:
    meter = pyloudnorm.Meter(RATE)
    for target in (-16.0, -20.0):
        normalizer = LoudnessNormalizer(RATE, target)
        audio = speech_like(8.0, -27.0)
        started = time.perf_counter()
        out = normalizer.process(audio)
        spent = time.perf_counter() - started
        print(
            f"target {target}: out {meter.integrated_loudness(out.astype(float)):.2f} "
            f"LUFS, peak {abs(out).max():.3f}, first 8 s piece {spent * 1000:.1f} ms"
        )
    normalizer = LoudnessNormalizer(RATE, -16.0)
    normalizer.process(speech_like(8.0, -27.0, 1))
    audio = speech_like(10.0, -27.0, 2)
    started = time.perf_counter()
    normalizer.process(audio)
    print(f"later 10 s piece {(time.perf_counter() - started) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
