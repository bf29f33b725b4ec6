"""Voices over HTTP: list, add (upload a clip), play a clip, delete.

An uploaded clip passes the checks a clip in the voices folder passes
(voices.py: decodable, not silent, more than 5 s) and a size cap enforced
while the body streams in; it is written into `--voices-dir` only, under its
sanitised name (never a path from the request), atomically: a hidden temp
file in the folder (which the folder scan skips), then a hard link to the
final name, which fails rather than replace a clip that exists. The
catalogue rescans the folder on the next voices() call, so the voice is in
the list at once and in Home Assistant's next Describe. Deleting removes the
clip and its NAME.json. File work runs in a thread, never on the event loop.
"""

import asyncio
import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import unquote

from aiohttp import BodyPartReader, web

from ..settings import BUILTIN_VOICE
from ..speech import UnknownVoice, VoiceInfo
from ..voices import (
    AUDIO_SUFFIXES,
    MIN_CLIP_SECONDS,
    SIDECAR_FILES,
    VoiceCatalogue,
    VoiceError,
    check_clip,
    sanitise_name,
)
from ..wire import deadline
from .errors import ApiError
from .state import STATE, WebState

READ_CHUNK = 64 * 1024
MAX_NAME_BYTES = 1024
# libsndfile's format names -> the suffix the voices folder reads.
SUFFIX_BY_FORMAT = {
    "WAV": ".wav",
    "WAVEX": ".wav",
    "FLAC": ".flac",
    "OGG": ".ogg",
    "MP3": ".mp3",
}
CLIP_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp3": "audio/mpeg",
}


class ClipRejected(Exception):
    """The upload cannot be a voice; the text says why (400)."""


class NameTaken(Exception):
    """A voice of that name exists (409)."""


def _catalogue(state: WebState) -> Optional[VoiceCatalogue]:
    """The backend's voice catalogue (a clips folder); None for a backend
    with built-in voices only."""
    catalogue = getattr(state.engine.backend, "catalogue", None)
    return catalogue if isinstance(catalogue, VoiceCatalogue) else None


def _folder(state: WebState) -> Optional[Path]:
    catalogue = _catalogue(state)
    if catalogue is None or catalogue.library is None:
        return None
    return catalogue.library.directory


def can_upload(state: WebState) -> bool:
    folder = _folder(state)
    return folder is not None and os.access(folder, os.W_OK | os.X_OK)


def _base_name(catalogue: Optional[VoiceCatalogue], entry: str) -> Optional[str]:
    """The voice an Info entry (alice, alice@de) is of; None if none."""
    if catalogue is None:
        return entry
    try:
        return catalogue.resolve(entry, None).name
    except UnknownVoice:
        return None


def describe(state: WebState) -> List[Dict[str, Any]]:
    """The voices as Info lists them, with what the page may do with each."""
    catalogue = _catalogue(state)
    listed: List[VoiceInfo] = state.engine.voices()  # rescans the folder
    clips = catalogue.clips if catalogue is not None else {}
    out = []
    for voice in listed:
        base = _base_name(catalogue, voice.name) or voice.name
        out.append(
            {
                "name": voice.name,
                "description": voice.description,
                "languages": list(voice.languages),
                "builtin": base == BUILTIN_VOICE,
                "clip": base in clips,
            }
        )
    return out


async def list_voices(request: web.Request) -> web.Response:
    """GET /api/voices."""
    state = request.app[STATE]
    return web.json_response(
        {"voices": describe(state), "can_upload": can_upload(state)}
    )


async def _read_part(
    part: BodyPartReader, cap: int, timeout: Optional[float], what: str
) -> bytes:
    """A form field's bytes, 413 past `cap`, read in pieces."""
    data = bytearray()
    try:
        while True:
            async with deadline(timeout):
                chunk = await part.read_chunk(READ_CHUNK)
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > cap:
                raise ApiError(413, f"The {what} is over {cap} bytes", "file_too_large")
    except asyncio.TimeoutError:
        raise ApiError(408, "The upload came too slowly", "timeout") from None


async def _read_form(
    request: web.Request, cap: int, timeout: Optional[float]
) -> Tuple[str, bytes]:
    """The form's name (or the file's name) and the file's bytes."""
    if request.content_length is not None and request.content_length > cap + 64 * 1024:
        raise ApiError(413, f"The clip is over {cap} bytes", "file_too_large")
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise ApiError(
            400, "Send the clip as multipart/form-data", "invalid_form"
        ) from None
    seen: Set[str] = set()
    name: Optional[str] = None
    file_name: Optional[str] = None
    data: Optional[bytes] = None
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or part.name not in ("name", "file"):
            raise ApiError(
                400, "The form takes the fields name and file only", "invalid_form"
            )
        if part.name in seen:  # one of each: no endless stream of parts
            raise ApiError(400, f"The form has {part.name} twice", "invalid_form")
        seen.add(part.name)
        if part.name == "name":
            name = (await _read_part(part, MAX_NAME_BYTES, timeout, "name")).decode(
                "utf-8", "replace"
            )
        else:
            file_name = part.filename
            data = await _read_part(part, cap, timeout, "clip")
    if data is None:
        raise ApiError(400, "No file in the form: send the clip as 'file'", "no_file")
    if not (name or "").strip():
        # Some clients send the file name percent-encoded (aiohttp's does).
        name = Path(unquote(file_name or "")).stem
    return name or "", data


def voice_name(raw: str) -> str:
    """The voice name for what the user typed: 400 for path characters or
    nothing usable."""
    if any(bad in raw for bad in ("/", "\\", "..", "\0")):
        raise ApiError(
            400,
            "A voice name cannot contain '/', '\\' or '..'",
            "invalid_name",
            param="name",
        )
    name = sanitise_name(raw)
    if not name:
        raise ApiError(
            400,
            "Give the voice a name with letters or digits",
            "invalid_name",
            param="name",
        )
    if name == BUILTIN_VOICE:
        raise ApiError(
            409, f"{name!r} is the built-in voice's name", "name_taken", param="name"
        )
    return name


async def upload(request: web.Request) -> web.Response:
    """POST /api/voices (multipart: name, file)."""
    state = request.app[STATE]
    folder = _folder(state)
    if folder is None or not can_upload(state):
        raise ApiError(
            403,
            "Uploading is off: start the server with a writable --voices-dir",
            "uploads_disabled",
        )
    cap = state.settings.http.max_upload_bytes
    async with state.uploads:
        raw_name, data = await _read_form(request, cap, state.idle)
        name = voice_name(raw_name)
        try:
            await asyncio.to_thread(store_clip, folder, name, data)
        except ClipRejected as err:
            raise ApiError(
                400, f"This clip cannot be a voice: {err}", "invalid_clip"
            ) from None
        except NameTaken:
            raise ApiError(
                409,
                f"A voice named {name!r} exists; delete it first or choose another name",
                "name_taken",
                param="name",
            ) from None
    listed = [
        voice
        for voice in describe(state)
        if _base_name(_catalogue(state), voice["name"]) == name
    ]
    languages = sorted({code for voice in listed for code in voice["languages"]})
    description = listed[0]["description"] if listed else name
    voice = {
        "name": name,
        "description": description,
        "languages": languages,
        "builtin": False,
        "clip": True,
    }
    return web.json_response({"voice": voice}, status=201)


def store_clip(folder: Path, name: str, data: bytes) -> Path:
    """Check the clip and write it as folder/NAME.SUFFIX, atomically and
    never over a file that exists. Worker thread (blocking I/O)."""
    import soundfile  # pylint: disable=import-outside-toplevel

    fd, temp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temp, 0o644)
        try:
            info = soundfile.info(temp)
        except Exception:  # pylint: disable=broad-except
            raise ClipRejected(
                "it is not audio that can be read (wav, flac, mp3 or ogg)"
            ) from None
        suffix = SUFFIX_BY_FORMAT.get(info.format)
        if suffix is None:
            raise ClipRejected(
                f"{info.format} files are not taken; send wav, flac, mp3 or ogg"
            )
        duration = info.frames / info.samplerate if info.samplerate else 0.0
        if duration <= MIN_CLIP_SECONDS:
            raise ClipRejected(
                f"it is {duration:.1f} s long; Chatterbox needs more than "
                f"{MIN_CLIP_SECONDS:.0f} s of speech (10 to 20 s is best)"
            )
        try:
            check_clip(Path(temp))
        except VoiceError as err:
            raise ClipRejected(str(err)) from None
        if _taken(folder, name):
            raise NameTaken(name)
        final = folder / f"{name}{suffix}"
        _place(temp, final)
        return final
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass


def _taken(folder: Path, name: str) -> bool:
    """Whether a clip in the folder (usable or not) has this voice name."""
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() in AUDIO_SUFFIXES and not entry.name.startswith("."):
            if sanitise_name(stem) == name:
                return True
    return False


def _place(temp: str, final: Path) -> None:
    """Give the temp file its final name, failing if that name exists."""
    try:
        os.link(temp, final)
        return
    except FileExistsError:
        raise NameTaken(final.stem) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
    # No hard links on this file system: claim the name, then replace it.
    try:
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise NameTaken(final.stem) from None
    os.replace(temp, final)


def _clip_of(state: WebState, entry: str) -> Tuple[str, Optional[Path]]:
    """The voice an entry names and its clip; 404 for no such voice."""
    catalogue = _catalogue(state)
    listed = state.engine.voices()  # a fresh look at the folder
    base = _base_name(catalogue, entry)
    if catalogue is None and entry not in {voice.name for voice in listed}:
        base = None
    if base is None:
        raise ApiError(404, f"There is no voice {entry!r}", "voice_not_found")
    clip = catalogue.clips.get(base) if catalogue is not None else None
    return base, None if clip is None else clip.path


async def clip(request: web.Request) -> web.StreamResponse:
    """GET /api/voices/{name}/clip: the reference clip, to hear the voice."""
    base, path = _clip_of(request.app[STATE], request.match_info["name"])
    if path is None:
        raise ApiError(
            404, f"The voice {base!r} has no clip (it is built in)", "no_clip"
        )
    headers = {
        "Content-Type": CLIP_TYPES.get(path.suffix.lower(), "application/octet-stream"),
        "Cache-Control": "no-store",
    }
    return web.FileResponse(path, headers=headers)


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/voices/{name}: the clip and its NAME.json."""
    state = request.app[STATE]
    base, path = _clip_of(state, request.match_info["name"])
    if base == BUILTIN_VOICE:
        raise ApiError(400, "The built-in voice cannot be deleted", "builtin_voice")
    folder = _folder(state)
    if path is None or folder is None:
        raise ApiError(404, f"There is no voice {base!r}", "voice_not_found")
    try:
        await asyncio.to_thread(remove_clip, folder, base, path)
    except OSError as err:
        raise ApiError(
            403, f"The clip could not be deleted: {err.strerror}", "delete_failed"
        ) from None
    state.engine.voices()  # rescan: the voice is gone from the list
    return web.Response(status=204)


def remove_clip(folder: Path, name: str, path: Path) -> None:
    """Remove a clip (a link itself, never its target) and the voice's own
    settings file. Worker thread."""
    if path.parent != folder:
        raise PermissionError(errno.EPERM, "not in the voices folder")
    os.unlink(path)
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        if (
            suffix == ".json"
            and entry.name not in SIDECAR_FILES  # voices.json: every voice's
            and not entry.name.startswith(".")
            and sanitise_name(stem) == name
        ):
            os.unlink(entry.path)
