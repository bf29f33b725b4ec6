"""The speech contract: what a model must do for the engine, and what it gets.

A `SpeechBackend` speaks one `SpeechJob` (a sentence group) at a time through its
one hot method, `speak(job)`, which yields `Piece`s of audio. Everything here is
plain data and an abstract class: no torch, no Wyoming, no scheduling (engine.py
drives backends; chatterbox/ implements them).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Mapping, Optional

import numpy as np

from .audio import SAMPLE_RATE


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of the speech-token model (Chatterbox Turbo's defaults).

    `exaggeration`, `cfg_weight` and `min_p` are read by the multilingual model
    only; Turbo has no emotion control or classifier-free guidance.
    """

    temperature: float = 0.8
    top_k: int = 1000
    top_p: float = 0.95
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    exaggeration: float = 0.5
    cfg_weight: float = 0.5


def _never() -> bool:
    return False


class SynthesisCancelled(Exception):
    """Raised inside a backend when the job's budget says stop."""


@dataclass(frozen=True)
class Budget:
    """How far one group's generation may go.

    `should_stop` is the reply's cancel flag, read before every speech token;
    `min_tokens` holds the stop token back that long (a benchmark forces
    realistic lengths on random weights); `max_tokens` cuts a runaway (None:
    the backend's own cap for the text).
    """

    should_stop: Callable[[], bool] = _never
    min_tokens: int = 0
    max_tokens: Optional[int] = None

    def check(self) -> None:
        """Raise SynthesisCancelled if the reply was cancelled."""
        if self.should_stop():
            raise SynthesisCancelled()


@dataclass(frozen=True)
class SpeechJob:
    """One sentence group to speak."""

    text: str
    voice: str  # the backend's own voice key (ResolvedVoice.name)
    language: str
    params: SamplingParams = field(default_factory=SamplingParams)
    budget: Budget = field(default_factory=Budget)
    # The listener plays nothing before the reply ends (Home Assistant's
    # one-shot synthesize): pieces within the group would only add work.
    whole: bool = False


@dataclass
class Piece:
    """A piece of generated audio: float32 mono samples in [-1, 1].

    A piece with no samples is not audio: a backend yields one (NOTHING_YET)
    between model steps to hand the worker back, which may then go on with
    another stream's work first.
    """

    audio: np.ndarray
    tokens: int = 0  # speech tokens behind this piece, for logs and tests


NOTHING_YET = Piece(audio=np.zeros(0, dtype=np.float32))


@dataclass
class GroupStats:
    """What one group cost inside the backend: for script/bench and the log."""

    chars: int = 0
    tokens: int = 0  # speech tokens generated (the stop token not counted)
    cut: bool = False  # the token budget ended it, not the model
    prefill_s: float = 0.0
    decode_s: float = 0.0
    t3_batch: Optional[float] = None  # groups per T3 step, on average
    s3gen_s: List[float] = field(default_factory=list)  # per S3Gen call
    s3gen_tokens: List[int] = field(default_factory=list)
    watermark_s: List[float] = field(default_factory=list)
    pieces: int = 0
    first_piece_s: Optional[float] = None  # speak() called to first piece
    total_s: float = 0.0

    @property
    def ms_per_token(self) -> Optional[float]:
        return 1000 * self.decode_s / self.tokens if self.tokens else None


@dataclass(frozen=True)
class FastPathState:
    """Which speed-ups a model runs with once its start-up self-check is done
    (for the metrics; the log has the same in words)."""

    parts: Mapping[str, bool]  # e.g. static_cache, cuda_graphs, stream_in_group
    t3_dtype: str
    self_check: str = "not run"  # "passed", "failed" (a part turned off) or "not run"
    capture_s: Optional[float] = None  # CUDA graph capture, all graphs
    graph_bytes: Optional[int] = None  # device memory the graphs reserved
    cache_bytes: Optional[int] = None  # the KV cache rows made at load


@dataclass(frozen=True)
class VoiceInfo:
    """A voice the backend can speak with, as advertised in Info."""

    name: str
    description: str
    languages: List[str]


@dataclass(frozen=True)
class ResolvedVoice:
    """What a request's voice name (and language) mean for the backend."""

    name: str  # the backend's own voice key
    language: str
    params: Mapping[str, float] = field(default_factory=dict)  # per-voice settings
    model: str = ""  # the key of the model that speaks it (models.ModelSet)


class EngineError(Exception):
    """Synthesis failed; the text is safe to show to the client."""


class EngineDied(Exception):
    """The model's worker thread died; the server cannot speak any more."""


class ModelLoadError(Exception):
    """The model could not be loaded; the text says what to do about it."""


class UnknownVoice(Exception):
    """A request named a voice (or language) this server does not have; the text
    names the voices it has."""


class SpeechBackend(ABC):
    """A text-to-speech model, driven only from the engine's worker thread
    (but for `voices` and `resolve_voice`, which must be cheap: the event loop
    calls them)."""

    sample_rate: int = SAMPLE_RATE
    model_name: str = "Chatterbox Turbo"
    # Sampling settings when neither the command line nor the voice sets them.
    default_params: SamplingParams = SamplingParams()
    # Where the model runs (after load), for status pages.
    device: str = "cpu"

    @abstractmethod
    def load(self) -> None:
        """Load the model. Raise ModelLoadError with a clear sentence on failure."""

    @abstractmethod
    def voices(self) -> List[VoiceInfo]:
        """The voices this backend can speak with (available after load)."""

    def resolve_voice(
        self, name: str, language: Optional[str], strict: bool = False
    ) -> ResolvedVoice:
        """The voice a request names; raise UnknownVoice if there is none (and,
        `strict`, if it does not speak `language`; else it speaks its own).

        This default accepts the names voices() lists, each speaking its first
        language.
        """
        voices = self.voices()
        for voice in voices:
            if voice.name != name:
                continue
            if language and strict:
                wanted = language.replace("_", "-").split("-")[0].lower()
                if wanted not in voice.languages:
                    raise UnknownVoice(f"Voice {name} does not speak {language!r}")
                return ResolvedVoice(name, wanted)
            return ResolvedVoice(name, voice.languages[0] if voice.languages else "")
        raise UnknownVoice(
            f"Unknown voice {name!r}; available voices: "
            + ", ".join(voice.name for voice in voices)
        )

    @abstractmethod
    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        """Speak one sentence group; raise SynthesisCancelled when the budget
        says stop.

        Pieces with no samples (NOTHING_YET) may come between the audio: the
        worker takes its turns between streams there.
        """

    @property
    def batch_size(self) -> int:
        """How many sentence groups the model advances in one step. Above 1,
        the worker begins waiting groups before it goes on with begun ones
        (each then costs little more than its prompt: it joins the others'
        steps), as long as fewer than this many are begun."""
        return 1

    def warm_up(self) -> None:
        """One short generation after load, so the first request is not slow."""

    def fast_path(self) -> Optional[FastPathState]:
        """The speed-ups in use while the model is loaded; None if none apply
        (any thread: it only reads)."""
        return None

    def background_work(self) -> bool:
        """Do one small piece of deferred work (e.g. prepare a new voice) when the
        worker has nothing else to do; return True if there may be more."""
        return False

    def close(self) -> None:
        """Release the model."""
