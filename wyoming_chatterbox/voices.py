"""The voices folder: reference clips in, voices out.

Every clip directly in the folder (wav, flac, mp3, ogg) is a voice named after
its file stem, sanitised to lower-case letters, digits, `-` and `_`. Optional
settings per voice come from a sidecar `NAME.json` next to the clip, or from one
`voices.yaml` (or `voices.json`) mapping names to settings:

    alice:
      description: Alice, warm and calm
      languages: [en, de]
      temperature: 0.7
      exaggeration: 0.6

A scan only lists the folder and reads file headers (`stat` plus the audio
header for the duration), so it is cheap enough to run on every Describe: a new
clip appears, a changed clip is noticed by its size and modification time, a
deleted clip disappears. Decoding clips and computing conditionals is the
backend's job, on the engine's worker thread.

Nothing outside the folder is read: subfolders are not entered, hidden files are
skipped, and a symbolic link is followed only when it stays inside the folder.
"""

import json
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from .engine import SamplingParams

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

    @property
    def clips(self) -> Dict[str, VoiceClip]:
        """The clips found by the last scan."""
        return dict(self._clips)

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
