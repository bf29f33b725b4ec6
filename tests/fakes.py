"""A fast stand-in for the model, for protocol and engine tests."""

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from wyoming_chatterbox.chatterbox.base import ChatterboxBackend
from wyoming_chatterbox.sentences import split_groups
from wyoming_chatterbox.speech import (
    GroupStats,
    Piece,
    SpeechBackend,
    SpeechJob,
    SynthesisCancelled,
    VoiceInfo,
)

SAMPLES_PER_CHAR = 100


def fake_samples(group: str) -> int:
    """Samples the fake speaks for a group: per character, spaces not counted, so
    that a reply's audio is as long however its sentences were grouped (a stream
    may hand sentences over early, in smaller groups)."""
    return sum(not char.isspace() for char in group) * SAMPLES_PER_CHAR


def fake_bytes(text: str) -> int:
    """PCM bytes the fake speaks for a whole reply of this text."""
    return sum(fake_samples(group) for group in split_groups(text)) * 2


class FakeBackend(SpeechBackend):
    """Speaks `fake_samples(group)` samples for each group, after `delay`
    seconds (checking should_stop every few ms, as the real one does per token).

    Records every group it was asked for, and which ones ended how.
    """

    sample_rate = 24000

    def __init__(
        self, delay: float = 0.0, fail_on: Optional[str] = None, chatty: bool = False
    ) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.chatty = chatty  # print to stdout like chatterbox does
        self.asked: List[str] = []
        self.finished: List[str] = []
        self.cancelled: List[str] = []
        self.asked_at: List[float] = []
        self.asked_whole: List[str] = []  # groups asked for whole (SpeechJob.whole)
        self.loaded = False
        self.closed = False
        self.loads = 0
        self.closes = 0
        self.started = threading.Event()  # set when a group starts

    def load(self) -> None:
        self.loaded = True
        self.closed = False
        self.loads += 1

    def voices(self) -> List[VoiceInfo]:
        return [VoiceInfo(name="default", description="Fake voice", languages=["en"])]

    def close(self) -> None:
        self.loaded = False
        self.closed = True
        self.closes += 1

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        assert self.loaded, "speak() on an unloaded model"
        text = job.text
        if job.whole:
            self.asked_whole.append(text)
        self.asked.append(text)
        self.asked_at.append(time.monotonic())
        self.started.set()
        if self.chatty:
            print("S3 Token -> Mel Inference...")
            os.write(1, b"noise from C code\n")
        if self.fail_on is not None and self.fail_on in text:
            raise RuntimeError("fake engine failure")
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            if job.budget.should_stop():
                self.cancelled.append(text)
                raise SynthesisCancelled()
            time.sleep(0.002)
        self.finished.append(text)
        # Each group's audio holds its index among the groups asked, so tests can
        # tell replies and groups apart in the PCM.
        value = min(len(self.asked), 300) / 1000.0
        yield Piece(
            audio=np.full(fake_samples(text), value, np.float32), tokens=len(text)
        )


class _FakeModel:
    def __init__(self) -> None:
        self.conds: object = {"voice": "default"}


class FakeClipBackend(ChatterboxBackend):
    """The real voice catalogue and conditionals cache over a fake model.

    Conditionals are a dict naming the clip and its peak; they are cached as JSON.
    Audio is SAMPLES_PER_CHAR samples per character at 0.1, like FakeBackend.
    """

    kind = "fake"
    model_name = "Fake Chatterbox"
    model_files = ()
    languages = {"en": "English"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.computed: List[str] = []  # clip file names, in order
        self.spoken: List[Tuple[str, Any, str]] = []  # (text, conds, language)

    def _find_model(self) -> Path:
        return self.settings.data_dir

    def _load_model(self, ckpt_dir: Path) -> Any:
        return _FakeModel()

    def _compute_conditionals(self, clip: Path) -> Any:
        import soundfile

        audio, _ = soundfile.read(str(clip), dtype="float32")
        self.computed.append(clip.name)
        return {"voice": clip.stem, "peak": round(float(np.abs(audio).max()), 3)}

    def _load_cached(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def _save_cached(self, conds: Any, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(conds))

    def _speak(self, job: SpeechJob, conds: Any, stats: GroupStats) -> Iterator[Piece]:
        self.spoken.append((job.text, conds, job.language))
        stats.tokens = len(job.text)
        yield Piece(
            audio=np.full(fake_samples(job.text), 0.1, np.float32), tokens=len(job.text)
        )


class FakeMultilingualBackend(FakeClipBackend):
    """Voices listed once per language, as the multilingual backend does."""

    languages = {"en": "English", "de": "German", "fr": "French"}


def write_clip(
    path: Path, seconds: float = 6.0, peak: float = 0.5, rate: int = 24000
) -> Path:
    """A speech-like clip: a voiced tone with syllable-rate loudness changes."""
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    audio = tone * envelope
    audio = audio / np.abs(audio).max() * peak
    suffix = path.suffix.lower()
    kwargs = {"format": "MP3"} if suffix == ".mp3" else {}
    soundfile.write(str(path), audio.astype(np.float32), rate, **kwargs)
    return path
