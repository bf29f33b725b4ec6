"""What the Chatterbox backends share: loading, voices' conditionals, constants.

`ChatterboxBackend` speaks a job in three steps: the voice's conditionals (the
built-in voice, or a clip's, computed once on the worker thread and cached on
disk under DATA_DIR/voices/MODEL_ID/SHA256.pt, keyed by the clip's content and
the model files), the token budget for the text, then the subclass's `_speak`,
which yields the audio and fills in the group's GroupStats. Subclasses also
load their model (`_load_model`) and compute a clip's conditionals
(`_compute_conditionals`). Worker thread only, but for `voices` and
`resolve_voice` (the catalogue, on the event loop).

Long (~540 lines): the one template every model backend shares, and the
device checks every backend needs before it loads.
"""

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from abc import abstractmethod
from collections import deque
from pathlib import Path
from typing import (
    Any,
    Deque,
    Dict,
    Generator,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

from ..settings import BUILTIN_VOICE, ModelSettings
from ..speech import (
    GroupStats,
    ModelLoadError,
    Piece,
    ResolvedVoice,
    SpeechBackend,
    SpeechJob,
    VoiceInfo,
)
from ..text import SYLLABIC_RE
from ..voices import Languages, VoiceCatalogue, VoiceClip, VoiceError, check_clip

_LOGGER = logging.getLogger(__name__)

# T3's own cap (range(1000) upstream): about 40 s of speech per group.
MAX_SPEECH_TOKENS = 1000
# Speech-token ids at or above this are special to S3Gen (start 6561, stop 6562).
SPEECH_VOCAB_REAL = 6561
SPEECH_TOKENS_PER_SECOND = 25
# S3Gen makes 960 samples (40 ms at 24 kHz) per speech token.
SAMPLES_PER_TOKEN = 960
_PARALINGUISTIC = re.compile(r"\[[a-z ]+\]")
# from_local builds T3 from a shared config table; loads swap an entry in it.
_CONFIG_LOCK = threading.Lock()


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
    dense = len(SYLLABIC_RE.findall(plain))
    weight = len(plain) + 4 * dense
    budget = SPEECH_TOKENS_PER_SECOND * (1 + len(tags) * 2) + 4 * weight
    return min(MAX_SPEECH_TOKENS, budget)


def resolve_device(requested: str) -> str:
    """auto -> cuda if available, else cpu; check that a named device exists."""
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        requested = "cuda"
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
        check_gpu_kernels(requested)
        return requested
    raise ModelLoadError(
        f"--device {requested} is not known; use auto, cpu, cuda or cuda:N."
    )


def gpu_has_kernels(arch_list: Sequence[str], capability: Tuple[int, int]) -> bool:
    """A GPU runs code built for its own major version and an equal or lower
    minor one (sm_XY), or PTX of an equal or lower capability (compute_XY),
    which the driver compiles on the spot."""
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue  # e.g. sm_90a: code for that exact GPU only
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def check_gpu_kernels(device: str) -> None:
    """Stop at start-up, saying what to do, where this PyTorch has no code for
    the GPU (Blackwell on torch 2.6; Maxwell or Pascal on the CUDA 12.8
    builds), rather than at the first request with "no kernel image is
    available for execution on the device"."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    capability = torch.cuda.get_device_capability(index)
    arch_list = torch.cuda.get_arch_list()
    if not arch_list or gpu_has_kernels(arch_list, capability):
        return
    raise ModelLoadError(
        f"{torch.cuda.get_device_name(index)} (compute capability "
        f"{capability[0]}.{capability[1]}) cannot run PyTorch {torch.__version__}, "
        f"which has code for {' '.join(arch_list)} only. Run script/setup again (it "
        "installs the PyTorch this GPU needs), or build the Docker image with "
        "--build-arg TORCH_VERSION=2.8.0 (Blackwell) or 2.6.0 (Maxwell, Pascal); "
        "--device cpu runs without the GPU."
    )


def check_model_files(ckpt_dir: Path, files: Sequence[str], model: str) -> None:
    """ModelLoadError naming the files of `files` missing from the folder."""
    missing = [name for name in files if not (ckpt_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The model folder {ckpt_dir} lacks {', '.join(missing)}; point "
            f"--model-dir at a complete copy of {model}."
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


@contextlib.contextmanager
def llama_config_as(name: str, size: Dict[str, Any], where: Path) -> Iterator[None]:
    """While loading, make chatterbox's LLAMA_CONFIGS[name] the T3 size read
    from the weights in `where` (from_local always builds the released size;
    a random-weight test checkpoint holds a smaller T3). The shared table is
    changed only for the load, under a lock."""
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    with _CONFIG_LOCK:
        released = LLAMA_CONFIGS[name]
        if all(released.get(key) == value for key, value in size.items()):
            yield
            return
        _LOGGER.warning(
            "T3 in %s is not the released size (%s layers, width %s): "
            "this is a test checkpoint and will not speak words",
            where,
            size.get("n_layer", size.get("num_hidden_layers")),
            size.get("n_embd", size.get("hidden_size")),
        )
        LLAMA_CONFIGS[name] = dict(released, **size)
        try:
            yield
        finally:
            LLAMA_CONFIGS[name] = released


@contextlib.contextmanager
def quiet(what: str = "chatterbox") -> Iterator[None]:
    """Keep what the library print()s out of stdout (the stdio:// protocol)
    and out of the INFO log; it goes to the DEBUG log."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        if printed.getvalue().strip():
            _LOGGER.debug("%s said: %s", what, printed.getvalue().strip())


class ChatterboxBackend(SpeechBackend):
    """A Chatterbox model on one device, with the built-in voice and the clips of
    a voices folder."""

    # Set by subclasses.
    kind = ""  # short id, part of the conditionals cache key
    model_name = ""
    repo_id = ""  # the Hugging Face repository, for messages
    model_files: Sequence[str] = ()  # what the model folder must hold
    languages: Dict[str, str] = {}  # code -> name, in advertising order

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self.device = "cpu"
        self.model: Any = None
        self.model_id = ""
        self.catalogue = VoiceCatalogue(self._make_languages(), settings.voices_dir)
        # Worker thread only: name -> (clip signature or None, conditionals).
        self.conds: Dict[str, Tuple[Optional[Tuple[int, int]], Any]] = {}
        # One record per sentence group, for script/bench and the debug log.
        self.group_stats: Deque[GroupStats] = deque(maxlen=1000)

    # --- for subclasses (worker thread) ---

    def _make_languages(self) -> Languages:
        return Languages(self.model_name, self.languages)

    @abstractmethod
    def _find_model(self) -> Path:
        """The model folder: the cached download (fetched if need be)."""

    @abstractmethod
    def _load_model(self, ckpt_dir: Path) -> Any:
        """Load the model, with its built-in voice in `model.conds`."""

    @abstractmethod
    def _compute_conditionals(self, clip: Path) -> Any:
        """Conditionals for a reference clip (decoded by the model's own code)."""

    @abstractmethod
    def _speak(
        self, job: SpeechJob, conds: Any, stats: GroupStats
    ) -> Generator[Piece, None, None]:
        """The group's audio (and NOTHING_YET between model steps), within the
        job's budget (its token limits set); fills in `stats` as it goes."""

    def _ready_conditionals(self, conds: Any) -> Any:
        """Precompute what calls would otherwise cache into the conditionals."""
        return conds

    def _load_cached(self, path: Path) -> Any:
        from chatterbox.tts_turbo import Conditionals

        return Conditionals.load(path, map_location=self.device).to(self.device)

    def token_range(self, text: str) -> Tuple[int, int]:
        """The fewest and the most speech tokens a group's text may take.

        The model decides the length; only a runaway is cut, at the budget. A
        benchmark on random weights overrides this to make lengths realistic.
        """
        return 0, speech_token_budget(text)

    # --- SpeechBackend ---

    def load(self) -> None:
        started = time.monotonic()
        self.device = resolve_device(self.settings.device)
        ckpt_dir = self.settings.model_dir or self._find_model()
        check_model_files(ckpt_dir, self.model_files, self.repo_id or self.model_name)
        self._set_backend_flags()  # before anything runs on the device
        try:
            self.model = self._load_model(ckpt_dir)
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(
                f"Could not load the {self.model_name} model from {ckpt_dir} "
                f"({type(err).__name__}: {err}); the files may be damaged: delete "
                "them to download again, or use another --model-dir."
            ) from err
        conds = self.model.conds
        if conds is None:
            raise ModelLoadError(
                f"The model folder {ckpt_dir} has no conds.pt (the built-in voice); "
                f"use a complete copy of the {self.model_name} model."
            )
        # Nothing reads the shared model.conds: every call passes its voice's own.
        self.model.conds = None
        self.conds[BUILTIN_VOICE] = (None, self._ready_conditionals(conds))
        self.model_id = f"{self.kind}-{model_fingerprint(ckpt_dir, self.model_files)}"
        _LOGGER.info(
            "Loaded %s from %s on %s in %.1f s",
            self.model_name,
            ckpt_dir,
            self.device,
            time.monotonic() - started,
        )
        self._prepare_voices()

    def _set_backend_flags(self) -> None:
        """PyTorch's global switches, as upstream runs: PyTorch's defaults.

        cuDNN's benchmark mode stays off: S3Gen's input length changes with
        every call (and every piece), and benchmark mode would tune each
        convolution again for each new length (stalls of 100 ms and more).
        float32 matrix products stay exact (no TF32), convolutions may use
        TF32 (PyTorch's default): upstream's float32 S3Gen numbers. Turning
        either on needs a measurement first (script/gpu-check times both).
        """
        import torch

        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True

    def _prepare_voices(self) -> None:
        library = self.catalogue.library
        if library is None:
            return
        started = time.monotonic()
        clips = self.catalogue.scan()
        while self.background_work():
            pass
        ready = sum(1 for name in clips if name in self.conds)
        _LOGGER.info(
            "Voices folder %s: %s voice(s) ready in %.1f s",
            library.directory,
            ready,
            time.monotonic() - started,
        )

    def voices(self) -> List[VoiceInfo]:
        return self.catalogue.voices()

    def resolve_voice(self, name: str, language: Optional[str]) -> ResolvedVoice:
        return self.catalogue.resolve(name, language)

    def speak(self, job: SpeechJob) -> Iterator[Piece]:
        text = job.text.strip()
        if not text:
            return
        conds = self._conditionals_for(job.voice)
        low, high = self.token_range(text)
        budget = dataclasses.replace(job.budget, min_tokens=low, max_tokens=high)
        job = dataclasses.replace(job, text=text, budget=budget)
        stats = GroupStats(chars=len(text))
        started = time.monotonic()
        pieces = self._speak(job, conds, stats)
        try:
            for piece in pieces:
                if piece.audio.size:
                    if stats.first_piece_s is None:
                        stats.first_piece_s = time.monotonic() - started
                    stats.pieces += 1
                yield piece
        finally:
            pieces.close()
        stats.total_s = time.monotonic() - started
        self.group_stats.append(stats)
        if stats.cut and low < high:  # not a forced length
            _LOGGER.warning(
                "Stopped a runaway generation at %s speech tokens (%.1f s) for %s "
                "characters: %r",
                stats.tokens,
                stats.tokens / SPEECH_TOKENS_PER_SECOND,
                len(text),
                text[:80],
            )
        _LOGGER.debug(
            "Group of %s chars: %s speech tokens (%.1f ms each), %s pieces, "
            "first after %.0f ms, all in %.2f s",
            len(text),
            stats.tokens,
            stats.ms_per_token or 0.0,
            stats.pieces,
            1000 * (stats.first_piece_s or 0.0),
            stats.total_s,
        )

    def background_work(self) -> bool:
        """Prepare one voice found by a rescan; True if more may be waiting."""
        for name, clip in sorted(self.catalogue.clips.items()):
            if self.catalogue.is_broken(name, clip):
                continue
            known = self.conds.get(name)
            if known is not None and known[0] == clip.signature:
                continue
            try:
                self._conditionals_for(name)
            except VoiceError:
                pass
            return True
        # Forget voices whose clip is gone.
        for name in [n for n in self.conds if n != BUILTIN_VOICE]:
            if name not in self.catalogue.clips:
                del self.conds[name]
        return False

    def warm_up(self) -> None:
        """Speak a short sentence once: the first real request then finds the
        kernels chosen, the caches allocated and the code paths compiled."""
        started = time.monotonic()
        language = next(iter(self.languages), "en")
        job = SpeechJob("Hello, this is a warm-up.", BUILTIN_VOICE, language)
        for _ in self.speak(dataclasses.replace(job, params=self.default_params)):
            pass
        memory = self.gpu_memory()
        if memory is not None:
            import torch

            _LOGGER.info(
                "Warmed up in %.1f s; GPU memory in use: %.2f GB (peak %.2f GB)",
                time.monotonic() - started,
                memory / 1e9,
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

        self.model = None
        self.conds.clear()
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
            return self.conds[BUILTIN_VOICE][1]
        clip = self.catalogue.clips.get(voice)
        if clip is None:
            raise VoiceError(f"The voice {voice} is gone from the voices folder")
        known = self.conds.get(voice)
        if known is not None and known[0] == clip.signature:
            return known[1]
        try:
            conds = self._ready_conditionals(self._clip_conditionals(clip))
        except VoiceError as err:
            self.catalogue.mark_broken(voice, clip)
            _LOGGER.warning("Voice clip %s left out: %s", clip.path, err)
            raise VoiceError(f"The voice {voice} cannot be used: {err}") from err
        self.conds[voice] = (clip.signature, conds)
        self.catalogue.mark_usable(voice)
        return conds

    def _clip_conditionals(self, clip: VoiceClip) -> Any:
        """From the disk cache, or computed (and cached) from the clip."""
        try:
            content = clip.path.read_bytes()
        except OSError as err:
            raise VoiceError(f"it cannot be read ({err})") from err
        digest = hashlib.sha256(content).hexdigest()
        cache = self.settings.data_dir / "voices" / self.model_id / f"{digest}.pt"
        if cache.is_file():
            try:
                conds = self._load_cached(cache)
                _LOGGER.debug("Voice %s from cache %s", clip.name, cache)
                return conds
            except Exception as err:  # pylint: disable=broad-except
                _LOGGER.warning("Recomputing voice %s: bad cache (%s)", clip.name, err)

        check_clip(clip.path)
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
