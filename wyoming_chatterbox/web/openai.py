"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/audio/voices, /v1/models.

Clients written for OpenAI (Open WebUI, scripts, home-automation tools) get
this server's voices. The audio is streamed as made, in the asked
`response_format` (audio_formats.py says which exist and how each streams),
or as OpenAI's server-sent events (`stream_format: "sse"`:
`speech.audio.delta` with base64 audio, then `speech.audio.done`). `model` is
accepted and not used (the server speaks with the model it has loaded);
`speed` is checked (0.25 to 4) but not applied: changing the tempo without
the pitch needs a time-stretch that would add seams between pieces;
`instructions` (tone prompts for OpenAI's own models) is ignored.
"""

import asyncio
import base64
import json
import logging
import re
from typing import Any, Mapping, Optional

from aiohttp import web

from ..speech import EngineError
from .audio_formats import Encoder, UnsupportedFormat, make_encoder
from .errors import ApiError
from .speak import (
    SSE_HEADERS,
    SpeechRequest,
    abort,
    check_text,
    open_reply,
    optional_text,
    read_json,
    write,
)
from .state import STATE, WebState

_LOGGER = logging.getLogger(__name__)

DEFAULT_FORMAT = "mp3"  # OpenAI's default
SPEED_RANGE = (0.25, 4.0)
STREAM_FORMATS = ("audio", "sse")


def model_id(model_name: str) -> str:
    """ "Chatterbox Turbo" -> "chatterbox-turbo"."""
    return re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")


def _check_speed(body: Mapping[str, Any]) -> None:
    speed = body.get("speed")
    if speed is None:
        return
    low, high = SPEED_RANGE
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise ApiError(400, "speed must be a number", "invalid_type", param="speed")
    if not low <= speed <= high:
        raise ApiError(
            400, f"speed must be from {low} to {high}", "invalid_value", param="speed"
        )


def parse_speech(body: Mapping[str, Any], max_chars: int) -> SpeechRequest:
    """OpenAI's request body, checked; the fields it has that we do not use
    are checked for type only."""
    optional_text(body, "model")
    optional_text(body, "instructions")
    _check_speed(body)
    return SpeechRequest(
        text=check_text(body.get("input"), "input", max_chars),
        voice=optional_text(body, "voice"),
    )


def _stream_format(body: Mapping[str, Any]) -> str:
    value = optional_text(body, "stream_format") or "audio"
    if value not in STREAM_FORMATS:
        raise ApiError(
            400,
            f"stream_format must be one of: {', '.join(STREAM_FORMATS)}",
            "invalid_value",
            param="stream_format",
        )
    return value


async def speech(request: web.Request) -> web.StreamResponse:
    """POST /v1/audio/speech."""
    state = request.app[STATE]
    body = await read_json(request, state.body_cap, state.idle)
    ask = parse_speech(body, state.max_chars)
    sse = _stream_format(body) == "sse"
    name = optional_text(body, "response_format") or DEFAULT_FORMAT
    try:
        encoder = make_encoder(name, state.engine.sample_rate)
    except UnsupportedFormat as err:
        raise ApiError(
            400, str(err), "unsupported_format", param="response_format"
        ) from None
    reply = open_reply(state.replies, ask)
    headers = SSE_HEADERS if sse else {"Content-Type": encoder.content_type}
    response = web.StreamResponse(headers=headers)
    out = _SseOut(response, state) if sse else _AudioOut(response, state)
    ended = False
    try:
        await response.prepare(request)
        async for pcm in reply.audio():
            await out.send(await _encode(encoder, pcm))
        await out.send(await _encode(encoder, None))
        record = reply.end(True)
        ended = True
        await out.done(record.chars)
        await response.write_eof()
    except EngineError as err:
        await out.failed(request, str(err))
    except ConnectionError as err:
        _LOGGER.debug("HTTP client gone while sending audio: %s", err)
        abort(request)  # a client too slow to read must not get a clean end
    finally:
        if not ended:
            reply.end(False)
    return response


async def _encode(encoder: Encoder, pcm: Optional[bytes]) -> bytes:
    """A piece through the encoder (None: the end); codecs off the loop."""
    call = encoder.finish if pcm is None else lambda: encoder.encode(pcm)
    if encoder.slow:
        return await asyncio.to_thread(call)
    return call()


class _AudioOut:
    """The audio itself, chunked, as the encoder hands it on."""

    def __init__(self, response: web.StreamResponse, state: WebState) -> None:
        self.response = response
        self.idle = state.idle

    async def send(self, data: bytes) -> None:
        if data:
            await write(self.response, data, self.idle)

    async def done(self, chars: int) -> None:
        pass

    async def failed(self, request: web.Request, message: str) -> None:
        _LOGGER.warning("Speech failed mid-answer: %s", message)
        abort(request)


class _SseOut(_AudioOut):
    """OpenAI's events: speech.audio.delta per piece, speech.audio.done."""

    async def send(self, data: bytes) -> None:
        if data:
            audio = base64.b64encode(data).decode("ascii")
            await self._event({"type": "speech.audio.delta", "audio": audio})

    async def done(self, chars: int) -> None:
        # No tokens here: characters stand for the input tokens.
        usage = {"input_tokens": chars, "output_tokens": 0, "total_tokens": chars}
        await self._event({"type": "speech.audio.done", "usage": usage})

    async def failed(self, request: web.Request, message: str) -> None:
        error = ApiError(500, message, "synthesis_failed").body()
        await self._event({"type": "error", **error})
        await self.response.write_eof()

    async def _event(self, data: Mapping[str, Any]) -> None:
        line = f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        await write(self.response, line.encode(), self.idle)


async def voices(request: web.Request) -> web.Response:
    """GET /v1/audio/voices: the voices, as OpenAI-speaking tools list them."""
    listed = request.app[STATE].engine.voices()
    return web.json_response(
        {"voices": [{"id": voice.name, "name": voice.description} for voice in listed]}
    )


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one model this server speaks with."""
    state = request.app[STATE]
    model = {
        "id": model_id(state.engine.backend.model_name),
        "object": "model",
        "created": int(state.started),
        "owned_by": "resemble-ai",
    }
    return web.json_response({"object": "list", "data": [model]})
