"""Voices-folder figures on the test checkpoint: scan and rescan time with 50
clips, preparing clips, and loading them from the disk cache.

    script/test-checkpoint .cache/test-checkpoint   # if not built yet
    .venv/bin/python script/measure_voices.py
"""

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes import write_clip  # noqa: E402
from wyoming_chatterbox.chatterbox.turbo import TurboBackend  # noqa: E402
from wyoming_chatterbox.settings import ModelSettings  # noqa: E402

CHECKPOINT = ROOT / ".cache" / "test-checkpoint"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(tempfile.mkdtemp())
    voices = root / "voices"
    voices.mkdir()
    try:
        for i in range(50):
            write_clip(voices / f"voice{i:02d}.wav", seconds=8.0, peak=0.3 + i / 200)
        settings = ModelSettings(
            model_dir=CHECKPOINT,
            data_dir=root / "data",
            device="cpu",
            voices_dir=voices,
        )
        backend = TurboBackend(settings)
        started = time.perf_counter()
        backend.voices()
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(100):
            backend.voices()
        rescan = (time.perf_counter() - started) / 100
        print(
            f"voices() with 50 clips: first scan {first * 1000:.1f} ms, "
            f"rescan {rescan * 1000:.2f} ms"
        )
        for i in range(3, 50):
            (voices / f"voice{i:02d}.wav").unlink()
        for attempt in ("computed", "from the disk cache"):
            backend = TurboBackend(settings)
            started = time.perf_counter()
            backend.load()
            print(f"load + 3 voices {attempt}: {time.perf_counter() - started:.1f} s")
            backend.close()
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
