"""Speech over HTTP for the page: POST /api/speak and /api/speak.wav.

Both drive reply.py and only reply.py: a request opens a live `Reply`, feeds it
the whole text, and streams its PCM as it is made, as server-sent events
(base64 PCM per piece, with progress) or as one WAV of unknown length. A
request closed early cancels its reply (aiohttp cancels the handler, and
`reply.end(False)` in a `finally` logs "Reply cancelled"). `read_json`,
`check_text`, `open_reply` and `write` serve the OpenAI endpoint too.
"""

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from aiohttp import web

from ..reply import Replies, Reply
from ..speech import EngineError, UnknownVoice
from ..voices import PARAM_RANGES
from ..wire import deadline
from .audio_formats import wav_header
from .errors import ApiError
from .state import STATE

_LOGGER = logging.getLogger(__name__)

# Read a request body in pieces of this size, counting against its cap.
READ_CHUNK = 64 * 1024


async def read_json(
    request: web.Request, cap: int, timeout: Optional[float]
) -> Dict[str, Any]:
    """The request's JSON object, read with a cap (413 past it) and the idle
    timeout (408); 400 when it is not a JSON object."""
    too_large = ApiError(413, f"The request body is over {cap} bytes", "body_too_large")
    if request.content_length is not None and request.content_length > cap:
        raise too_large
    body = bytearray()
    try:
        async with deadline(timeout):
            while True:
                chunk = await request.content.read(READ_CHUNK)
                if not chunk:
                    break
                body += chunk
                if len(body) > cap:
                    raise too_large
    except asyncio.TimeoutError:
        raise ApiError(408, "The request body came too slowly", "timeout") from None
    try:
        value = json.loads(body)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError too
        raise ApiError(400, f"The body is not JSON: {err}", "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "The body must be a JSON object", "invalid_json")
    return value


@dataclass(frozen=True)
class SpeechRequest:
    """What a speech request asks for, checked."""

    text: str
    voice: Optional[str] = None
    language: Optional[str] = None
    params: Mapping[str, float] = field(default_factory=dict)


def optional_text(body: Mapping[str, Any], key: str) -> Optional[str]:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{key} must be a string", "invalid_type", param=key)
    return value.strip() or None


def check_text(text: Any, key: str, max_chars: int) -> str:
    """The text to speak: 400 when missing or empty, 413 over the limit."""
    if not isinstance(text, str):
        raise ApiError(400, f"{key} must be a string", "invalid_type", param=key)
    if not text.strip():
        raise ApiError(
            400, f"{key} is empty: give the text to speak", "empty_input", param=key
        )
    if len(text) > max_chars:
        raise ApiError(
            413,
            f"Text too long: {len(text)} characters, and the limit is {max_chars} "
            "per reply; send a shorter text",
            "text_too_long",
            param=key,
        )
    return text


def parse_speak(body: Mapping[str, Any], max_chars: int) -> SpeechRequest:
    """The page's request: text, voice, language and sampling settings (the
    ranges a voice's own settings may take)."""
    params: Dict[str, float] = {}
    for key, (low, high) in PARAM_RANGES.items():
        value = body.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not low <= value <= high
        ):
            raise ApiError(
                400,
                f"{key} must be a number from {low} to {high}",
                "invalid_value",
                param=key,
            )
        params[key] = int(value) if key == "top_k" else float(value)
    return SpeechRequest(
        text=check_text(body.get("text"), "text", max_chars),
        voice=optional_text(body, "voice"),
        language=optional_text(body, "language"),
        params=params,
    )


def open_reply(replies: Replies, ask: SpeechRequest) -> Reply:
    """A live reply with all of its text fed; 400 naming the voices for an
    unknown voice."""
    try:
        reply = replies.open(ask.voice, ask.language, live=True, overrides=ask.params)
    except UnknownVoice as err:
        raise ApiError(400, str(err), "unknown_voice", param="voice") from None
    reply.feed(ask.text)
    reply.finish()
    return reply


async def write(
    response: web.StreamResponse, data: bytes, timeout: Optional[float]
) -> None:
    """Write, or ConnectionResetError once a client has read nothing for
    `timeout` seconds (the idle timeout of a Wyoming connection)."""
    try:
        async with deadline(timeout):
            await response.write(data)
    except asyncio.TimeoutError:
        raise ConnectionResetError(f"the client read nothing for {timeout} s") from None


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event."""
    return (
        f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    )


def abort(request: web.Request) -> None:
    """Cut the answer short: its status went long ago, so a client must see
    an incomplete body, not a shorter one."""
    transport = request.transport
    if transport is not None:
        transport.abort()


SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # no buffering in a reverse proxy
}


async def speak_events(request: web.Request) -> web.StreamResponse:
    """POST /api/speak: start, audio per piece as made, then done or error."""
    state = request.app[STATE]
    body = await read_json(request, state.body_cap, state.idle)
    reply = open_reply(state.replies, parse_speak(body, state.max_chars))
    response = web.StreamResponse(headers=SSE_HEADERS)
    ended = False
    try:
        await response.prepare(request)
        start = {"sample_rate": reply.sample_rate, "channels": 1, "format": "s16le"}
        await write(response, event("start", start), state.idle)
        index = 0
        async for pcm in reply.audio():
            piece = {
                "index": index,
                "pcm": base64.b64encode(pcm).decode("ascii"),
                "samples": len(pcm) // 2,
                "groups_done": reply.groups_done,
                "groups": reply.groups,
            }
            await write(response, event("audio", piece), state.idle)
            index += 1
        record = reply.end(True)
        ended = True
        done = {
            "outcome": record.outcome,
            "chars": record.chars,
            "groups": record.groups,
            "first_audio_s": record.first_audio,
            "total_s": round(record.total, 3),
            "audio_s": round(record.audio, 3),
        }
        await write(response, event("done", done), state.idle)
        await response.write_eof()
    except EngineError as err:
        error = ApiError(500, str(err), "synthesis_failed").body()
        await write(response, event("error", error), state.idle)
        await response.write_eof()
    except ConnectionError as err:
        _LOGGER.debug("HTTP client gone while sending audio: %s", err)
        abort(request)  # a client too slow to read must not get a clean end
    finally:
        if not ended:  # the client left (or the handler was cancelled)
            reply.end(False)
    return response


async def speak_wav(request: web.Request) -> web.StreamResponse:
    """POST /api/speak.wav: one WAV, its header first (length unknown), then
    the PCM as it is made."""
    state = request.app[STATE]
    body = await read_json(request, state.body_cap, state.idle)
    reply = open_reply(state.replies, parse_speak(body, state.max_chars))
    response = web.StreamResponse(
        headers={"Content-Type": "audio/wav", "Cache-Control": "no-store"}
    )
    ended = False
    try:
        await response.prepare(request)
        await write(response, wav_header(reply.sample_rate), state.idle)
        async for pcm in reply.audio():
            await write(response, pcm, state.idle)
        reply.end(True)
        ended = True
        await response.write_eof()
    except EngineError:
        abort(request)
    except ConnectionError as err:
        _LOGGER.debug("HTTP client gone while sending audio: %s", err)
        abort(request)  # a client too slow to read must not get a clean end
    finally:
        if not ended:
            reply.end(False)
    return response
