"""A fast stand-in for the model, for protocol and engine tests."""

import os
import threading
import time
from typing import Callable, Iterator, List, Optional

import numpy as np

from wyoming_chatterbox.engine import (
    Piece,
    SamplingParams,
    SpeechBackend,
    SynthesisCancelled,
    VoiceInfo,
)
from wyoming_chatterbox.sentences import split_groups

SAMPLES_PER_CHAR = 100


def fake_samples(group: str) -> int:
    return len(group) * SAMPLES_PER_CHAR


def fake_bytes(text: str) -> int:
    """PCM bytes the fake speaks for a whole reply of this text."""
    return sum(fake_samples(group) for group in split_groups(text)) * 2


class FakeBackend(SpeechBackend):
    """Speaks SAMPLES_PER_CHAR samples per character of each group, after `delay`
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
        self.loaded = False
        self.closed = False
        self.started = threading.Event()  # set when a group starts

    def load(self) -> None:
        self.loaded = True

    def voices(self) -> List[VoiceInfo]:
        return [VoiceInfo(name="default", description="Fake voice", languages=["en"])]

    def close(self) -> None:
        self.closed = True

    def synthesize(
        self,
        text: str,
        voice: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
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
            if should_stop():
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
