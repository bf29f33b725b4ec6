"""Voices: the folder of reference clips, and the catalogue a backend offers.

`VoiceLibrary` reads the folder (clips named after their files, optional
settings in NAME.json or voices.yaml; nothing outside the folder is read);
`VoiceCatalogue` turns its clips and the model's built-in voice into the Info
list and resolves a request's voice name; `check_clip` refuses undecodable or
silent audio. Computing a voice's conditionals is the backend's job, on the
engine's worker thread; nothing here imports torch.

Long (~510 lines): the folder and the catalogue change together.
"""

import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from .settings import BUILTIN_VOICE
from .speech import ResolvedVoice, SamplingParams, UnknownVoice, VoiceInfo

_LOGGER = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
SIDECAR_FILES = ("voices.yaml", "voices.yml", "voices.json")
# Chatterbox refuses reference clips of 5 s or less.
MIN_CLIP_SECONDS = 5.0
MAX_NAME_LENGTH = 64
# Sidecar keys that set sampling parameters, with their allowed range.
PARAM_RANGES: Dict[str, Tuple[float, float]] = {
    "temperature": (0.05, 5.0),
    "top_k": (0, 100000),
    "top_p": (0.01, 1.0),
    "repetition_penalty": (1.0, 10.0),
    "min_p": (0.0, 1.0),
    "exaggeration": (0.0, 2.0),
    "cfg_weight": (0.0, 2.0),
}
_SETTING_KEYS = {"description", "languages", *PARAM_RANGES}
assert set(PARAM_RANGES) <= {f.name for f in fields(SamplingParams)}


def sanitise_name(stem: str) -> str:
    """A voice name from a file stem: 'Alice Smith (calm)' -> 'alice_smith_calm'."""
    text = unicodedata.normalize("NFKD", stem)
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[^a-z0-9_-]+", "_", text)
    text = re.sub(r"_+", "_", text).strip("_-")
    return text[:MAX_NAME_LENGTH]


@dataclass(frozen=True)
class VoiceSettings:
    """What a sidecar says about a voice."""

    description: Optional[str] = None
    languages: Optional[Tuple[str, ...]] = None
    params: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class VoiceClip:
    """A usable reference clip found in the voices folder."""

    name: str
    path: Path
    signature: Tuple[int, int]  # size and modification time: a change means redo
    duration: float
    settings: VoiceSettings = field(default_factory=VoiceSettings)


def parse_settings(raw: Any, where: str) -> Optional[VoiceSettings]:
    """Check one voice's settings; None (after a warning) when unusable."""
    if not isinstance(raw, dict):
        _LOGGER.warning("Ignoring settings in %s: expected a mapping", where)
        return None
    unknown = set(raw) - _SETTING_KEYS
    if unknown:
        _LOGGER.warning(
            "Ignoring unknown settings in %s: %s (known: %s)",
            where,
            ", ".join(sorted(map(str, unknown))),
            ", ".join(sorted(_SETTING_KEYS)),
        )
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        _LOGGER.warning("Ignoring settings in %s: description must be text", where)
        return None
    languages = raw.get("languages")
    if languages is not None:
        if isinstance(languages, str):
            languages = [languages]
        if not isinstance(languages, list) or not all(
            isinstance(code, str) and code.strip() for code in languages
        ):
            _LOGGER.warning(
                "Ignoring settings in %s: languages must be a list of codes", where
            )
            return None
        languages = tuple(code.strip() for code in languages)
    params: Dict[str, float] = {}
    for key, (low, high) in PARAM_RANGES.items():
        if key not in raw:
            continue
        value = raw[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not low <= value <= high
        ):
            _LOGGER.warning(
                "Ignoring settings in %s: %s must be a number from %s to %s, not %r",
                where,
                key,
                low,
                high,
                value,
            )
            return None
        params[key] = int(value) if key == "top_k" else float(value)
    return VoiceSettings(description=description, languages=languages, params=params)


def _read_mapping(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    import yaml  # type: ignore[import-untyped]  # pylint: disable=import-outside-toplevel

    return yaml.safe_load(text)


class VoiceLibrary:
    """The voices folder, rescanned on demand at the cost of a directory listing.

    Warnings about a file are logged once per version of that file, not on every
    scan. `scan()` may be called from any one thread at a time.
    """

    def __init__(self, directory: Path, reserved: Tuple[str, ...] = ()) -> None:
        self.directory = directory
        self._root = directory.resolve()
        self._reserved = set(reserved)
        self._clips: Dict[str, VoiceClip] = {}
        self._seen: Dict[Path, Tuple[Tuple[int, int], Optional[float]]] = {}
        self._warned: Set[Tuple[Path, Tuple[int, int], str]] = set()
        self._settings_key: Tuple[Tuple[str, int, int], ...] = ()
        self._settings: Dict[str, VoiceSettings] = {}

    def _warn_once(self, path: Path, signature: Tuple[int, int], message: str) -> None:
        key = (path, signature, message)
        if key not in self._warned:
            self._warned.add(key)
            _LOGGER.warning("Voice clip %s left out: %s", path, message)

    def _inside(self, path: Path) -> bool:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            return False
        return resolved.parent == self._root

    # Long: one pass over the folder, each refusal named where it happens.
    def scan(self) -> Dict[str, VoiceClip]:
        """The usable clips by voice name, after a fresh look at the folder."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError as err:
            self._warn_once(self.directory, (0, 0), f"cannot list the folder ({err})")
            self._clips = {}
            return {}

        audio: List[Tuple[os.DirEntry, Tuple[int, int]]] = []
        sidecars: Dict[str, os.DirEntry] = {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix not in AUDIO_SUFFIXES and suffix not in (
                ".json",
                ".yaml",
                ".yml",
            ):
                continue
            path = Path(entry.path)
            try:
                if not entry.is_file() or not self._inside(path):
                    continue
                stat = entry.stat()
            except OSError:
                continue
            if suffix in AUDIO_SUFFIXES:
                audio.append((entry, (stat.st_size, stat.st_mtime_ns)))
            else:
                sidecars[entry.name] = entry

        settings = self._load_settings(sidecars)
        clips: Dict[str, VoiceClip] = {}
        for entry, signature in audio:
            path = Path(entry.path)
            name = sanitise_name(os.path.splitext(entry.name)[0])
            if not name:
                self._warn_once(path, signature, "its name has no usable letters")
                continue
            if name in self._reserved:
                self._warn_once(
                    path, signature, f"the name {name!r} belongs to a built-in voice"
                )
                continue
            if name in clips:
                self._warn_once(
                    path,
                    signature,
                    f"the name {name!r} is taken by {clips[name].path.name}",
                )
                continue
            duration = self._duration(path, signature)
            if duration is None:
                continue
            if duration <= MIN_CLIP_SECONDS:
                self._warn_once(
                    path,
                    signature,
                    f"it is {duration:.1f} s long; Chatterbox needs more than "
                    f"{MIN_CLIP_SECONDS:.0f} s of speech (10 to 20 s is best)",
                )
                continue
            clips[name] = VoiceClip(
                name=name,
                path=path,
                signature=signature,
                duration=duration,
                settings=settings.get(name, VoiceSettings()),
            )
        self._clips = clips
        return dict(clips)

    def _duration(self, path: Path, signature: Tuple[int, int]) -> Optional[float]:
        """Length in seconds from the header, remembered per file version."""
        seen = self._seen.get(path)
        if seen is not None and seen[0] == signature:
            return seen[1]
        import soundfile  # pylint: disable=import-outside-toplevel

        duration: Optional[float]
        try:
            info = soundfile.info(str(path))
            duration = float(info.frames) / float(info.samplerate)
        except Exception as err:  # pylint: disable=broad-except
            self._warn_once(path, signature, f"not a readable audio file ({err})")
            duration = None
        self._seen[path] = (signature, duration)
        return duration

    def _load_settings(
        self, sidecars: Dict[str, os.DirEntry]
    ) -> Dict[str, VoiceSettings]:
        """Settings per voice name, re-read only when a sidecar file changed."""
        key = tuple(
            sorted((name, *_signature_of(entry)) for name, entry in sidecars.items())
        )
        if key == self._settings_key:
            return self._settings
        settings: Dict[str, VoiceSettings] = {}
        for shared in SIDECAR_FILES:
            if shared not in sidecars:
                continue
            path = Path(sidecars[shared].path)
            try:
                mapping = _read_mapping(path)
            except Exception as err:  # pylint: disable=broad-except
                _LOGGER.warning("Ignoring %s: %s", path, err)
                continue
            if not isinstance(mapping, dict):
                _LOGGER.warning("Ignoring %s: expected voice names as keys", path)
                continue
            for raw_name, raw in mapping.items():
                parsed = parse_settings(raw, f"{path} ({raw_name})")
                if parsed is not None:
                    settings[sanitise_name(str(raw_name))] = parsed
        for file_name, entry in sidecars.items():
            if file_name in SIDECAR_FILES or not file_name.endswith(".json"):
                continue
            path = Path(entry.path)
            try:
                raw = _read_mapping(path)
            except Exception as err:  # pylint: disable=broad-except
                _LOGGER.warning("Ignoring %s: %s", path, err)
                continue
            parsed = parse_settings(raw, str(path))
            if parsed is not None:
                # The voice's own file wins over the shared one.
                settings[sanitise_name(path.stem)] = parsed
        self._settings_key = key
        self._settings = settings
        return settings


def _signature_of(entry: os.DirEntry) -> Tuple[int, int]:
    try:
        stat = entry.stat()
    except OSError:
        return (0, 0)
    return (stat.st_size, stat.st_mtime_ns)


# A clip whose loudest sample is below this is silence (-54 dBFS).
SILENT_PEAK = 0.002


class VoiceError(Exception):
    """A reference clip cannot be used; the text says why."""


def check_clip(path: Path) -> None:
    """Decode the clip once: raise VoiceError if it is undecodable or silent."""
    import soundfile  # pylint: disable=import-outside-toplevel

    try:
        audio, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
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


class Languages:
    """The languages a model speaks, and how its voices are listed in Info.

    A model that speaks one language lists each voice by its name; one that
    speaks several lists each voice once per language, as VOICE@LANGUAGE
    (Home Assistant sends only a voice name, never the pipeline's language).
    Languages another model of the server serves (`elsewhere`, e.g. English
    beside Turbo) are left to that model.
    """

    def __init__(self, model_name: str, names: Mapping[str, str]) -> None:
        self.model_name = model_name
        self.names = dict(names)  # code -> name, in advertising order
        self.elsewhere: Set[str] = set()  # codes another model serves
        self._warned: Set[str] = set()

    @property
    def per_language(self) -> bool:
        return len(self.names) > 1

    def code(self, tag: str) -> Optional[str]:
        """The model's code for a language tag ("de", "de-DE", "de_DE"), or None
        when the model does not speak it."""
        primary = re.split(r"[-_]", tag.strip(), maxsplit=1)[0].lower()
        return primary if primary in self.names else None

    def served_elsewhere(self, tag: str) -> bool:
        """Whether another model of the server serves this language tag."""
        code = self.code(tag) or re.split(r"[-_]", tag.strip(), 1)[0].lower()
        return code in self.elsewhere

    def for_voice(self, wanted: Optional[Sequence[str]]) -> List[str]:
        """The languages a voice is offered in: those of its settings that the
        model speaks (each unknown one warned about once), else all; never
        those another model serves (then possibly none)."""
        own = [code for code in self.names if code not in self.elsewhere]
        if not wanted:
            return own
        codes: List[str] = []
        for tag in wanted:
            code = self.code(tag)
            if self.served_elsewhere(tag):
                continue
            if code is None:
                self.warn_once(
                    "%s does not speak %r; it speaks %s",
                    self.model_name,
                    tag,
                    ", ".join(self.names),
                )
            elif code not in codes:
                codes.append(code)
        if codes or any(self.served_elsewhere(tag) for tag in wanted):
            return codes
        return own

    def entry(self, voice: str, language: str) -> str:
        """The name a voice has in Info for one of its languages."""
        return f"{voice}@{language}" if self.per_language else voice

    def warn_once(self, message: str, *args: Any) -> None:
        """Log a warning about settings once, not on every Describe."""
        text = message % args
        if text not in self._warned:
            self._warned.add(text)
            _LOGGER.warning("%s", text)


class VoiceCatalogue:
    """The voices a backend offers: its built-in voice and the folder's clips.

    `voices()` (every Describe) rescans the folder; `resolve()` maps a request's
    name to a voice and language. Both run on the event loop; `mark_broken`
    and `mark_usable` come from the worker thread.
    """

    def __init__(self, languages: Languages, voices_dir: Optional[Path]) -> None:
        self.languages = languages
        self.library = (
            VoiceLibrary(voices_dir, reserved=(BUILTIN_VOICE,))
            if voices_dir is not None
            else None
        )
        self.clips: Dict[str, VoiceClip] = {}
        # Clips found unusable, by name -> the signature they had then.
        self._broken: Dict[str, Tuple[int, int]] = {}
        self._advertised: Dict[str, Tuple[str, str]] = {}  # entry -> (voice, lang)

    def scan(self) -> Dict[str, VoiceClip]:
        """Look at the folder again; the clips by voice name."""
        if self.library is not None:
            self.clips = self.library.scan()
        return self.clips

    def is_broken(self, name: str, clip: VoiceClip) -> bool:
        return self._broken.get(name) == clip.signature

    def mark_broken(self, name: str, clip: VoiceClip) -> None:
        self._broken[name] = clip.signature

    def mark_usable(self, name: str) -> None:
        self._broken.pop(name, None)

    def voices(self) -> List[VoiceInfo]:
        """Every voice, in every language it speaks; rescans the folder."""
        model_name = self.languages.model_name
        bases: List[Tuple[str, str, Optional[Sequence[str]]]] = [
            (BUILTIN_VOICE, f"{model_name} built-in voice", None)
        ]
        for name, clip in sorted(self.scan().items()):
            if self.is_broken(name, clip):
                continue
            description = clip.settings.description or name.replace("_", " ").title()
            bases.append((name, description, clip.settings.languages))
        entries: List[VoiceInfo] = []
        advertised: Dict[str, Tuple[str, str]] = {}
        for name, description, wanted in bases:
            languages = self.languages.for_voice(wanted)
            for language in languages:
                entry = self.languages.entry(name, language)
                advertised[entry] = (name, language)
                if entry != name:
                    language_name = self.languages.names[language]
                    info = VoiceInfo(
                        entry, f"{description} ({language_name})", [language]
                    )
                else:
                    info = VoiceInfo(entry, description, languages)
                entries.append(info)
        self._advertised = advertised
        return entries

    def resolve(
        self, name: str, language: Optional[str], strict: bool = False
    ) -> ResolvedVoice:
        """The voice a request names (an Info entry, or a voice's plain name)
        in the language it asks for if the voice speaks it; UnknownVoice if
        there is no such voice (`strict`: also if it does not speak that
        language)."""
        found = self._advertised.get(name)
        if found is None:
            self.voices()  # a clip added since the last Describe
            found = self._advertised.get(name)
        if found is None:
            # A voice's plain name, when it is listed once per language.
            found = next(
                (pair for pair in self._advertised.values() if pair[0] == name), None
            )
        if found is None:
            raise UnknownVoice(
                f"Unknown voice {name!r}; available voices: "
                + ", ".join(self._advertised)
            )
        voice, voice_language = found
        if language:
            code = self.languages.code(language) or language
            spoken = {lang for v, lang in self._advertised.values() if v == voice}
            if code in spoken:
                voice_language = code
            elif strict:
                raise UnknownVoice(f"Voice {voice} does not speak {language!r}")
            else:
                _LOGGER.debug(
                    "Voice %s does not speak %r; using %s",
                    voice,
                    language,
                    voice_language,
                )
        clip = self.clips.get(voice)
        params = dict(clip.settings.params) if clip is not None else {}
        return ResolvedVoice(voice, voice_language, params)
