"""What the Chatterbox models share as SpeechBackends: voices and their cost.

A voice is the built-in one of the model, or a reference clip from the voices
folder. A clip's conditionals (speaker embedding, prompt tokens, S3Gen reference)
are computed once, on the engine's worker thread, and kept on disk under
`DATA_DIR/voices/MODEL_ID/SHA256.pt`: keyed by the clip's content and by the
model files that computed them, so a restart loads them in milliseconds, a
changed clip is recomputed and another model never reads them.

New clips found by a rescan (every Describe) are listed at once and prepared in
the background when the worker is idle; a request that comes first prepares its
voice itself. A clip that turns out unusable (silent, undecodable) is logged
once and left out until the file changes.

Subclasses load a model and speak with it: `_load_model`, `_compute_conditionals`
and `_speak`, all called on the worker thread only.
"""

import hashlib
import logging
import os
import re
import tempfile
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from .engine import (
    ModelLoadError,
    Piece,
    ResolvedVoice,
    SamplingParams,
    SpeechBackend,
    UnknownVoice,
    VoiceInfo,
)
from .voices import VoiceClip, VoiceLibrary

_LOGGER = logging.getLogger(__name__)

BUILTIN_VOICE = "default"
SAMPLE_RATE = 24000
# T3's own cap (range(1000) upstream): about 40 s of speech per group.
MAX_SPEECH_TOKENS = 1000
# Speech-token ids at or above this are special to S3Gen (start 6561, stop 6562).
SPEECH_VOCAB_REAL = 6561
SPEECH_TOKENS_PER_SECOND = 25
# A clip whose loudest sample is below this is silence (-54 dBFS).
SILENT_PEAK = 0.002
_PARALINGUISTIC = re.compile(r"\[[a-z ]+\]")
# Scripts in which one character is a syllable or more.
_DENSE_SCRIPT = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
)


class VoiceError(Exception):
    """A reference clip cannot be used; the text says why."""


def speech_token_budget(text: str) -> int:
    """The most speech tokens a group's text can plausibly need.

    Generous on purpose: slow speech is about 8 characters a second (3 tokens a
    character); allow 4 tokens a character plus a second, 2 seconds per
    paralinguistic tag ([laugh] ...), and 4 times as much per character in
    scripts where one character is a syllable (Chinese, Japanese, Korean).
    A model that babbles past it is stopped there.
    """
    tags = _PARALINGUISTIC.findall(text)
    plain = _PARALINGUISTIC.sub("", text)
    dense = len(_DENSE_SCRIPT.findall(plain))
    weight = len(plain) + 4 * dense
    budget = SPEECH_TOKENS_PER_SECOND * (1 + len(tags) * 2) + 4 * weight
    return min(MAX_SPEECH_TOKENS, budget)


def resolve_device(requested: str) -> str:
    """auto -> cuda if available, else cpu; check that a named device exists."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {requested} was asked for, but PyTorch sees no CUDA GPU "
                "here; use --device cpu, or check the NVIDIA driver (and --gpus all "
                "in Docker)."
            )
        if requested.startswith("cuda:"):
            index_text = requested.split(":", 1)[1]
            count = torch.cuda.device_count()
            if not index_text.isdigit() or int(index_text) >= count:
                raise ModelLoadError(
                    f"--device {requested} does not exist: this machine has {count} "
                    f"CUDA device(s), cuda:0 to cuda:{count - 1}."
                )
        return requested
    raise ModelLoadError(
        f"--device {requested} is not known; use auto, cpu, cuda or cuda:N."
    )


def model_fingerprint(ckpt_dir: Path, files: Sequence[str]) -> str:
    """A short identity of a model's files: names, sizes and their first and last
    MiB (not the whole gigabytes, which would take seconds to hash)."""
    digest = hashlib.sha256()
    for name in files:
        path = ckpt_dir / name
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(1 << 20)
                f.seek(max(0, size - (1 << 20)))
                tail = f.read(1 << 20)
        except OSError:
            continue
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(head)
        digest.update(tail)
    return digest.hexdigest()[:16]


class ChatterboxBackend(SpeechBackend):
    """A Chatterbox model on one device, with the built-in voice and the clips of
    a voices folder."""

    sample_rate = SAMPLE_RATE
    # Set by subclasses.
    kind = ""  # short id, part of the conditionals cache key
    model_name = ""
    model_files: Sequence[str] = ()
    languages: Dict[str, str] = {}  # code -> name, in advertising order

    def __init__(
        self,
        model_dir: Optional[Path],
        data_dir: Path,
        device: str = "auto",
        voices_dir: Optional[Path] = None,
    ) -> None:
        self._model_dir = model_dir
        self._data_dir = data_dir
        self._device_request = device
        self.device = "cpu"
        self._model: Any = None
        self._model_id = ""
        self._library = (
            VoiceLibrary(voices_dir, reserved=(BUILTIN_VOICE,))
            if voices_dir is not None
            else None
        )
        # Worker thread only: name -> (clip signature or None, conditionals).
        self._conds: Dict[str, Tuple[Optional[Tuple[int, int]], Any]] = {}
        # Written by the worker, read by the event loop: name -> clip signature.
        self._broken: Dict[str, Tuple[int, int]] = {}
        self._advertised: Dict[str, Tuple[str, str]] = {}  # entry -> (voice, lang)
        self._warned: Set[str] = set()
        self._clips: Dict[str, VoiceClip] = {}

    # --- for subclasses (worker thread) ---

    @abstractmethod
    def _find_model(self) -> Path:
        """The model folder: --model-dir, or the cached download."""

    @abstractmethod
    def _load_model(self, ckpt_dir: Path) -> Any:
        """Load the model, with its built-in voice in `model.conds`."""

    @abstractmethod
    def _compute_conditionals(self, clip: Path) -> Any:
        """Conditionals for a reference clip (decoded by the model's own code)."""

    def _ready_conditionals(self, conds: Any) -> Any:
        """Precompute what calls would otherwise cache into the conditionals."""
        return conds

    @abstractmethod
    def _speak(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        max_tokens: int,
    ) -> Tuple[np.ndarray, int, bool]:
        """Audio, speech tokens and whether `max_tokens` cut it short."""

    def _speak_pieces(
        self,
        text: str,
        conds: Any,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        min_tokens: int,
        max_tokens: int,
        whole: bool = False,
    ) -> Iterator[Piece]:
        """The group's audio in pieces; by default one piece from `_speak`.

        A subclass that makes audio while the model is still generating yields
        each piece as soon as it is ready, unless `whole` (nobody listens
        before the end: one piece is less work).
        """
        audio, tokens, cut = self._speak(
            text, conds, language, params, should_stop, max_tokens
        )
        if cut:
            self._log_runaway(text, tokens)
        yield Piece(audio=audio.astype(np.float32, copy=False), tokens=tokens)

    def _token_range(self, text: str) -> Tuple[int, int]:
        """The fewest and the most speech tokens a group's text may take.

        The model decides the length; only a runaway is cut, at the budget. A
        benchmark on random weights overrides this to make lengths realistic.
        """
        return 0, speech_token_budget(text)

    def _log_runaway(self, text: str, tokens: int) -> None:
        _LOGGER.warning(
            "Stopped a runaway generation at %s speech tokens (%.1f s) for %s "
            "characters: %r",
            tokens,
            tokens / SPEECH_TOKENS_PER_SECOND,
            len(text),
            text[:80],
        )

    def _warn_once(self, message: str, *args: Any) -> None:
        """Log a warning about settings once, not on every Describe."""
        text = message % args
        if text not in self._warned:
            self._warned.add(text)
            _LOGGER.warning("%s", text)

    def _voice_languages(self, wanted: Optional[Sequence[str]]) -> List[str]:
        """The languages a voice is offered in (the sidecar's, if it says)."""
        return list(self.languages)

    def _entry_name(self, voice: str, language: str) -> str:
        """The name a voice has in Info for one of its languages."""
        return voice

    # --- SpeechBackend ---

    def load(self) -> None:
        import torch

        started = time.monotonic()
        self.device = resolve_device(self._device_request)
        ckpt_dir = self._model_dir or self._find_model()
        missing = [n for n in self.model_files if not (ckpt_dir / n).is_file()]
        if missing:
            raise ModelLoadError(
                f"The model folder {ckpt_dir} lacks {', '.join(missing)}; point "
                f"--model-dir at a complete copy of the {self.model_name} model."
            )
        try:
            self._model = self._load_model(ckpt_dir)
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(
                f"Could not load the {self.model_name} model from {ckpt_dir} "
                f"({type(err).__name__}: {err}); the files may be damaged: delete "
                "them to download again, or use another --model-dir."
            ) from err

        conds = self._model.conds
        if conds is None:
            raise ModelLoadError(
                f"The model folder {ckpt_dir} has no conds.pt (the built-in voice); "
                f"use a complete copy of the {self.model_name} model."
            )
        # Nothing reads the shared model.conds: every call passes its voice's own.
        self._model.conds = None
        self._conds[BUILTIN_VOICE] = (None, self._ready_conditionals(conds))
        self._model_id = f"{self.kind}-{model_fingerprint(ckpt_dir, self.model_files)}"

        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        _LOGGER.info(
            "Loaded %s from %s on %s in %.1f s",
            self.model_name,
            ckpt_dir,
            self.device,
            time.monotonic() - started,
        )
        if self._library is not None:
            started = time.monotonic()
            self._clips = self._library.scan()
            while self.background_work():
                pass
            ready = sum(1 for name in self._clips if name in self._conds)
            _LOGGER.info(
                "Voices folder %s: %s voice(s) ready in %.1f s",
                self._library.directory,
                ready,
                time.monotonic() - started,
            )

    def voices(self) -> List[VoiceInfo]:
        """Every voice, in every language it speaks; rescans the voices folder."""
        if self._library is not None:
            self._clips = self._library.scan()
        broken = dict(self._broken)
        entries: List[VoiceInfo] = []
        advertised: Dict[str, Tuple[str, str]] = {}
        bases: List[Tuple[str, str, Optional[Sequence[str]]]] = [
            (BUILTIN_VOICE, f"{self.model_name} built-in voice", None)
        ]
        for name, clip in sorted(self._clips.items()):
            if broken.get(name) == clip.signature:
                continue
            description = clip.settings.description or name.replace("_", " ").title()
            bases.append((name, description, clip.settings.languages))
        for name, description, wanted in bases:
            languages = self._voice_languages(wanted)
            for language in languages:
                entry = self._entry_name(name, language)
                advertised[entry] = (name, language)
                entries.append(
                    VoiceInfo(
                        name=entry,
                        description=(
                            description
                            if entry == name
                            else f"{description} ({self.languages[language]})"
                        ),
                        languages=[language] if entry != name else languages,
                    )
                )
        self._advertised = advertised
        return entries

    def resolve_voice(self, name: str, language: Optional[str]) -> ResolvedVoice:
        found = self._advertised.get(name)
        if found is None:
            self.voices()  # a clip added since the last Describe
            found = self._advertised.get(name)
        if found is None:
            # A voice's plain name, when it is listed once per language.
            for voice, lang in self._advertised.values():
                if voice == name:
                    found = (voice, lang)
                    break
        if found is None:
            raise UnknownVoice(
                f"Unknown voice {name!r}; available voices: "
                + ", ".join(self._advertised)
            )
        voice, voice_language = found
        if language:
            code = self._language_code(language)
            spoken = {lang for v, lang in self._advertised.values() if v == voice}
            if code in spoken:
                voice_language = code
            else:
                _LOGGER.debug(
                    "Voice %s does not speak %r; using %s",
                    voice,
                    language,
                    voice_language,
                )
        clip = self._clips.get(voice)
        params = dict(clip.settings.params) if clip is not None else {}
        return ResolvedVoice(voice, voice_language, params)

    def _language_code(self, language: str) -> str:
        return re.split(r"[-_]", language.strip(), maxsplit=1)[0].lower()

    def synthesize(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        return self._synthesize(text, voice, language, params, should_stop, False)

    def synthesize_whole(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
    ) -> Iterator[Piece]:
        return self._synthesize(text, voice, language, params, should_stop, True)

    def _synthesize(
        self,
        text: str,
        voice: str,
        language: str,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        whole: bool,
    ) -> Iterator[Piece]:
        text = text.strip()
        if not text:
            return
        conds = self._conditionals_for(voice)
        min_tokens, max_tokens = self._token_range(text)
        yield from self._speak_pieces(
            text, conds, language, params, should_stop, min_tokens, max_tokens, whole
        )

    def background_work(self) -> bool:
        """Prepare one voice found by a rescan; True if more may be waiting."""
        for name, clip in sorted(self._clips.items()):
            if self._broken.get(name) == clip.signature:
                continue
            known = self._conds.get(name)
            if known is not None and known[0] == clip.signature:
                continue
            try:
                self._conditionals_for(name)
            except VoiceError:
                pass
            return True
        # Forget voices whose clip is gone.
        for name in [n for n in self._conds if n != BUILTIN_VOICE]:
            if name not in self._clips:
                del self._conds[name]
        return False

    def warm_up(self) -> None:
        """Speak a short sentence once: the first real request then finds the
        kernels chosen, the caches allocated and the code paths compiled."""
        import torch

        started = time.monotonic()
        language = next(iter(self.languages), "en")
        for _ in self.synthesize(
            "Hello, this is a warm-up.",
            BUILTIN_VOICE,
            language,
            self.default_params,
            lambda: False,
        ):
            pass
        if self.device.startswith("cuda"):
            _LOGGER.info(
                "Warmed up in %.1f s; GPU memory in use: %.2f GB (peak %.2f GB)",
                time.monotonic() - started,
                torch.cuda.memory_allocated(self.device) / 1e9,
                torch.cuda.max_memory_allocated(self.device) / 1e9,
            )
        else:
            _LOGGER.info("Warmed up in %.1f s", time.monotonic() - started)

    def gpu_memory(self) -> Optional[float]:
        """Bytes of GPU memory PyTorch holds for the model; None off CUDA."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        return float(torch.cuda.memory_allocated(self.device))

    def close(self) -> None:
        import gc

        import torch

        self._model = None
        self._conds.clear()
        gc.collect()  # the model's tensors may sit in reference cycles
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            _LOGGER.info(
                "Model released; GPU memory in use: %.2f GB",
                torch.cuda.memory_allocated(self.device) / 1e9,
            )

    # --- voices from clips (worker thread) ---

    def _conditionals_for(self, voice: str) -> Any:
        if voice == BUILTIN_VOICE:
            return self._conds[BUILTIN_VOICE][1]
        clip = self._clips.get(voice)
        if clip is None:
            raise VoiceError(f"The voice {voice} is gone from the voices folder")
        known = self._conds.get(voice)
        if known is not None and known[0] == clip.signature:
            return known[1]
        try:
            conds = self._ready_conditionals(self._clip_conditionals(clip))
        except VoiceError as err:
            self._broken[voice] = clip.signature
            _LOGGER.warning("Voice clip %s left out: %s", clip.path, err)
            raise VoiceError(f"The voice {voice} cannot be used: {err}") from err
        self._conds[voice] = (clip.signature, conds)
        self._broken.pop(voice, None)
        return conds

    def _clip_conditionals(self, clip: VoiceClip) -> Any:
        """From the disk cache, or computed (and cached) from the clip."""
        try:
            content = clip.path.read_bytes()
        except OSError as err:
            raise VoiceError(f"it cannot be read ({err})") from err
        digest = hashlib.sha256(content).hexdigest()
        cache = self._data_dir / "voices" / self._model_id / f"{digest}.pt"
        if cache.is_file():
            try:
                conds = self._load_cached(cache)
                _LOGGER.debug("Voice %s from cache %s", clip.name, cache)
                return conds
            except Exception as err:  # pylint: disable=broad-except
                _LOGGER.warning("Recomputing voice %s: bad cache (%s)", clip.name, err)

        self._check_clip(clip)
        started = time.monotonic()
        try:
            conds = self._compute_conditionals(clip.path)
        except Exception as err:  # pylint: disable=broad-except
            raise VoiceError(
                f"the model could not use it ({type(err).__name__}: {err})"
            ) from err
        _LOGGER.info(
            "Prepared voice %s from %s in %.1f s",
            clip.name,
            clip.path.name,
            time.monotonic() - started,
        )
        self._save_cached(conds, cache)
        return conds

    def _check_clip(self, clip: VoiceClip) -> None:
        """Decode the clip once: undecodable or silent clips are refused."""
        import soundfile

        try:
            audio, _ = soundfile.read(str(clip.path), dtype="float32", always_2d=True)
        except Exception as err:  # pylint: disable=broad-except
            raise VoiceError(f"it cannot be decoded ({err})") from err
        if audio.size == 0 or not np.isfinite(audio).all():
            raise VoiceError("it holds no usable samples")
        peak = float(np.abs(audio).max())
        if peak < SILENT_PEAK:
            raise VoiceError(
                f"it is silent (loudest sample {20 * np.log10(max(peak, 1e-9)):.0f} "
                "dBFS)"
            )

    def _load_cached(self, path: Path) -> Any:
        from chatterbox.tts_turbo import Conditionals

        return Conditionals.load(path, map_location=self.device).to(self.device)

    def _save_cached(self, conds: Any, path: Path) -> None:
        """Write atomically; a cache that cannot be written only costs time."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                conds.save(Path(tmp))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except Exception as err:  # pylint: disable=broad-except
            _LOGGER.warning("Could not cache voice conditionals in %s: %s", path, err)
